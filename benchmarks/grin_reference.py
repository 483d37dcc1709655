"""GRIN with noise: is every starting-model value a method compares against better taken from the
model before the noise (`localize.reference=clean`) or after it (`=noised`)? Writes
docs/results/grin_reference.md.

Setup: benchmarks/grin.py's (the demo's target, retain model, schedule and `people` suite; its
machinery is imported, each row runs in its own process). GRIN at top_fraction 0.05 with
noise_std 0.5 (the sweep level where noise visibly changed results) and the lr grin.py's table
uses for localized rows (its chosen lr, read from docs/results/grin.md). Rows, one seed:
NPO (cached reference log-probs) and GradDiff with retain_loss=kl (the KL retain model), each
with reference=clean and =noised. Pick: grin.py's rule (forget quality among rows keeping
>= 0.95x the target's model utility, else the highest utility).

    python benchmarks/grin_reference.py [--out out/grin_reference] [--methods npo,grad_diff]

Rows are cached in OUT/rows/*.json (delete them to rerun a row); the page is rewritten from them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from _page import git_commit, provenance
from grin import COLUMNS, UTILITY_BAR, Experiment, _fmt
from grin import PAGE as GRIN_PAGE

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results" / "grin_reference.md"
TOP_FRACTION = 0.05
NOISES = (0.5, 0.1)  # the sweep's levels where noise changed results: strong, then mild
FALLBACK_LR = 4.2e-4  # grin.md's chosen lr when this was written
REFERENCES = ("clean", "noised")
# what "reference" means for each method, and its extra overrides
METHODS: dict[str, tuple[str, list[str]]] = {
    "npo": ("NPO: the cached reference log-probs", []),
    "grad_diff": ("GradDiff, retain_loss=kl: the KL retain model", ["method.retain_loss=kl"]),
}


def table_lr() -> float:
    """The lr grin.py's table uses for localized rows (its sweep's choice), from its page."""
    if GRIN_PAGE.is_file():
        found = re.search(r"^Chosen \(.*?\): lr ([0-9.eE+-]+),", GRIN_PAGE.read_text(), re.M)
        if found:
            return float(found.group(1))
    return FALLBACK_LR


def row_name(method: str, noise: float, ref: str) -> str:
    return f"{method} noise={noise:g}: reference={ref}"


def run_rows(exp: Experiment, methods: list[str], lr: float) -> dict[str, list[str]]:
    mask = exp.mask("grin", TOP_FRACTION)
    groups: dict[str, list[str]] = {}
    for noise in NOISES:
        for method in methods:
            extra = METHODS[method][1]
            names = []
            for ref in REFERENCES:
                name = row_name(method, noise, ref)
                settings = [*extra, f"localize.reference={ref}"]
                exp.row(name, method, exp.localized(mask, noise, lr, settings))
                names.append(name)
            groups[f"{method} noise={noise:g}"] = names
    return groups


def _table(exp: Experiment, names: list[str]) -> list[str]:
    cols = [c for c in COLUMNS if c[0] in {"forget_quality", "model_utility",
                                           "forget_rouge_l_recall", "privleak"}]  # fmt: skip
    head = ["model", *(c[1] for c in cols), "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, metrics in (("target (before unlearning)", exp.target_metrics),
                           ("retain model (never saw the forget people)", exp.retain_metrics)):  # fmt: skip
        lines.append(
            "| " + " | ".join([label, *(_fmt(metrics.get(k), f) for k, _, f in cols), ""]) + " |"
        )
    for n in names:
        r = exp.rows[n]
        cells = [n.split(": ", 1)[1], *(_fmt(r["metrics"].get(k), f) for k, _, f in cols)]
        lines.append("| " + " | ".join([*cells, f"{r['wall_seconds']:.0f}"]) + " |")
    return lines


def _ref(name: str) -> str:
    return name.rsplit("=", 1)[1]


def decide(exp: Experiment, names: list[str]) -> tuple[str | None, str]:
    """grin.py's rule (`Experiment.best`), saying why, with equal forget qualities among rows
    keeping the bar broken by utility; None when the rule cannot separate the best two."""
    ok = [n for n in names if exp.utility_ok(exp.rows[n])]
    m = {n: exp.rows[n]["metrics"] for n in names}
    if ok:
        ranked = sorted(ok, key=lambda n: (m[n]["forget_quality"], m[n]["model_utility"]))[::-1]
        if len(ranked) == 1:
            return ranked[0], "the only one keeping the utility bar"
        a, b = ranked[:2]
        if m[a]["forget_quality"] > m[b]["forget_quality"]:
            return a, "higher forget quality, both keeping the utility bar"
        if m[a]["model_utility"] > m[b]["model_utility"]:
            return a, "equal forget quality, both keeping the utility bar; higher utility"
        return None, "equal forget quality and utility"
    ranked = sorted(names, key=lambda n: m[n]["model_utility"])[::-1]
    a, b = ranked[:2]
    if m[a]["model_utility"] > m[b]["model_utility"]:
        return a, "none keeps the utility bar; higher utility"
    return None, "none keeps the utility bar; equal utility"


def findings(exp: Experiment, groups: dict[str, list[str]]) -> tuple[list[str], str | None]:
    t_util = exp.target_metrics["model_utility"]

    def show(n: str) -> str:
        m = exp.rows[n]["metrics"]
        ok = "keeps" if exp.utility_ok(exp.rows[n]) else "misses"
        return (
            f"{_ref(n)}: forget quality {m['forget_quality']:.2e}, utility "
            f"{m['model_utility'] / t_util:.3f}x the target's ({ok} the {UTILITY_BAR}x bar)"
        )

    lines = ["## Findings", ""]
    wins: dict[str, int] = dict.fromkeys(REFERENCES, 0)
    for method, names in groups.items():
        best, how = decide(exp, names)
        if best is not None:
            wins[_ref(best)] += 1
        verdict = f"**{_ref(best)}** is better ({how})" if best else f"no winner ({how})"
        lines.append(f"- {method}: {verdict}; " + "; ".join(show(n) for n in names) + ".")
    all_rows = [n for names in groups.values() for n in names]
    overall = None
    if all_rows:
        counts = ", ".join(f"{r} {wins[r]}" for r in REFERENCES)
        if wins["clean"] != wins["noised"]:
            overall = max(wins, key=lambda r: wins[r])
            lines.append(f"- overall: **{overall}** (methods won: {counts}).")
        else:
            # a tie between methods: the rule over every row of both references decides
            best_all, how = decide(exp, all_rows)
            overall = _ref(best_all) if best_all else None
            lines.append(
                f"- overall: methods won: {counts}; over all {len(all_rows)} rows the rule picks "
                + (f"`{best_all}` ({how}), so **{overall}**." if best_all else f"none ({how}).")
            )
    lines.append("")
    return lines, overall


def write_page(exp: Experiment, groups: dict[str, list[str]], lr: float, argv: list[str],
               load: str, run_s: float | None, commit: str | None = None) -> str:  # fmt: skip
    t_util = exp.target_metrics["model_utility"]
    lines = [
        "# GRIN's noise: clean or noised reference",
        "",
        *provenance("benchmarks/grin_reference.py", argv),
        "",
        "Question: with GRIN's noise injection, is every starting-model value a method compares "
        "against (NPO's cached reference log-probs, GradDiff's KL retain model, UNDIAL's teacher, "
        "...) better taken from the model before the noise (`localize.reference=clean`) or after "
        "it (`localize.reference=noised`)?",
        "",
        "Setup: benchmarks/grin.py's (docs/results/grin.md): the demo's SmolLM2-135M-Instruct "
        "target fine-tuned on 12 fictitious people, its retain model (8 retain people only), 4 "
        f"forget people unlearned in 24 optimizer steps (3 epochs, batch 5, retain weight alpha = "
        f"{exp.settings.retain_weight}), evaluated on the `people` suite against the retain model. "
        f"Every row: GRIN mask at top_fraction {TOP_FRACTION:g}, noise_std "
        f"{' or '.join(f'{n:g}' for n in NOISES)} (sweep levels where noise changed results), lr {lr:g} (grin.py's chosen lr for "
        "localized rows), only the selected weights train, training seed 0 (so the same noise in "
        "every row). The two rows of a method at a noise level differ only in `localize.reference`. Better: grin.py's "
        f"rule, the highest forget quality among rows keeping >= {UTILITY_BAR}x the target's model "
        f"utility ({UTILITY_BAR * t_util:.3f}), else the highest utility.",
        "",
        "Wall time: the unlearning run (load, mask loading, noise, reference values, training, "
        "save), without the evaluation. Rows ran one at a time, each in its own process, while "
        f"other work shared the machine's CPUs (1/5/15-min load average {load} when the measuring run started), so wall times "
        "are inflated and only roughly comparable; rows are cached, so a regenerated page may "
        "combine rows measured at different times."
        + (
            f" That run took {run_s / 60:.1f} min in all (setup, mask, rows, evaluations)."
            if run_s
            else ""
        )
        + (f" Rows measured: {commit}." if commit else ""),
        "",
    ]
    for method, names in groups.items():
        name, noise = method.split(" noise=")
        lines += [f"## {METHODS[name][0]}; noise_std {noise}", "", *_table(exp, names), ""]
    found, _ = findings(exp, groups)
    lines += found
    text = "\n".join(lines) + "\n"
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    (exp.out / "summary.json").write_text(
        json.dumps({"lr": lr, "rows": exp.rows, "masks": exp.masks}, indent=2)
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/grin_reference")
    parser.add_argument("--methods", default="npo,grad_diff")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    exp = Experiment(Path(args.out), quick=False)
    lr = table_lr()
    print(f"[grin_reference] lr {lr:g}, load {load}", flush=True)
    commit = git_commit()  # when the rows are measured: HEAD may move during a long run
    rows = Path(args.out) / "rows"
    cached = {p.name for p in rows.glob("*.json")} if rows.is_dir() else set()
    groups = run_rows(exp, args.methods.split(","), lr)
    # the load and duration of the run that measured rows; a regeneration from cache keeps them
    # (one entry per run that measured rows: when, under what load, at which commit)
    meta = Path(args.out) / "run.json"
    runs = json.loads(meta.read_text()).get("runs", []) if meta.is_file() else []
    new = sorted({p.name for p in rows.glob("*.json")} - cached)
    if new:
        seconds = round(time.perf_counter() - t0)
        runs.append({"load": load, "seconds": seconds, "commit": commit, "rows": new})
        meta.write_text(json.dumps({"runs": runs}))
    where = "; ".join(
        f"{len([r for r in run['rows'] if not r.endswith('.spec.json')])} files at {run['commit']} "
        f"(load {run['load']}, {run['seconds'] / 60:.1f} min)"
        for run in runs
    )
    text = write_page(exp, groups, lr, sys.argv[1:], runs[0]["load"] if runs else load, None, where)
    print(text)


if __name__ == "__main__":
    main()
