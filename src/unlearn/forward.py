"""How the project calls a Hugging Face causal LM beyond `model(**batch)`: the one low-level module.

Training, the reference pass, the NLL check, localization scoring and evaluation all run models in
the same few non-default ways, and each needs the same probes of what a model's `forward` takes:

* a KV cache (`past`, `cache_of`; transformers 5.2x renamed `past_key_values` to `cache`), so that
  tokens every row of a batch shares (chat template, system prompt) run once;
* `logits_to_keep`, so the vocabulary projection runs only where a scored token is predicted;
* packed rows: a batch's rows without padding in a single row, with a 4D mask (SDPA);
* the last hidden states instead of the logits (`HeadCapture`), for losses that project the
  answer positions chunk by chunk (`losses.HeadLogits`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from unlearn.losses import IGNORE_INDEX

#: Fewer shared first tokens than this are not worth a separate forward.
MIN_SHARED = 4


def output_layer(model: Any) -> Any:
    """The module that turns the last hidden states into logits (under DDP, peft, a view)."""
    inner = getattr(model, "module", model)
    return inner.get_output_embeddings()


def logit_softcap(model: Any) -> float | None:
    """The cap of Gemma-style final logit soft-capping (cap * tanh(z / cap)), None without it."""
    config = getattr(getattr(model, "module", model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "final_logit_softcapping", None)


class HeadCapture:
    """While entered, the model's output layer computes nothing: it keeps its input (the last
    hidden states, already cut by `logits_to_keep`) in `hidden` and returns a [..., 0] tensor in
    place of the logits, which any post-processing the model applies (Gemma's soft-capping)
    passes through unchanged. `losses.HeadLogits` computes the logits later, where the loss
    needs them."""

    def __init__(self, model: Any) -> None:
        self.head = output_layer(model)
        self.hidden: torch.Tensor | None = None

    def _keep(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden[..., :0]

    def __enter__(self) -> HeadCapture:
        self.hidden = None
        self.head.forward = self._keep
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.head.forward  # the class's forward again


def _forward_params(model: Any) -> Any:
    return inspect.signature(model.forward).parameters


def past(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to `model.forward`."""
    return {"cache" if "cache" in _forward_params(model) else "past_key_values": cache}


def cache_of(res: Any) -> Any:
    """The KV cache a forward pass returned, under either name."""
    return res["cache"] if "cache" in res else res["past_key_values"]


def takes_cache(model: Any) -> bool:
    """Whether `model.forward` takes a KV cache (under either name)."""
    params = _forward_params(model)
    return "cache" in params or "past_key_values" in params


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the model can compute logits for its last positions only (`logits_to_keep`)."""
    return "logits_to_keep" in _forward_params(model)


def uses_sdpa(model: Any) -> bool:
    """SDPA attention takes a boolean 4D mask as given (eager attention wants an additive one)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "sdpa"


def kept_positions(labels: torch.Tensor) -> int | None:
    """How many last positions hold every prediction of a scored token, or None for all."""
    scored = (labels != IGNORE_INDEX).any(0).nonzero()
    if not len(scored):
        return None
    first = int(scored[0])
    return labels.shape[1] - max(first - 1, 0) if first > 1 else None


def shared_prefix(batch: dict[str, torch.Tensor], kept: int | None) -> int:
    """How many leading tokens every row of the batch shares and that need no logits (0: none
    worth sharing). Chat templates open every sequence with the same system prompt and headers."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.shape[0] < 2 or kept is None:
        return 0
    same = ((ids == ids[:1]) & (mask == 1)).all(0)
    differs = (~same).nonzero()
    n = int(differs[0]) if len(differs) else ids.shape[1]
    n = min(n, ids.shape[1] - kept)  # every position whose logits are kept runs in the batch
    return n if n >= MIN_SHARED else 0


def prefix_forward(model: Any, batch: dict[str, torch.Tensor], n: int, flag: dict[str, Any]):
    """The model on a batch whose rows share their first `n` tokens: those run once (batch 1) and
    their keys/values are broadcast to every row, then the rest runs after them. Gradients flow
    through the shared part (the broadcast sums them), so loss and gradients are those of the
    whole batch up to float rounding (tested), at a fraction of the cost when, as in a chat
    template, a long system prompt opens every short question/answer pair. In train mode the
    shared tokens get one dropout mask for all rows."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    head = model(input_ids=ids[:1, :n], use_cache=True)
    cache = cache_of(head)
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    positions = torch.arange(n, width, device=ids.device).expand(rows, -1)
    return model(
        input_ids=ids[:, n:],
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **past(model, cache),
        **flag,
    )


def packed_forward(
    model: Any,
    batch: dict[str, torch.Tensor],
    n: int,
    kept: int,
    capture: HeadCapture | None = None,
) -> torch.Tensor:
    """The batch's rows without their padding, one after another in a single row, after their
    shared first `n` tokens run once; the logits of the last `kept` padded positions, [B, kept, V]
    (with `capture`, the last hidden states there, [B, kept, H]).

    A 4D mask lets each token see the shared prefix and the earlier tokens of its own row only,
    and position ids restart per row, so every row computes exactly what it computes alone (tested
    against the padded batch). On TOFU batches of 4 with SmolLM2's chat template, padding and the
    repeated system prompt were a quarter of the tokens a padded batch runs.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    lengths = [int(x) for x in mask.sum(1)]
    device = ids.device
    seq = torch.cat([torch.full((k - n,), i, device=device) for i, k in enumerate(lengths)])
    pos = torch.cat([torch.arange(n, k, device=device) for k in lengths])
    packed = torch.cat([ids[i, n:k] for i, k in enumerate(lengths)])[None]
    own = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
    allowed = torch.cat([own.new_ones(len(pos), n), own], dim=1)[None, None]
    # padded position p of row i (p >= width - kept, p < its length) is packed index off_i + p - n
    first = width - kept
    src, dst, off = [], [], 0
    for i, k in enumerate(lengths):
        span = torch.arange(max(first, n), k, device=device)
        src.append(off + span - n)
        dst.append(i * kept + span - first)
        off += k - n
    keep, into = torch.cat(src), torch.cat(dst)
    extra: dict[str, Any] = {"use_cache": False}
    if n:
        head = model(input_ids=ids[:1, :n], use_cache=True)
        extra = {"use_cache": True, **past(model, cache_of(head))}
    logits = model(
        input_ids=packed, position_ids=pos[None], attention_mask=allowed, logits_to_keep=keep,
        **extra,
    ).logits[0]  # fmt: skip
    if capture is not None:
        assert capture.hidden is not None, "the output layer did not run"
        logits = capture.hidden[0]
    out = logits.new_zeros(rows * kept, logits.shape[-1]).index_copy(0, into, logits)
    return out.view(rows, kept, -1)
