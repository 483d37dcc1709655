"""unlearn: remove the influence of a forget set from a causal language model, and prove it.

The public API is small on purpose (`unlearn.api`): `forget`, `finetune`, `localize`, `evaluate`,
`attack`, `audit`, `report`, and the RESTOR experiment (`restor`, `restor_corrupt`, `restor_eval`). The `unlearn`
command line calls exactly these.
"""

from __future__ import annotations

__version__ = "0.1.0"

from unlearn.api import (
    RunResult,
    attack,
    audit,
    evaluate,
    finetune,
    forget,
    localize,
    report,
    restor,
    restor_corrupt,
    restor_eval,
)
from unlearn.errors import TrainingDiverged, UnlearnError

__all__ = [
    "RunResult",
    "TrainingDiverged",
    "UnlearnError",
    "__version__",
    "attack",
    "audit",
    "evaluate",
    "finetune",
    "forget",
    "localize",
    "report",
    "restor",
    "restor_corrupt",
    "restor_eval",
]
