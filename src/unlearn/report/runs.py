"""One evaluation folder as a report reads it: results.json, checked, plus the training log of the
model it evaluated. Every report section reads `Run`s; `Block` is one rendered piece of a report
(("h2", text), ("p", text), ("table", header, rows[, numeric]), ("img", path, alt, png))."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn.errors import UnlearnError

RESULTS_FILE = "results.json"
TRAIN_LOG = Path("logs") / "train.jsonl"
Block = tuple


@dataclass
class Run:
    """One evaluation folder, read and checked."""

    name: str
    folder: Path
    results: dict[str, Any]
    metrics: dict[str, float | None]
    skipped: dict[str, str]
    train_log: Path | None = None
    log: list[dict[str, float]] = field(default_factory=list)
    reference: Run | None = None

    @property
    def is_reference(self) -> bool:
        return bool(self.results.get("is_reference"))

    def per_example(self, dataset: str, metric: str) -> list[float]:
        values = _get(self.results, "per_example", dataset, metric)
        return [v for v in map(_number, values or []) if v is not None]


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, inf, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def load_run(folder: str | Path) -> Run:
    folder = Path(folder).expanduser()
    path = folder / RESULTS_FILE
    if not path.is_file():
        raise UnlearnError(
            f"{folder} has no {RESULTS_FILE}; is it an evaluation folder? Run `unlearn eval` "
            "with --output pointing there first"
        )
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnlearnError(f"{path} is not valid JSON ({exc}); rerun `unlearn eval`") from exc
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise UnlearnError(f"{path} has no 'metrics' object; rerun `unlearn eval` to rewrite it")
    skipped = results.get("skipped") if isinstance(results.get("skipped"), dict) else {}
    run = Run(
        name=str(results.get("name") or folder.resolve().name),
        folder=folder,
        results=results,
        metrics={str(k): _number(v) for k, v in results["metrics"].items()},
        skipped={str(k): str(v) for k, v in skipped.items()},
    )
    run.train_log = _find_train_log(run)
    run.log = _read_train_log(run.train_log) if run.train_log else []
    return run


def _find_train_log(run: Run) -> Path | None:
    """`model_path` as written at eval time: try it as given, then beside and inside the eval folder."""
    model_path = run.results.get("model_path")
    if not isinstance(model_path, str) or not model_path:
        return None
    given = Path(model_path).expanduser()
    bases = [Path()] if given.is_absolute() else [Path(), run.folder.parent, run.folder]
    for base in bases:
        candidate = base / given / TRAIN_LOG
        if candidate.is_file():
            return candidate
    return None


def _read_train_log(path: Path) -> list[dict[str, float]]:
    """Numeric fields of every parseable line; a torn last line (a killed run) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and _number(record.get("step")) is not None:
            rows.append({k: v for k, v in record.items() if _number(v) is not None})
    return rows
