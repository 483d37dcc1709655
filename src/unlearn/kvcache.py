"""Handing a KV cache to a Hugging Face model and reading it back, across transformers versions.

transformers 5.2x renamed the forward keyword and output field `past_key_values` to `cache`;
evaluation (prompt sharing, decoding) and training (a shared prompt prefix) both pass caches.
"""

from __future__ import annotations

import inspect
from typing import Any


def past(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to `model.forward`."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def cache_of(res: Any) -> Any:
    """The KV cache a forward pass returned, under either name."""
    return res["cache"] if "cache" in res else res["past_key_values"]
