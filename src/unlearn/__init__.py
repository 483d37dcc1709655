"""unlearn: remove the influence of a forget set from a causal language model, and prove it.

The public API is small on purpose: `forget` and `finetune` (and, as the evaluation lands,
`evaluate` and `report`). The `unlearn` command line calls exactly these.
"""

from __future__ import annotations

__version__ = "0.1.0"

from unlearn.api import RunResult, evaluate, finetune, forget, report
from unlearn.errors import TrainingDiverged, UnlearnError

__all__ = [
    "RunResult",
    "TrainingDiverged",
    "UnlearnError",
    "__version__",
    "evaluate",
    "finetune",
    "forget",
    "report",
]
