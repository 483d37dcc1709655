"""Does the forgetting hold? Every forgetting method on the demo's setup, attacked by `unlearn
attack`; three deletion requests in sequence and their audit. Writes docs/results/robustness.md.

Setup (`unlearn.demo.prepare`, cached): the demo's SmolLM2-135M-Instruct target fine-tuned on
the built-in fictitious people, its retain model, and their evaluations on the demo's `people`
suite (32 new tokens, prompts of at most 96 tokens). Each method unlearns the 4 forget people with
the demo's schedule (3 epochs, lr 1.5e-5, batch 5, retain weight alpha 5 where the method has one;
a larger lr for the methods that do not forget at it, `METHODS`)
and is attacked with `unlearn attack` (quantization: LLM.int8, NF4, round-to-nearest 4-bit;
relearning: 15 steps at 2e-5 on every forget row, and on half of them measured on the other half;
prompts: paraphrased questions, 3 forget facts in context, a jailbreak instruction). Recovery per
forget metric = (attacked - unlearned) / (target - unlearned); the table's is the mean over the
forget metrics unlearning moved (the median over ROUGE-L recall, probability, truth ratio, extraction
strength, ...), with the attacked model's utility beside it.

Then three deletion requests, each on the previous one's output (`unlearn forget --request`),
split by person from the demo's forget set, and `unlearn audit` on the last model.

    python benchmarks/robustness.py [--methods grad_ascent,npo,...] [--attacks quant8,...]
        [--out out/robustness]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _page import ROOT, provenance

PAGE = ROOT / "docs" / "results" / "robustness.md"
#: method name on the page -> (unlearn method, extra overrides). At the demo's schedule
#: (docs/results/methods.md) SimNPO, RMU and IdkNLL hardly move the forget answers and GRIN's masked
#: NPO not at all (docs/results/grin.md), and an attack on a method that did not forget measures
#: nothing: those get a larger learning rate (GRIN: the setting docs/results/grin.md found).
METHODS = {
    "grad_ascent": ("grad_ascent", []),
    "grad_diff": ("grad_diff", []),
    "npo": ("npo", []),
    "simnpo": ("simnpo", ["train.lr=5e-5"]),
    "rmu": ("rmu", ["train.lr=5e-4"]),
    "idk_nll": ("idk_nll", ["train.lr=1e-4"]),
    "grin (npo)": (
        "npo",
        ["localize.method=grin", "localize.top_fraction=0.05", "train.lr=3.5e-4"],
    ),
}
#: Below this drop of forget ROUGE-L recall (target - unlearned) a method did not forget.
FORGOT = 0.2
ATTACKS = ["quant8", "quant4", "quant4_rtn", "relearn", "relearn_split", "paraphrase", "fewshot",
           "jailbreak"]  # fmt: skip


def unlearn_one(setup, settings, name: str, out: Path) -> Path:
    import unlearn
    from unlearn.demo import method_overrides

    method, extra = METHODS[name]
    folder = out / "models" / name.split(" ")[0]
    if (folder / "unlearn.json").is_file():
        return folder
    unlearn.forget(
        str(setup.target), setup.forget, setup.retain, method, str(folder), overwrite=True,
        overrides=[*setup.train_overrides, "train.progress=false",
                   *method_overrides(method, settings.method_overrides, settings.retain_weight),
                   *extra],
    )  # fmt: skip
    return folder


def requests(setup, settings, out: Path) -> dict:
    """Three requests in sequence (the forget people split by person) and the audit."""
    import unlearn
    from unlearn.deletion import describe
    from unlearn.demo import method_overrides

    rows = [json.loads(x) for x in Path(setup.forget).read_text().splitlines()]
    people = sorted({r["id"].split("-")[0] for r in rows})  # ids are "personNN-fact[-statement]"
    groups = [people[:2], people[2:3], people[3:]]
    model, files = str(setup.target), []
    for k, group in enumerate(groups):
        part = out / "requests" / f"request{k + 1}.jsonl"
        part.parent.mkdir(parents=True, exist_ok=True)
        mine = [r for r in rows if r["id"].split("-")[0] in group]
        part.write_text("".join(json.dumps(r) + "\n" for r in mine))
        files.append(part)
        folder = out / "requests" / f"after{k + 1}"
        unlearn.forget(
            model, str(part), setup.retain, "npo", str(folder), overwrite=True,
            request=f"DEL-{k + 1:03d}",
            overrides=[*setup.train_overrides, "train.progress=false",
                       *method_overrides("npo", settings.method_overrides, settings.retain_weight)],
        )  # fmt: skip
        model = str(folder)
    result = unlearn.audit(model, str(files[1]), output=str(out / "requests" / "audit"))
    text = describe(result)
    never = out / "requests" / "never.jsonl"
    never.write_text(json.dumps({"question": "Who painted the ceiling?", "answer": "No one."}))
    other = unlearn.audit(model, str(never))["data"]["answer"]
    return {"describe": text, "never": other, "files": [str(f) for f in files], "ok": result["ok"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--out", default="out/robustness")
    ap.add_argument("--no-page", action="store_true")
    ap.add_argument("--page-only", action="store_true", help="reuse saved results, write the page")
    args = ap.parse_args()
    import unlearn
    from unlearn.demo import DemoSettings, prepare

    t0 = time.time()
    out = Path(args.out)
    settings = DemoSettings()
    setup = prepare(out / "demo", settings)
    rows = {}
    for name in args.methods.split(","):
        model = unlearn_one(setup, settings, name, out)
        done = out / "attacks" / name.split(" ")[0] / "attack.json"
        if done.is_file() and json.loads(done.read_text())["settings"][
            "names"
        ] == args.attacks.split(","):
            rows[name] = json.loads(done.read_text())  # a rerun resumes where it stopped
            continue
        print(f"[robustness] attacking {name}", flush=True)
        rows[name] = unlearn.attack(
            str(model), str(setup.target), str(out / "attacks" / name.split(" ")[0]),
            attacks=args.attacks, suite=setup.suite, baselines={"target": str(setup.eval_target)},
            reference=str(setup.eval_retain), overrides=setup.eval_overrides, overwrite=True,
        )  # fmt: skip
        print(json.dumps({n: a["mean_recovery"] for n, a in rows[name]["attacks"].items()}),
              flush=True)  # fmt: skip
    saved = out / "requests" / "summary.json"
    if saved.is_file() and args.page_only:
        chain = json.loads(saved.read_text())
    else:
        chain = requests(setup, settings, out)
        saved.write_text(json.dumps(chain))
    print(chain["describe"], flush=True)
    if not args.no_page:
        write_page(rows, chain, args, time.time() - t0)


def _recovery(attack: dict) -> float | None:
    """The median over the knowledge metrics (forget quality, a p-value, left out), recomputed
    from the per-metric recoveries so results saved by an earlier version read the same."""
    import statistics

    from unlearn.attacks.run import NOT_KNOWLEDGE

    values = [v for k, v in attack["recovery"].items() if k not in NOT_KNOWLEDGE]
    return statistics.median(values) if values else None


def _forgot(summary: dict) -> bool:
    t = summary["target_metrics"].get("forget_rouge_l_recall") or 0.0
    u = summary["unlearned_metrics"].get("forget_rouge_l_recall") or 0.0
    return t - u >= FORGOT


def _f(v, fmt=".2f") -> str:
    return "–" if v is None else format(v, fmt)


def write_page(rows: dict, chain: dict, args, seconds: float) -> None:
    attacks = args.attacks.split(",")
    first = next(iter(rows.values()))
    lines = [
        "# Robustness: does the forgetting hold?",
        "",
        *provenance("benchmarks/robustness.py", sys.argv[1:]),
        f"- wall time: {seconds / 60:.0f} min"
        + (" (this invocation; the attacks and requests it reused from "
           f"{args.out} were run by earlier invocations of this script, same settings)"
           if getattr(args, "page_only", False) else ""),
        "",
        "The demo's setup (docs/demo.md): SmolLM2-135M-Instruct fine-tuned on 16 fictitious "
        "people, 4 of them unlearned by each method with the demo's schedule; every unlearned "
        "model attacked by `unlearn attack` (settings in the script's docstring). **Recovery** = "
        "(attacked - unlearned) / (target - unlearned), the median over the forget metrics "
        "unlearning moved: 0, nothing came back; 1, the target's values. A method that barely "
        "moved them (forget ROUGE-L column) has no meaningful recovery: any change of the model "
        "is then a large share of a small gap. Zhang et al. (ICLR 2025) "
        "measured 0.21 in full precision and 0.83 after 4-bit quantization on MUSE with "
        "Llama-2-7B; their unit is the knowledge-memorization score, ours the median over the "
        "people suite's forget metrics.",
        "",
        "## Recovery per method and attack",
        "",
        "| method | settings beyond the demo's | forget ROUGE-L (target → unlearned) | "
        + " | ".join(attacks) + " |",
        "|---" * (3 + len(attacks)) + "|",
    ]  # fmt: skip
    for name, summ in rows.items():
        t = summ["target_metrics"].get("forget_rouge_l_recall")
        u = summ["unlearned_metrics"].get("forget_rouge_l_recall")
        cells = [_f(_recovery(summ["attacks"][a])) for a in attacks]
        extra = " ".join(METHODS.get(name, ("", []))[1]) or "–"
        lines.append(f"| {name} | {extra} | {_f(t, '.3f')} → {_f(u, '.3f')} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "## Verdicts (derived from the table by the rule below)", ""]
    lines += [
        f"A method that moved forget ROUGE-L recall by less than {FORGOT} did not forget, and "
        "gets no verdict. "
        "A method's forgetting **holds** against an attack family when no attack of it recovers "
        "more than 0.2; it is **obfuscation** when one recovers 0.5 or more while the model keeps "
        "at least 90% of the unlearned model's utility (the knowledge was hidden, not removed); "
        "**partial** otherwise. Quantization: quant8, quant4, quant4_rtn; prompts: paraphrase, "
        "fewshot, jailbreak; relearning: relearn_split only (relearning the very rows measured "
        "teaches them again whatever unlearning did; the split variant measures the half it did "
        "not train on, Deeb & Roger's test of whether the knowledge is still there). Without "
        "their control (the retain model relearned the same way, not run here), part of a "
        "relearn_split recovery can be what any model learns from the other half's answers, "
        "their format and style: read those verdicts as upper bounds.",
        "",
        "| method | quantization | prompts | relearning |",
        "|---|---|---|---|",
    ]
    families = {
        "quantization": ["quant8", "quant4", "quant4_fp4", "quant4_rtn"],
        "prompts": ["paraphrase", "fewshot", "jailbreak"],
        "relearning": ["relearn_split"],
    }
    for name, summ in rows.items():
        base = summ["utility"]["unlearned"].get("model_utility") or 0.0
        if not _forgot(summ):
            lines.append(f"| {name} | " + " | ".join(["did not forget"] * len(families)) + " |")
            continue
        cells = []
        for members in families.values():
            found = [(a, summ["attacks"][a]) for a in members if a in summ["attacks"]]
            if not found:
                cells.append("–")
                continue
            worst = max((_recovery(x) or 0.0, a, x) for a, x in found)
            kept = (worst[2]["utility"].get("model_utility") or 0.0) >= 0.9 * base
            if worst[0] < 0.2:
                verdict = "holds"
            elif worst[0] >= 0.5 and kept:
                verdict = "obfuscation"
            else:
                verdict = "partial"
            cells.append(f"{verdict} (max {worst[0]:.2f}, {worst[1]})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    forgot = [n for n, s in rows.items() if _forgot(s)]
    for attack in ("quant8", "quant4", "quant4_rtn"):
        values = [
            _recovery(rows[n]["attacks"][attack]) for n in forgot if attack in rows[n]["attacks"]
        ]
        values = [v for v in values if v is not None]
        if values:
            lines.append(
                f"\nMean recovery under {attack} over the methods that forgot ({', '.join(forgot)}): "
                f"{sum(values) / len(values):.2f}."
            )
    lines.append(
        "\nZhang et al. (ICLR 2025): 0.21 in full precision and 0.83 after 4-bit quantization, on "
        "MUSE with Llama-2-7B."
    )
    lines += [
        "",
        "## Utility after each attack (model utility; unlearned model's first)",
        "",
        "| method | unlearned | " + " | ".join(attacks) + " |",
        "|---" * (2 + len(attacks)) + "|",
    ]
    for name, summ in rows.items():
        base = summ["utility"]["unlearned"].get("model_utility")
        cells = [_f(summ["attacks"][a]["utility"].get("model_utility"), ".3f") for a in attacks]
        lines.append(f"| {name} | {_f(base, '.3f')} | " + " | ".join(cells) + " |")
    target_util = first["utility"]["target"].get("model_utility")
    lines += [
        "",
        f"The target's model utility: {_f(target_util, '.3f')}.",
        "",
        "## Forget ROUGE-L recall after each attack",
        "",
        "| method | " + " | ".join(attacks) + " |",
        "|---" * (1 + len(attacks)) + "|",
    ]
    for name, summ in rows.items():
        cells = [
            _f(summ["attacks"][a]["forget_metrics"].get("forget_rouge_l_recall"), ".3f")
            for a in attacks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Three deletion requests and their audit",
        "",
        "The demo's forget people split by person into three requests (DEL-001: 2 people, "
        "DEL-002 and DEL-003: 1 each), each `unlearn forget --request` (NPO, the demo's "
        "schedule) on the previous output; then `unlearn audit` on the last model with request "
        "2's data file (`--data`):",
        "",
        "```",
        chain["describe"],
        "```",
        "",
        f"A file of a question never requested: {chain['never']}.",
    ]
    PAGE.write_text("\n".join(lines) + "\n")
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
