"""The RESTOR part of a report: one table (clean, corrupted, each unlearned model) and the probe plot.

Reads only what `unlearn restor` / `restor eval` wrote into results.json (metrics, with the fact
counts behind each accuracy); the records' generations never reach a report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unlearn.report.runs import Block, Run

PLOT = "plots/restor_probe.png"
ROLE_ORDER = {"clean": 0, "corrupted": 1}


def restor_runs(runs: list[Run]) -> list[Run]:
    """RESTOR evaluations, clean first, then corrupted, then the rest in input order."""
    mine = [r for r in runs if r.results.get("benchmark") == "restor"]
    return sorted(mine, key=lambda r: ROLE_ORDER.get(str(r.results.get("role")), 2))


def _count(run: Run, key: str) -> str:
    value = run.metrics.get(key)
    return "?" if value is None else str(int(value))


def _acc(run: Run, subset: str) -> str:
    value = run.metrics.get(f"{subset}_accuracy")
    if value is None:
        return "n/a"
    return f"{value:.3f} ({_count(run, f'{subset}_correct')}/{_count(run, f'{subset}_facts')})"


def _num(run: Run, key: str, digits: int = 3) -> str:
    value = run.metrics.get(key)
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(runs: list[Run]) -> Block:
    header = [
        "model", "target acc", "target acc (known)", "untouched acc", "untouched acc (known)",
        "probe correct", "probe corrupted", "probe random", "restoration",
        "restoration (known)", "probe restoration",
    ]  # fmt: skip
    rows = [
        [
            r.name,
            _acc(r, "target"),
            _acc(r, "target_known"),
            _acc(r, "untouched"),
            _acc(r, "untouched_known"),
            _num(r, "target_probe_correct"),
            _num(r, "target_probe_corrupted"),
            _num(r, "target_probe_random"),
            _num(r, "target_restoration", 2),
            _num(r, "target_known_restoration", 2),
            _num(r, "target_probe_restoration", 2),
        ]
        for r in runs
    ]
    return ("table", header, rows, True)


def plot_probe(runs: list[Run]) -> tuple[bytes | None, str]:
    """Bars per model: mean per-token log-probability of correct, corrupted and random answers on
    the target facts, and of correct answers on the untouched facts."""
    from unlearn.report.figures import figure as _figure
    from unlearn.report.figures import png as _png

    kinds = [
        ("target_probe_correct", "target: correct"),
        ("target_probe_corrupted", "target: corrupted"),
        ("target_probe_random", "target: random"),
        ("untouched_probe_correct", "untouched: correct"),
    ]
    kinds = [(k, label) for k, label in kinds if any(r.metrics.get(k) is not None for r in runs)]
    if not runs or not kinds:
        return None, "No RESTOR evaluation has probe values, so there is no probe plot."
    fig = _figure(max(7.6, 1.2 * len(runs) + 3.2), 4.2)
    ax = fig.subplots()
    width = 0.8 / len(kinds)
    for j, (key, label) in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(runs))]
        ys = [r.metrics.get(key) for r in runs]
        ax.bar([x for x, y in zip(xs, ys, strict=True) if y is not None],
               [y for y in ys if y is not None], width, label=label)  # fmt: skip
    ax.set_xticks(range(len(runs)), [r.name for r in runs], rotation=20, ha="right")
    ax.set_ylabel("mean per-token log-probability")
    ax.set_title("Logit probe (higher = the model finds the answer more likely)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside, never over bars
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig), f"{len(runs)} RESTOR evaluation(s)."


def blocks(runs: list[Run], plot: tuple[bytes | None, str]) -> list[Block]:
    if not runs:
        return []
    first = runs[0]
    entities = first.results.get("entities")
    entities = entities if isinstance(entities, dict) else {}
    intro = (
        f"Facts about {entities.get('target', '?')} target entities "
        f"({_count(first, 'target_facts')} facts, {_count(first, 'target_known_facts')} answered "
        f"correctly by the clean model: the 'known' subset) and {entities.get('untouched', '?')} "
        f"untouched entities ({_count(first, 'untouched_facts')} facts, "
        f"{_count(first, 'untouched_known_facts')} known). Accuracy is greedy 5-shot answering judged by "
        f"`{first.results.get('judge', 'contains')}`, with correct/total. Restoration = "
        "(unlearned - corrupted) / (clean - corrupted): 1 is the clean model's value back, 0 is "
        "no change from the corrupted model. Probe values are mean per-token log-probabilities "
        f"on the target facts; corrupted answers were {first.results.get('corrupted_answers_source')}."
    )
    out: list[Block] = [("h2", "RESTOR: are the corrupted facts restored?"), ("p", intro),
                        table(runs), ("h3", "Logit probe"), ("p", plot[1])]  # fmt: skip
    if plot[0] is not None:
        out.append(("img", PLOT, "Logit probe", plot[0]))
    return out
