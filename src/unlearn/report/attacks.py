"""The attacks part of a report: every evaluation of an attacked model (one that names the
unlearned model "before" and the target "target", as `unlearn attack` writes them), with its forget
metrics before, after and in the target, the recovery, and utility.

Reads the three results.json files (the attacked evaluation and its two comparisons); recovery is
`unlearn.attacks.run.recovery` over the forget sets' metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unlearn.report.runs import Block, Run

SHOWN = ("forget_rouge_l_recall", "forget_probability", "forget_truth_ratio")


def attack_runs(runs: list[Run]) -> list[tuple[Run, dict[str, Any], dict[str, Any]]]:
    """(run, the unlearned model's results, the target's) for each attacked evaluation."""
    out = []
    for r in runs:
        comparisons = r.results.get("comparisons") or {}
        if "before" not in comparisons or "target" not in comparisons:
            continue
        loaded = []
        for name in ("before", "target"):
            path = Path(comparisons[name]) / "results.json"
            loaded.append(json.loads(path.read_text()) if path.is_file() else None)
        if all(x is not None for x in loaded):
            out.append((r, loaded[0], loaded[1]))
    return out


def _forget_keys(results: dict[str, Any]) -> list[str]:
    from unlearn.attacks.run import forget_keys

    sets = (results.get("settings") or {}).get("sets") or {}
    names = [n for n, d in sets.items() if d.get("role") == "forget"]
    return forget_keys(names, results.get("metrics") or {})


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if not isinstance(v, (int, float)) else f"{v:.{digits}f}"


def blocks(runs: list[Run]) -> list[Block]:
    from unlearn.attacks.run import recovery

    found = attack_runs(runs)
    if not found:
        return []
    header = ["attacked model", "recovery (median)"]
    header += [f"{k}: unlearned → attacked (target)" for k in SHOWN]
    header += ["model utility: unlearned → attacked"]
    rows = []
    for run, before, target in found:
        keys = _forget_keys(run.results)
        rec = recovery(run.results["metrics"], before["metrics"], target["metrics"], keys)
        row = [run.name, _f(rec["median_recovery"], 2)]
        for k in SHOWN:
            b, a, t = before["metrics"].get(k), run.metrics.get(k), target["metrics"].get(k)
            row.append(f"{_f(b)} → {_f(a)} ({_f(t)})")
        mu_b, mu_a = before["metrics"].get("model_utility"), run.metrics.get("model_utility")
        row.append(f"{_f(mu_b)} → {_f(mu_a)}")
        rows.append(row)
    note = (
        "Recovery = (attacked - unlearned) / (target - unlearned), the median over the forget "
        "metrics unlearning moved: 0, nothing came back; 1, the target's value (docs/attacks.md)."
    )
    return [("h2", "Attacks"), ("p", note), ("table", header, rows)]
