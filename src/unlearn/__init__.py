"""unlearn: remove the influence of a forget set from a causal language model, and prove it.

The public API is small on purpose: `forget` and `finetune` (and, as the evaluation lands,
`evaluate` and `report`). The `unlearn` command line calls exactly these.
"""

from __future__ import annotations

__version__ = "0.1.0"

from unlearn.api import RunResult, finetune, forget
from unlearn.errors import TrainingDiverged, UnlearnError
from unlearn.eval.run import evaluate


def report(eval_dirs: list[str], output: str, show_examples: bool = False) -> dict:
    """Write report.md, report.html and summary.json for evaluated models; returns the summary."""
    from unlearn.report.build import build_report

    return build_report(eval_dirs, output, show_examples=show_examples)


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
