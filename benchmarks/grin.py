"""GRIN against plain unlearning and against its own controls, on the demo's setup; writes
docs/results/grin.md.

Setup (`unlearn.demo.prepare`, cached): SmolLM2-135M-Instruct fine-tuned on 12 built-in fictitious
people (target) and on the 8 retain people only (retain reference); the target unlearns 4 forget
people (40 examples) with the demo's schedule (3 epochs, batch 5 = 24 optimizer steps, retain
weight alpha = 5) and every model is evaluated with the demo's `people` suite against the retain
model. Every row below uses the same 24 optimizer steps.

Stages, each row run in a child process (so peak memory is that row's own):
1. masks: `unlearn localize` for GRIN at several top fractions and for the controls;
2. sweep (NPO + GRIN): noise_std, then top_fraction, then lr, then train_all, one at a time; the
   best setting (forget quality among settings keeping >= 0.95x the target's model utility, else
   the highest utility) is the default used in stage 3 and in `LocalizeConfig`;
3. table: the paper's trio NPO, GradDiff and PO, each with no localization (at the demo's lr and
   at the localized lr), GRIN, GRIN without noise, a random mask + noise, a forget-gradient mask
   + noise. GRIN's PO is TOFU's "preference optimization" (NLL toward refusals + retain NLL), i.e.
   `idk_nll`; `idk_dpo` (OpenUnlearning's IdkDPO, a DPO variant) is not PO but can be named too.

    python benchmarks/grin.py [--out out/grin] [--methods npo,grad_diff,idk_nll] [--quick]

Results are cached per row in OUT/rows/*.json (delete them to rerun a row); the page is rewritten
from every row at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _page import git_commit

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results" / "grin.md"
UTILITY_BAR = 0.95  # the goal: >= 0.95x the target's model utility
FQ_GOAL = 0.05
# the paper's names; GRIN's PO = TOFU's preference optimization = idk_nll (docs/methods/grin.md)
PAPER_NAMES = {
    "npo": "NPO",
    "grad_diff": "GradDiff",
    "idk_nll": "GRIN's PO",
    "idk_dpo": "IdkDPO, a DPO variant, not GRIN's PO",
}
COLUMNS = (
    ("forget_quality", "forget quality", ".2e"),
    ("model_utility", "model utility", ".3f"),
    ("forget_rouge_l_recall", "forget ROUGE-L", ".3f"),
    ("forget_keyword_accuracy", "forget keyword acc.", ".3f"),
    ("forget_keyword_confidence", "forget keyword conf.", ".3f"),
    ("privleak", "privleak", ".1f"),
)


# ---------------------------------------------------------------------------- child processes
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_localize(spec: dict[str, Any]) -> dict[str, Any]:
    import unlearn

    t0 = time.perf_counter()
    loc = unlearn.api.localize(
        spec["model"],
        spec["forget"],
        spec["retain"],
        spec["output"],
        overrides=spec["overrides"],
        overwrite=True,
    )
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "scoring_seconds": loc.info.get("seconds"),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "selected": loc.info["selected"],
        "scored": loc.info["scored"],
    }


def child_unlearn(spec: dict[str, Any]) -> dict[str, Any]:
    import unlearn
    from unlearn.demo import DemoSettings, prepare

    setup = prepare(Path(spec["demo"]), DemoSettings())
    out = Path(spec["output"])
    t0 = time.perf_counter()
    res = unlearn.forget(
        str(setup.target),
        setup.forget,
        setup.retain,
        spec["method"],
        str(out / "model"),
        overwrite=True,
        overrides=[*setup.train_overrides, *spec["overrides"], "train.progress=false"],
    )
    wall = time.perf_counter() - t0
    peak = _peak_rss_mb()
    results = unlearn.evaluate(
        str(out / "model"),
        str(out / "eval"),
        reference=str(setup.eval_retain),
        name=spec["name"],
        suite=setup.suite,
        overrides=setup.eval_overrides,
        progress=False,
        overwrite=True,
    )
    manifest = res.manifest
    return {
        "metrics": {k: results["metrics"].get(k) for k, _, _ in COLUMNS},
        "wall_seconds": round(wall, 1),
        "train_seconds": manifest.get("train_seconds"),
        "localize_seconds": manifest["seconds"].get("localize"),
        "peak_rss_mb": round(peak, 1),
        "steps": manifest["steps"],
        "localization": manifest.get("localization"),
        "adapter": manifest.get("adapter"),
    }


def _child(kind: str, spec: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Run one row in a fresh process (its own peak memory), cached in `cache`."""
    if cache.is_file():
        return json.loads(cache.read_text())
    spec_file = cache.with_suffix(".spec.json")
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec))
    print(f"[grin] {kind}: {spec.get('name', spec.get('output'))}", flush=True)
    subprocess.run(
        [sys.executable, __file__, "--child", kind, str(spec_file), str(cache)], check=True
    )
    return json.loads(cache.read_text())


# ---------------------------------------------------------------------------- the experiment
class Experiment:
    def __init__(self, out: Path, quick: bool) -> None:
        from unlearn.demo import DemoSettings, prepare

        self.out = out
        self.quick = quick
        self.settings = DemoSettings()
        self.setup = prepare(out / "demo", self.settings)
        target = json.loads((self.setup.eval_target / "results.json").read_text())["metrics"]
        retain = json.loads((self.setup.eval_retain / "results.json").read_text())["metrics"]
        self.target_metrics, self.retain_metrics = target, retain
        self.rows: dict[str, dict[str, Any]] = {}
        self.masks: dict[str, dict[str, Any]] = {}

    # masks --------------------------------------------------------------
    def mask(self, method: str, fraction: float) -> Path:
        name = f"{method}-{fraction:g}"
        folder = self.out / "masks" / name
        spec = {
            "model": str(self.setup.target),
            "forget": self.setup.forget,
            "retain": self.setup.retain,
            "output": str(folder),
            "overrides": [
                f"localize.method={method}",
                f"localize.top_fraction={fraction}",
                f"prompt.max_length={self.settings.max_length}",
            ],
        }
        self.masks[name] = _child("localize", spec, self.out / "rows" / f"mask-{name}.json")
        return folder

    # unlearning rows ----------------------------------------------------
    def row(self, name: str, method: str, overrides: list[str]) -> dict[str, Any]:
        from unlearn.demo import method_overrides

        s = self.settings
        spec = {
            "demo": str(self.out / "demo"),
            "name": name,
            "method": method,
            "output": str(self.out / "runs" / name),
            "overrides": [
                *method_overrides(method, s.method_overrides, s.retain_weight),
                *overrides,
            ],
        }
        slug = name.replace(" ", "_").replace("/", "-")
        result = _child("unlearn", spec, self.out / "rows" / f"{slug}.json")
        result["method"], result["overrides"] = method, overrides
        self.rows[name] = result
        return result

    def utility_ok(self, r: dict[str, Any]) -> bool:
        return r["metrics"]["model_utility"] >= UTILITY_BAR * self.target_metrics["model_utility"]

    def best(self, names: list[str]) -> str:
        """Highest forget quality among rows keeping the utility bar, else the highest utility."""
        ok = [n for n in names if self.utility_ok(self.rows[n])]
        if ok:
            return max(ok, key=lambda n: self.rows[n]["metrics"]["forget_quality"])
        return max(names, key=lambda n: self.rows[n]["metrics"]["model_utility"])

    def localized(self, mask: Path, noise: float, lr: float, extra: list[str] | None = None):
        return [
            f"localize.mask={mask}",
            f"localize.noise_std={noise}",
            f"train.lr={lr}",
            *(extra or []),
        ]

    def sweep(self) -> dict[str, Any]:
        """NPO + GRIN, one coordinate at a time: noise_std, then top_fraction, then lr, then
        whether every weight trains after the noise. Starts at top 1% and lr 1.5e-4 (10x the
        demo's: a masked run moves ~1% of the weights, so it needs larger steps; stage 3 checks)."""
        lr, fraction = 1.5e-4, 0.01
        noises = [0.0, 0.1, 0.5, 1.0] if not self.quick else [0.0, 0.5]
        fractions = [0.001, 0.01, 0.05, 0.2] if not self.quick else [0.01]
        lrs = [self.settings.unlearn_lr, 1.5e-4, 2.5e-4, 3.5e-4, 5e-4, 1.5e-3]
        lrs = lrs if not self.quick else [1.5e-4]
        stages: dict[str, list[str]] = {}

        def run(f: float, noise: float, lr: float, train_all: bool = False) -> str:
            mask = self.mask("grin", f)
            name = f"sweep npo grin f={f:g} noise={noise:g} lr={lr:g}"
            extra = []
            if train_all:
                name += " train_all"
                extra = ["localize.train_all=true"]
            self.row(name, "npo", self.localized(mask, noise, lr, extra))
            self.rows[name]["setting"] = {
                "top_fraction": f,
                "noise_std": noise,
                "lr": lr,
                "train_all": train_all,
            }
            return name

        stages["noise_std"] = [run(fraction, n, lr) for n in noises]
        noise = self.rows[self.best(stages["noise_std"])]["setting"]["noise_std"]
        stages["top_fraction"] = [run(f, noise, lr) for f in fractions]
        fraction = self.rows[self.best(stages["top_fraction"])]["setting"]["top_fraction"]
        stages["lr"] = [run(fraction, noise, x) for x in lrs]
        lr = self.rows[self.best(stages["lr"])]["setting"]["lr"]
        # The three coordinates interact (more weights need smaller steps): a few points around
        # the choice, and the best of them and the lr stage wins.
        if not self.quick:
            near = [(2 * fraction, lr), (2 * fraction, round(lr * 0.7, 8)), (fraction, lr * 1.2)]
            stages["refine"] = [run(f, noise, x) for f, x in near if f <= 1]
            best = self.rows[self.best(stages["lr"] + stages["refine"])]["setting"]
            fraction, lr = best["top_fraction"], best["lr"]
        stages["train_all"] = [run(fraction, noise, lr, t) for t in (False, True)]
        train_all = self.rows[self.best(stages["train_all"])]["setting"]["train_all"]
        # Plain NPO's own learning-rate frontier, for a fair comparison with the localized one.
        stages["npo without localization"] = []
        for x in [self.settings.unlearn_lr, 3e-5, 5e-5] if not self.quick else []:
            name = f"sweep npo no localization lr={x:g}"
            self.row(name, "npo", [f"train.lr={x}"])
            stages["npo without localization"].append(name)
        # The table's "with noise" rows need a noise: the chosen one, or if the sweep chose none,
        # the best non-zero one (so the table still shows what the noise does).
        noisy = [n for n in stages["noise_std"] if self.rows[n]["setting"]["noise_std"] > 0]
        table_noise = (
            noise
            if noise > 0 or not noisy
            else (self.rows[self.best(noisy)]["setting"]["noise_std"])
        )
        return {
            "table_noise_std": table_noise,
            "stages": stages,
            "lr": lr,
            "top_fraction": fraction,
            "noise_std": noise,
            "train_all": train_all,
        }

    def seeds(self, chosen: dict[str, Any], seeds: tuple[int, ...] = (1, 2)) -> list[str]:
        """The chosen GRIN setting and plain NPO (demo lr) again with other training seeds (batch
        order, retain sample, noise): how much of a difference is the seed's."""
        grin = self.mask("grin", chosen["top_fraction"])
        names = ["npo: no localization", "npo: GRIN, no noise"]
        for seed in seeds:
            name = f"npo: no localization, seed {seed}"
            self.row(name, "npo", [f"train.seed={seed}"])
            names.append(name)
            name = f"npo: GRIN, no noise, seed {seed}"
            settings = self.localized(grin, 0.0, chosen["lr"], [f"train.seed={seed}"])
            self.row(name, "npo", settings)
            names.append(name)
        return names

    def lora(self, chosen: dict[str, Any]) -> list[str]:
        """NPO with LoRA adapters (r 8, alpha 32: TOFU's LoRA config) on every linear layer and on
        the modules GRIN's mask (the chosen top fraction, scored on the target) concentrates on,
        at TOFU's LoRA unlearning lr (1e-4) and at the localized runs' lr; beside full NPO and
        full-weight GRIN (no noise), which the table already has."""
        grin = self.mask("grin", chosen["top_fraction"])
        names = ["npo: no localization", "npo: GRIN, no noise"]
        for lr in (1e-4, chosen["lr"]):
            lora = ["model.adapter=lora", "lora.dropout=0", f"train.lr={lr}"]
            name = f"npo: LoRA, every linear layer, lr={lr:g}"
            self.row(name, "npo", lora)
            names.append(name)
            name = f"npo: LoRA on GRIN's modules, lr={lr:g}"
            self.row(name, "npo", [*lora, f"localize.mask={grin}", "localize.noise_std=0"])
            names.append(name)
        return names

    def table(self, methods: list[str], chosen: dict[str, Any]) -> dict[str, list[str]]:
        lr, fraction, noise = chosen["lr"], chosen["top_fraction"], chosen["table_noise_std"]
        extra = ["localize.train_all=true"] if chosen["train_all"] else []
        grin = self.mask("grin", fraction)
        masks = {
            "GRIN (+ noise)": (grin, noise),
            "GRIN, no noise": (grin, 0.0),
            "random mask + noise": (self.mask("random", fraction), noise),
            "forget-gradient mask + noise": (self.mask("forget_grad", fraction), noise),
        }
        groups: dict[str, list[str]] = {}
        for method in methods:
            names = []
            name = f"{method}: no localization"
            self.row(name, method, [])
            names.append(name)
            if lr != self.settings.unlearn_lr:
                name = f"{method}: no localization, lr={lr:g}"
                self.row(name, method, [f"train.lr={lr}"])
                names.append(name)
            for label, (mask, n) in masks.items():
                name = f"{method}: {label}"
                self.row(name, method, self.localized(mask, n, lr, extra))
                names.append(name)
            groups[method] = names
        return groups


# ---------------------------------------------------------------------------- the page
def _paper_name(method: str) -> str:
    return f" ({PAPER_NAMES[method]})" if method in PAPER_NAMES else ""


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _table(exp: Experiment, names: list[str], with_cost: bool = True) -> list[str]:
    head = ["setting", *(c[1] for c in COLUMNS)]
    if with_cost:
        head += ["wall s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ref, metrics in (("target (before unlearning)", exp.target_metrics),
                         ("retain model (never saw the forget people)", exp.retain_metrics)):  # fmt: skip
        cells = [ref, *(_fmt(metrics.get(k), f) for k, _, f in COLUMNS)]
        cells += ["", ""] if with_cost else []
        lines.append("| " + " | ".join(cells) + " |")
    for n in names:
        r = exp.rows[n]
        cells = [n.split(": ", 1)[-1] if ": " in n else n]
        cells += [_fmt(r["metrics"].get(k), f) for k, _, f in COLUMNS]
        if with_cost:
            cells += [f"{r['wall_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _findings(exp: Experiment, groups: dict[str, list[str]]) -> list[str]:
    """What the table says, in sentences built from its numbers (so they change with the rows)."""
    t_util = exp.target_metrics["model_utility"]

    def m(name: str) -> dict[str, Any] | None:
        row = exp.rows.get(name)
        return row["metrics"] if row else None

    def show(x: dict[str, Any]) -> str:
        return (
            f"forget quality {x['forget_quality']:.2e}, utility "
            f"{x['model_utility'] / t_util:.2f}x, forget ROUGE-L {x['forget_rouge_l_recall']:.2f}"
        )

    out = ["## What the runs show", ""]
    for method in groups:
        plain, grin = m(f"{method}: no localization"), m(f"{method}: GRIN, no noise")
        noisy = m(f"{method}: GRIN (+ noise)")
        rand, fgrad = (
            m(f"{method}: random mask + noise"),
            m(f"{method}: forget-gradient mask + noise"),
        )
        hot = next((m(n) for n in groups[method] if ", lr=" in n), None)
        if not (plain and grin and noisy and rand and fgrad):
            continue
        better = grin["forget_quality"] > plain["forget_quality"]
        out.append(
            f"- **{method}**{_paper_name(method)}: GRIN without noise "
            f"{'beat' if better else 'did not beat'} plain {method} ({show(grin)}; plain: "
            f"{show(plain)})."
            + (f" Plain {method} at the masked runs' lr: {show(hot)}." if hot else "")
            + f" Noise on top of GRIN: {show(noisy)}. The controls with the same noise: random "
            f"mask {show(rand)}; forget-gradient mask (no ratio) {show(fgrad)}."
        )
    out.append("")
    return out


def write_page(exp: Experiment, chosen: dict[str, Any], groups: dict[str, list[str]], argv) -> str:
    import torch

    t_util = exp.target_metrics["model_utility"]
    lines = [
        "# GRIN on the demo's setup",
        "",
        "Generated by `benchmarks/grin.py`; do not edit by hand.",
        "",
        f"- command: `python benchmarks/grin.py {' '.join(argv)}`".rstrip(),
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}, float32",
        f"- commit: {git_commit()}",
        "",
        "Setup: the demo's (`unlearn demo`, docs/demo.md): SmolLM2-135M-Instruct fine-tuned on 12 "
        "built-in fictitious people (target), a retain model fine-tuned on the 8 retain people "
        "only, 4 forget people (40 training examples) unlearned in 24 optimizer steps (3 epochs, "
        f"batch 5, retain weight alpha = {exp.settings.retain_weight}), evaluated on the `people` "
        "suite against the retain model. Forget quality is the KS-test p-value of the forget truth "
        "ratios against the retain model's (higher: closer to a model that never saw them); model "
        "utility is the harmonic mean over retain, real people and world facts. Goal: forget "
        f"quality >= {FQ_GOAL} at >= {UTILITY_BAR}x the target's utility "
        f"({UTILITY_BAR * t_util:.3f}). Wall time: unlearning run (load, localization or mask "
        "loading, noise, training, save), without the evaluation; peak RSS: that process. Rows "
        "ran one at a time, each in its own process; rows are cached in the output folder, so a "
        "page regenerated later may combine rows measured at different times, and other work on "
        "the machine can inflate a row's wall time.",
        "",
        "Not in this page: TOFU forget01 on a SmolLM2 fine-tuned on TOFU. The target (all 4,000 "
        "TOFU answers, 5 epochs: 2,500 steps of batch 8 at ~2.3 s) and the retain99 reference "
        "would take ~3 hours of this CPU before the first unlearning run, over the hour this "
        "experiment was allowed.",
        "",
    ]
    # the sweep
    lines += ["## Sweep (NPO + GRIN), one setting at a time", ""]
    for stage, names in chosen["stages"].items():
        lines += [f"### {stage}", "", *_table(exp, names), ""]
    lines += [
        f"Chosen (the defaults used below, and `LocalizeConfig`'s): lr {chosen['lr']:g}, "
        f"top_fraction {chosen['top_fraction']:g}, noise_std {chosen['noise_std']:g}, "
        f'train_all {str(chosen["train_all"]).lower()}. Rows below marked "+ noise" use '
        f"noise_std {chosen['table_noise_std']:g}.",
        "",
    ]
    # the table
    lines += ["## Methods x localization", ""]
    for method, names in groups.items():
        lines += [f"### {method}{_paper_name(method)}", "", *_table(exp, names), ""]
    if chosen.get("seed_rows"):
        names = chosen["seed_rows"]
        lines += ["## Seeds (NPO)", "", "The same two settings with training seeds 0, 1, 2:", ""]
        lines += [*_table(exp, names), ""]
        for label in ("no localization", "GRIN, no noise"):
            group = [n for n in names if n.split(": ", 1)[1].startswith(label)]
            fq = [exp.rows[n]["metrics"]["forget_quality"] for n in group]
            mu = [exp.rows[n]["metrics"]["model_utility"] for n in group]
            lines.append(
                f"- {label}: forget quality {min(fq):.2e} to {max(fq):.2e}, model utility "
                f"{min(mu) / t_util:.3f}x to {max(mu) / t_util:.3f}x the target's"
            )
        lines.append("")
    if chosen.get("lora_rows"):
        lines += [
            "## LoRA (NPO)",
            "",
            "GRIN with LoRA adapters (`model.adapter=lora`): GRIN's mask is scored on the target "
            "as above, and the adapters go on the linear modules where the selected weights are "
            "enriched (a module's share of selected weights at least the share over all linear "
            "weights); no noise. Adapters: r 8, alpha 32 (TOFU's LoRA config), dropout 0. "
            "Compared with LoRA on every linear layer, full-weight NPO and full-weight GRIN:",
            "",
            *_table(exp, chosen["lora_rows"]),
            "",
        ]
        for n in chosen["lora_rows"]:
            adapter = exp.rows[n].get("adapter")
            if adapter:
                mods = adapter["target_modules"]
                what = "every linear layer" if "every linear" in n else f"{len(mods)} modules"
                lines.append(
                    f"- {n}: adapters on {what} (of types {', '.join(adapter['module_types'])}), "
                    f"{adapter['trainable_parameters']:,} trainable parameters."
                )
        t_util = exp.target_metrics["model_utility"]
        lora_names = [n for n in chosen["lora_rows"] if "LoRA" in n]
        best = exp.best(lora_names)
        full = exp.rows["npo: GRIN, no noise"]["metrics"]
        b = exp.rows[best]["metrics"]
        most = max(lora_names, key=lambda n: exp.rows[n]["metrics"]["forget_quality"])
        m = exp.rows[most]["metrics"]
        lines += [
            "",
            f"By the sweep's rule (forget quality among rows keeping {UTILITY_BAR}x the target's "
            f"utility, else the highest utility) the best LoRA row is `{best}`: forget quality "
            f"{b['forget_quality']:.2e} at {b['model_utility'] / t_util:.2f}x utility; the LoRA "
            f"row that forgot most is `{most}`: {m['forget_quality']:.2e} at "
            f"{m['model_utility'] / t_util:.2f}x; full-weight GRIN: {full['forget_quality']:.2e} "
            f"at {full['model_utility'] / t_util:.2f}x.",
            "",
        ]
    lines += _findings(exp, groups)
    # the goal
    lines += ["## Against the goal", ""]
    all_rows = [n for names in groups.values() for n in names]
    reach = [n for n in all_rows if exp.utility_ok(exp.rows[n]) and
             exp.rows[n]["metrics"]["forget_quality"] >= FQ_GOAL]  # fmt: skip
    if reach:
        lines.append("Reached by: " + "; ".join(f"`{n}`" for n in reach) + ".")
    else:
        lines.append("No row reaches forget quality >= 0.05 at >= 0.95x utility. Per row:")
    lines.append("")
    for n in all_rows:
        m = exp.rows[n]["metrics"]
        lines.append(
            f"- {n}: forget quality {m['forget_quality']:.2e} "
            f"({m['forget_quality'] / FQ_GOAL:.2g}x the goal), utility "
            f"{m['model_utility'] / t_util:.3f}x the target's"
        )
    # scoring cost
    lines += ["", "## Scoring cost", ""]
    base = exp.rows.get(f"{next(iter(groups))}: no localization") if groups else None
    epoch_s = None
    if base and base.get("train_seconds"):
        epoch_s = base["train_seconds"] / exp.settings.unlearn_epochs
    lines += [
        "| mask | weights selected | scoring s | x one unlearning epoch | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for name, m in exp.masks.items():
        ratio = f"{m['scoring_seconds'] / epoch_s:.2f}" if epoch_s and m["scoring_seconds"] else "–"
        lines.append(
            f"| {name} | {m['selected']:,} of {m['scored']:,} | {m['scoring_seconds']} | {ratio} "
            f"| {m['peak_rss_mb']:.0f} |"
        )
    if epoch_s:
        lines += [
            "",
            f"One unlearning epoch (NPO, no localization, 8 steps of batch 5 + retain batch) took "
            f"{epoch_s:.1f} s in this run.",
        ]
    text = "\n".join(lines) + "\n"
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    (exp.out / "summary.json").write_text(
        json.dumps({"chosen": chosen, "rows": exp.rows, "masks": exp.masks}, indent=2)
    )
    return text


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, spec_file, result_file = sys.argv[2:5]
        spec = json.loads(Path(spec_file).read_text())
        fn = child_localize if kind == "localize" else child_unlearn
        result = fn(spec)
        tmp = Path(result_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(result_file)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/grin")
    parser.add_argument("--methods", default="npo,grad_diff,idk_nll")
    parser.add_argument("--quick", action="store_true", help="a smaller sweep (for a check)")
    parser.add_argument("--sweep-only", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    exp = Experiment(Path(args.out), args.quick)
    chosen = exp.sweep()
    print(f"[grin] chosen: {chosen}", flush=True)
    groups = {} if args.sweep_only else exp.table(args.methods.split(","), chosen)
    if groups and not args.quick and "npo" in groups:
        chosen["seed_rows"] = exp.seeds(chosen)
        chosen["lora_rows"] = exp.lora(chosen)
    text = write_page(exp, chosen, groups, sys.argv[1:])
    print(text)


if __name__ == "__main__":
    main()
