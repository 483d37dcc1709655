"""RESTOR on SmolLM2-135M with the RESTOR data: corrupt, unlearn, measure restoration.

Runs `unlearn restor` (unlearn.restor.pipeline) on the facts in ../shared/data/restor once per
variant and writes docs/results/restor.md from what the runs wrote:

- `restor`: RESTOR's own corruption documents (wikidata/v0/mix_a0.json); targets are the 5 of
  its 10 entities the clean model answers most facts about, 10 documents each.
- `generated`: documents written by `unlearn.restor.documents.generate_corruption` for the 5 of
  RESTOR's 50 evaluated entities the clean model knows best, with the wrong answers recorded.

Untouched entities are 10 others of RESTOR's 50 that the clean model knows something about. Each
variant takes about half an hour on 2 CPU cores; finished stages are reused on a rerun (`--fresh`
redoes them).

    python benchmarks/restor.py [--variants restor,generated] [--set unlearn.epochs=3 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from _page import ROOT, provenance

DATA = ROOT.parent / "shared" / "data" / "restor"
PAGE = ROOT / "docs" / "results" / "restor.md"
PLOTS = ROOT / "docs" / "results" / "restor"  # the report's probe plot of each variant
VARIANTS = {
    "restor": {"corruption": str(DATA / "wikidata" / "v0" / "mix_a0.json")},
    "generated": {},
}
NAMES = {"grad_ascent": "GA", "grad_diff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO"}


def run_variant(name: str, out: Path, overrides: list[str], fresh: bool) -> dict[str, Any]:
    from unlearn.restor.pipeline import resolve_settings, run_pipeline

    folder = out / name
    if fresh and folder.exists():
        shutil.rmtree(folder)
    settings = resolve_settings(
        None,
        overrides,
        facts=str(DATA / "facts.json"),
        entities=str(DATA / "entities.json"),
        **VARIANTS[name],
    )
    t = time.perf_counter()
    result = run_pipeline(settings, folder)
    evals = {}
    for d in sorted((folder / "evals").iterdir()):
        if (d / "results.json").is_file() and d.name != "select":
            evals[d.name] = json.loads((d / "results.json").read_text())
    setup = json.loads((folder / "setup.json").read_text())
    return {
        "name": name,
        "folder": folder,
        "settings": settings,
        "seconds": result["seconds"],
        "cost": result["cost"],
        "wall": time.perf_counter() - t,
        "evals": evals,
        "setup": setup,
    }


def _acc(r: dict[str, Any], subset: str) -> str:
    m = r["metrics"]
    v = m.get(f"{subset}_accuracy")
    right, n = m.get(f"{subset}_correct"), m.get(f"{subset}_facts")
    return "–" if v is None else f"{v:.2f} ({right:.0f}/{n:.0f})"


def _num(r: dict[str, Any] | None, key: str, spec: str = ".2f") -> str:
    v = None if r is None else r["metrics"].get(key)
    return "–" if v is None else format(v, spec)


def _table(v: dict[str, Any]) -> list[str]:
    order = ["clean", "corrupted", *v["settings"].methods]
    lines = [
        "| model | target acc | target acc, known | untouched acc | untouched acc, known | "
        "probe correct | probe corrupted | probe random | restoration | restoration, known | "
        "probe restoration |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        r = v["evals"].get(name)
        if r is None:
            continue
        lines.append(
            f"| {NAMES.get(name, name)} | {_acc(r, 'target')} | {_acc(r, 'target_known')} | "
            f"{_acc(r, 'untouched')} | {_acc(r, 'untouched_known')} | "
            f"{_num(r, 'target_probe_correct')} | {_num(r, 'target_probe_corrupted')} | "
            f"{_num(r, 'target_probe_random')} | {_num(r, 'target_restoration')} | "
            f"{_num(r, 'target_known_restoration')} | {_num(r, 'target_probe_restoration')} |"
        )
    return lines


def _known(r: dict[str, Any], group: str) -> int:
    return int(r["metrics"].get(f"{group}_known_correct", 0))


def _specificity(share_t: float, share_u: float) -> str:
    if share_u == 0:
        return "so the damage is specific to the targets."
    ratio = share_t / share_u
    if ratio >= 1.5:
        return (
            f"so the targets lose {ratio:.1f}x the share untouched entities lose: part of the damage "
            "is specific to the targets, part is general degradation from the fine-tuning."
        )
    return (
        "about the same share: the damage is general degradation from full fine-tuning on these "
        "documents, not specific to the targets."
    )


def _findings(v: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers; each says what holds here and what does not,
    with the fact counts behind it (a few facts are all a 135M model knows about these people)."""
    ev = v["evals"]
    clean, bad = ev["clean"]["metrics"], ev["corrupted"]["metrics"]
    methods = [m for m in v["settings"].methods if m in ev]
    name = {m: NAMES.get(m, m) for m in methods}
    out = []
    known_t, known_u = _known(ev["clean"], "target"), _known(ev["clean"], "untouched")
    lost_t = known_t - _known(ev["corrupted"], "target")
    lost_u = known_u - _known(ev["corrupted"], "untouched")
    out.append(
        f"- Corruption {'drops' if lost_t > 0 else 'does not drop'} accuracy on the target facts: "
        f"{clean['target_accuracy']:.2f} -> {bad['target_accuracy']:.2f}; of the {known_t} target "
        f"facts the clean model knew, {lost_t} are lost ({bad['target_known_accuracy']:.2f} left). "
        f"It also costs {lost_u} of the {known_u} known facts of untouched entities "
        f"({bad['untouched_known_accuracy']:.2f} left), "
        + _specificity(lost_t / max(known_t, 1), lost_u / max(known_u, 1))
    )  # fmt: skip
    if "target_probe_corrupted" in bad and "target_probe_corrupted" in clean:
        out.append(
            f"- The corrupted answers' log-probability rises from {clean['target_probe_corrupted']:.2f} "
            f"(clean) to {bad['target_probe_corrupted']:.2f} (corrupted; correct answers: "
            f"{clean['target_probe_correct']:.2f} -> {bad['target_probe_correct']:.2f}): the wrong "
            "facts were learned."
        )  # fmt: skip
    forgot = []
    for m in methods:
        fell = bad.get("target_probe_corrupted", 0) - ev[m]["metrics"].get(
            "target_probe_corrupted", 0
        )
        if fell > 0.5:
            forgot.append(f"{name[m]} ({fell:.2f} nats lower)")
    out.append(
        "- Forget the wrong facts (corrupted answers' log-probability more than 0.5 nats below the "
        f"corrupted model's): {', '.join(forgot) if forgot else 'none of the methods'}."
    )
    back = {m: _known(ev[m], "target") - _known(ev["corrupted"], "target") for m in methods}
    back_u = {m: _known(ev[m], "untouched") - _known(ev["corrupted"], "untouched") for m in methods}
    ranked = sorted(methods, key=lambda m: -back[m])
    out.append(
        f"- Restore (of the {lost_t} known target facts corruption broke, how many are answered "
        "again; restoration = that share): "
        + ", ".join(f"{name[m]} {back[m]:+d} ({_f(ev[m]['metrics'].get('target_known_restoration'))})"
                    for m in ranked)
        + ". On untouched entities the same models regain "
        + ", ".join(f"{name[m]} {back_u[m]:+d}" for m in ranked)
        + f" of {lost_u} lost facts: what comes back is partly general recovery from the "
        "fine-tuning's damage, not knowledge specific to the targets."
    )  # fmt: skip
    npo, ga = ev.get("npo"), ev.get("grad_ascent")
    if npo and ga:
        a = npo["metrics"].get("target_known_restoration")
        b = ga["metrics"].get("target_known_restoration")
        pa = npo["metrics"].get("target_probe_restoration")
        pb = ga["metrics"].get("target_probe_restoration")
        if a is not None and b is not None:
            diff = back["npo"] - back["grad_ascent"]
            verdict = (
                "restores more than"
                if diff > 0
                else ("ties with" if diff == 0 else "restores less than")
            )
            out.append(
                f"- NPO {verdict} gradient ascent ({a:.2f} vs {b:.2f}, {back['npo']:+d} vs "
                f"{back['grad_ascent']:+d} facts; probe restoration {_f(pa)} vs {_f(pb)}), "
                + ("the paper's ordering" if diff > 0 else "unlike the paper's ordering (Llama-3-8B)")
                + (f", but by {abs(diff)} fact(s): within what a handful of facts can tell apart."
                   if abs(diff) <= 2 else ".")
            )  # fmt: skip
    for m in methods:
        change = ev[m]["metrics"].get("untouched_accuracy_change")
        if change is not None and change < -0.1:
            out.append(
                f"- {name[m]} also damages untouched entities: accuracy {change:+.2f} against the "
                "clean model."
            )
    return out


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _variant_section(v: dict[str, Any]) -> list[str]:
    s, setup = v["settings"], v["setup"]
    corr = (
        f"RESTOR's `{Path(s.corruption).name}` ({setup['extra']['corruption_documents']} documents "
        f"kept: {s.docs_per_entity} per target), wrong answers inferred from the text"
        if s.corruption
        else f"{setup['extra']['corruption_documents']} generated documents ({s.docs_per_entity} "
        f"per target, {s.facts_per_doc} facts each, mix={s.mix}), wrong answers recorded"
    )
    known = setup["extra"].get("selection", {}).get("known_facts", {})
    who = ", ".join(f"{e} ({known[e]})" if e in known else e for e in setup["target"])
    lines = [
        f"## Variant `{v['name']}`",
        "",
        f"- corruption: {corr}",
        f"- targets (facts the clean model answers): {who}",
        f"- untouched: {len(setup['untouched'])} entities",
        f"- corruption fine-tuning: {s.corrupt.epochs} epochs, lr {s.corrupt.lr:g}, batch "
        f"{s.corrupt.batch_size}; unlearning: {s.unlearn.epochs} epochs, lr {s.unlearn.lr:g}, "
        f"batch {s.unlearn.batch_size}, each method at its defaults"
        + (f", retain set: {len(json.loads(Path(setup['extra']['retain']).read_text()))} "
           "generated true-fact documents about non-evaluated entities" if setup["extra"].get("retain") else "")
        + ".",
        f"- cost: {sum(v['cost'].values()) / 60:.1f} min of model time in all (each stage's own "
        "time when it ran, from its manifest or results: "
        + ", ".join(f"{k} {x:.0f} s" for k, x in v["cost"].items() if x > 0)
        + ("" if v["cost"].get("select") else "; choosing the targets (select) not recorded")
        + ")",
        "",
        *_table(v),
        "",
        f"![Logit probe, variant {v['name']}]({PLOTS.name}/{v['name']}_probe.png)",
        "",
        "What this run shows:",
        "",
        *_findings(v),
        "",
    ]  # fmt: skip
    return lines


def write_page(variants: list[dict[str, Any]], argv: list[str]) -> str:
    lines = [
        "# RESTOR on SmolLM2-135M: are corrupted facts restored by unlearning?",
        "",
        *provenance("benchmarks/restor.py", argv),
        "",
        "RESTOR (Rezaei et al., 2024) fine-tunes a model on documents stating wrong facts about a "
        "few target entities, unlearns those documents, and asks whether the model answers the "
        "original facts again. Each variant below is one `unlearn restor` run: SmolLM2-135M-"
        "Instruct (the clean model) is fine-tuned on the corruption documents (full fine-tuning) "
        "and the corrupted model then unlearns them with each method; every model answers every "
        "fact of the target and untouched entities with RESTOR's 5-shot prompt (greedy, first "
        "line), judged offline (`contains`: a normalized acceptable answer, as whole words).",
        "",
        "Columns: accuracy with correct/total; `known` = the facts the clean model answers "
        "correctly (only those can be restored); probe = mean per-token log-probability of the "
        "correct, corrupted and random same-relation answers on the target facts; restoration = "
        "(unlearned - corrupted) / (clean - corrupted) on accuracy (1: the clean model's value "
        "back; 0: no better than the corrupted model), and on the correct-answer probe.",
        "",
        "Anchor: on Llama-3-8B the paper finds that corruption drops target accuracy sharply, "
        "that gradient ascent and KL forget the wrong facts but restore little, and that NPO "
        "restores the most. SmolLM2-135M knows far fewer of these facts (about 29% of the 1,051 "
        "facts about RESTOR's 50 entities here; mostly gender, names, citizenship and language), "
        "so the known subsets are small and every number rests on the counts shown.",
        "",
    ]  # fmt: skip
    for v in variants:
        lines += _variant_section(v)
    lines += [
        "## Reproduce",
        "",
        "```",
        "python benchmarks/restor.py            # reuses finished stages; --fresh redoes them",
        "unlearn restor --facts ../shared/data/restor/facts.json \\",
        "    --corruption ../shared/data/restor/wikidata/v0/mix_a0.json \\",
        "    --entities ../shared/data/restor/entities.json --methods ga,graddiff,npo,simnpo \\",
        "    --output restor/",
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="restor,generated")
    ap.add_argument("--output", default=str(ROOT / "out" / "restor"))
    ap.add_argument("--set", action="append", default=[], help="pipeline override, repeatable")
    ap.add_argument("--fresh", action="store_true", help="redo finished stages")
    ap.add_argument("--no-page", action="store_true")
    args = ap.parse_args()
    if not (DATA / "facts.json").is_file():
        sys.exit(f"needs the RESTOR data in {DATA}")
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]}; choose from {', '.join(VARIANTS)}")
    runs = [run_variant(n, Path(args.output), args.set, args.fresh) for n in names]
    for v in runs:
        print(f"{v['name']}: {v['wall'] / 60:.1f} min this call", json.dumps(v["cost"]))
        print("\n".join(_table(v)))
        print("\n".join(_findings(v)))
    if not args.no_page:
        PLOTS.mkdir(parents=True, exist_ok=True)
        for v in runs:
            shutil.copyfile(
                v["folder"] / "report" / "plots" / "restor_probe.png",
                PLOTS / f"{v['name']}_probe.png",
            )
        PAGE.write_text(write_page(runs, sys.argv[1:]))
        print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
