"""`unlearn attack`: evaluate an unlearned model, attack it, evaluate it again, and say how much of
what unlearning removed came back.

The unlearned model and the target (the model before unlearning) are evaluated once on the suite
(OUT/evals/unlearned, OUT/evals/target). Each attack then makes its own model or prompts:
quantization and relearning write a new model under OUT/attacks/NAME/model (the unlearned model's
folder is only read; the copy is deleted after its evaluation unless attack.keep_models), prompt
attacks rewrite the forget questions; the attacked evaluation
(OUT/attacks/NAME/eval) names the unlearned one "before" and the target "target" (the
engine's named comparisons). Recovery, per forget metric m (the summary: the median over the
metrics, which one barely-moved metric's huge ratio does not drag):

    recovery_m = (m_attacked - m_unlearned) / (m_target - m_unlearned)

0 means the attack drew out nothing unlearning removed, 1 that it restored the target's value
(Zhang et al. 2025 report 0.21 in full precision and 0.83 after 4-bit quantization, as their
knowledge-memorization score's share of the target's). A metric unlearning did not move (the gap
below `MIN_GAP`) has no recovery and is listed as such. Utility is reported beside it: an attack
that restores forgotten answers by wrecking the model (4-bit rounding of a small model) shows it.
relearn_split measures on the half of the forget rows it did not train on, so its three
evaluations (unlearned, target, attacked) are of that half, without the retain comparison (its
evaluation scored every forget row).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from unlearn.config import QUANT_ATTACKS, AttackSettings, EvalConfig, validate_attack
from unlearn.errors import UnlearnError
from unlearn.outputs import atomic_write_json, atomic_write_text

#: Below this |target - unlearned| a metric was not moved by unlearning: no recovery.
MIN_GAP = 1e-3
RESULTS = "attack.json"
SUMMARY = "attack.md"


def recovery(attacked: dict, unlearned: dict, target: dict, keys: list[str]) -> dict[str, Any]:
    """Per forget metric: recovery, or why there is none (pure; inputs are results' metrics)."""
    out: dict[str, Any] = {"recovery": {}, "not_moved": []}
    for k in keys:
        a, u, t = attacked.get(k), unlearned.get(k), target.get(k)
        if not all(isinstance(v, (int, float)) for v in (a, u, t)):
            continue
        if abs(t - u) < MIN_GAP:
            out["not_moved"].append(k)
            continue
        out["recovery"][k] = (a - u) / (t - u)
    values = sorted(out["recovery"].values())
    out["mean_recovery"] = sum(values) / len(values) if values else None
    # the summary number: one metric unlearning barely moved gives a huge ratio, which a mean
    # follows and a median does not
    out["median_recovery"] = statistics.median(values) if values else None
    return out


#: Suite metrics named like forget metrics that do not measure knowledge of the forget set: forget
#: quality is a p-value of the distance to the retain model, not a score to recover.
NOT_KNOWLEDGE = ("forget_quality",)


def forget_keys(names: list[str], metrics: dict) -> list[str]:
    """The metrics of the forget sets `names` (`{set}_{metric}`), scalar knowledge ones only."""
    return sorted(
        k
        for k, v in metrics.items()
        if isinstance(v, (int, float))
        and any(k.startswith(f"{n}_") for n in names)
        and k not in NOT_KNOWLEDGE
    )


def utility_of(metrics: dict, suite) -> dict[str, float]:
    """model_utility where the suite has it, and the retain sets' ROUGE-L recall."""
    keys = ["model_utility"] + [
        f"{s.name}_rouge_l_recall" for s in suite.sets if s.role in ("retain", "utility")
    ]
    return {k: metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}


def _evaluate(cfg: EvalConfig, model: str, out: Path, suite, compare: dict[str, Path]) -> dict:
    from unlearn.eval.run import run_evaluation

    others = {k: v for k, v in compare.items() if k != "retain"}
    run = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name=model),
        output=str(out),
        overwrite=True,
        reference=str(compare["retain"]) if "retain" in compare else None,
        compare=[f"{k}={v}" for k, v in others.items()] or None,
        name=out.parent.name if out.name == "eval" else out.name,
    )
    return run_evaluation(run, suite=suite, progress=False)


def _rows_file(rows: list[dict], folder: Path) -> Path:
    path = folder / "relearn.jsonl"
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                            for r in rows))  # fmt: skip
    return path


def _relearn(unlearned: str, rows: list[dict] | None, settings: AttackSettings, out: Path, cfg):
    """Fine-tune a copy of the unlearned model (NLL) on `rows` or the user's relearn data."""
    from unlearn.jobs import finetune

    if not rows and not settings.relearn_data:
        raise UnlearnError(
            "relearning needs question/answer forget rows in the suite, or attack.relearn_data=FILE "
            "(related text or question/answer rows to relearn on)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        data = settings.relearn_data or str(_rows_file(rows or [], Path(tmp)))
        overrides = [
            f"train.max_steps={settings.relearn_steps}", f"train.lr={settings.relearn_lr}",
            f"train.batch_size={settings.relearn_batch_size}", f"train.seed={settings.seed}",
            "train.nll_check=false", "train.progress=false", "train.warmup_ratio=0",
            f"model.dtype={cfg.model.dtype}", f"model.device={cfg.model.device}",
        ]  # fmt: skip
        finetune(unlearned, data, str(out), overrides=overrides, overwrite=True)
    return str(out)


def _quantized(unlearned: str, scheme: str, out: Path, cfg) -> tuple[str, dict]:
    from unlearn.attacks.quantize import quantize_model
    from unlearn.models import load_model_and_tokenizer
    from unlearn.outputs import save_model

    model, tokenizer, _ = load_model_and_tokenizer(dataclasses.replace(cfg.model, name=unlearned))
    info = quantize_model(model, scheme)
    save_model(model, tokenizer, out)
    return str(out), info


def _forget_rows(suite) -> list[dict]:
    return [r for s in suite.sets if s.role == "forget" and s.kind == "qa" for r in s.rows]


def _halves(suite, seed: int):
    """(the forget rows to relearn, the suite with the other half of each forget set)."""
    train, sets = [], []
    for s in suite.sets:
        if s.role != "forget" or s.kind != "qa":
            sets.append(s)
            continue
        order = list(range(len(s.rows)))
        random.Random(seed).shuffle(order)
        cut = len(order) // 2
        if cut < 1:
            raise UnlearnError(
                f"relearn_split needs at least 2 rows in forget set '{s.name}', got {len(s.rows)}"
            )
        train += [s.rows[i] for i in sorted(order[:cut])]
        sets.append(dataclasses.replace(s, rows=[s.rows[i] for i in sorted(order[cut:])]))
    return train, dataclasses.replace(suite, sets=sets)


def run_attacks(
    cfg: EvalConfig,
    target: str,
    settings: AttackSettings,
    suite=None,
    baselines: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate `cfg.model` (unlearned) and `target`, run every attack, write OUT/attack.json
    and OUT/attack.md; return the summary. `suite`: a prebuilt suite instead of the benchmark
    settings' (the demo's); `baselines`: existing evaluation folders of "target" (and
    "unlearned") on that same suite and settings, reused instead of evaluated again."""
    from unlearn.eval.suites.catalog import build_suite
    from unlearn.models import resolve_model

    validate_attack(settings)
    if not target:
        raise UnlearnError(
            "unlearn attack needs --target (the model before unlearning): recovery is measured "
            "against what it knew"
        )
    if not cfg.output:
        raise UnlearnError("no output folder; pass --output FOLDER")
    unlearned = cfg.model.name
    out = Path(cfg.output)
    for name in (unlearned, target):
        resolved = resolve_model(dataclasses.replace(cfg.model, name=name))
        if resolved.kind == "local" and out.resolve() == Path(resolved.path).resolve():
            raise UnlearnError("--output must not be a model folder (attacks write new models)")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UnlearnError(f"output folder {out} is not empty; pass --overwrite to replace it")
    t0 = time.time()
    suite = suite or build_suite(cfg)
    ref = {"retain": Path(cfg.reference)} if cfg.reference else {}
    base = {}
    for role, model in (("unlearned", unlearned), ("target", target)):
        given = (baselines or {}).get(role)
        if given:
            base[role] = json.loads((Path(given) / "results.json").read_text())
            base[role]["output"] = str(given)
        else:
            base[role] = _evaluate(cfg, model, out / "evals" / role, suite, ref)
    forget_sets = [s.name for s in suite.sets if s.role == "forget"]
    keys = forget_keys(forget_sets, base["unlearned"]["metrics"])
    summary: dict[str, Any] = {
        "unlearned": unlearned,
        "target": target,
        "benchmark": suite.benchmark,
        "settings": dataclasses.asdict(settings),
        "forget_metrics": keys,
        "unlearned_metrics": {k: base["unlearned"]["metrics"].get(k) for k in keys},
        "target_metrics": {k: base["target"]["metrics"].get(k) for k in keys},
        "utility": {n: utility_of(r["metrics"], suite) for n, r in base.items()},
        "attacks": {},
    }
    for name in settings.names:
        folder = out / "attacks" / name
        before, tgt, attacked_suite, run_cfg = base["unlearned"], base["target"], suite, cfg
        model, extra = unlearned, {}
        if name in QUANT_ATTACKS:
            model, extra = _quantized(unlearned, QUANT_ATTACKS[name], folder / "model", cfg)
            extra["scheme"] = QUANT_ATTACKS[name]
        elif name == "relearn":
            rows = _forget_rows(suite)
            if settings.relearn_examples:
                rows = random.Random(settings.seed).sample(
                    rows, min(settings.relearn_examples, len(rows))
                )
            model = _relearn(unlearned, rows, settings, folder / "model", cfg)
            extra["relearned_rows"] = 0 if settings.relearn_data else len(rows)
        elif name == "relearn_split":
            rows, attacked_suite = _halves(suite, settings.seed)
            model = _relearn(unlearned, rows, settings, folder / "model", cfg)
            # the retain model was evaluated on every forget row, not on this half: its metrics
            # (forget quality, privacy leakage) are left out of these three evaluations
            before = _evaluate(cfg, unlearned, folder / "unlearned", attacked_suite, {})
            tgt = _evaluate(cfg, target, folder / "target", attacked_suite, {})
            extra["relearned_rows"] = len(rows)
        else:
            from unlearn.attacks.prompts import attack_suite

            attacked_suite = attack_suite(suite, name, settings.shots, settings.seed)
            longer = cfg.prompt.max_length + settings.extra_length  # longer prompts, whole answers
            run_cfg = dataclasses.replace(
                cfg, prompt=dataclasses.replace(cfg.prompt, max_length=longer)
            )
        compare = {
            **(ref if name != "relearn_split" else {}),
            "before": Path(before["output"]),
            "target": Path(tgt["output"]),
        }
        res = _evaluate(run_cfg, model, folder / "eval", attacked_suite, compare)
        if model != unlearned and not settings.keep_models:  # a full copy of the weights
            shutil.rmtree(folder / "model", ignore_errors=True)
            extra["model_deleted"] = True
        summary["attacks"][name] = {
            **extra,
            "model": model if model != unlearned else None,
            "eval": res["output"],
            "forget_metrics": {k: res["metrics"].get(k) for k in keys},
            **recovery(res["metrics"], before["metrics"], tgt["metrics"], keys),
            "utility": utility_of(res["metrics"], suite),
        }
    from unlearn.report.build import build_report

    evals = [base["target"]["output"], base["unlearned"]["output"]]
    evals += [a["eval"] for a in summary["attacks"].values()]
    build_report(evals, out / "report")  # the attacks section, next to the usual tables
    summary["report"] = str(out / "report")
    summary["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / RESULTS, summary)
    atomic_write_text(out / SUMMARY, markdown(summary))
    return summary


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(summary: dict[str, Any]) -> str:
    """The attack summary as a table a person reads (attack.md)."""
    util = next(iter(summary["utility"]["unlearned"]), None)
    lines = [
        f"# Attacks on {summary['unlearned']}",
        "",
        f"Target (before unlearning): {summary['target']}; benchmark {summary['benchmark']}. "
        "Recovery = (attacked - unlearned) / (target - unlearned), 0: nothing came back, 1: the "
        "target's value.",
        "",
        "| attack | recovery (median) | " + " | ".join(summary["forget_metrics"])
        + (f" | {util}" if util else "") + " |",
        "|---" * (2 + len(summary["forget_metrics"]) + bool(util)) + "|",
    ]  # fmt: skip
    rows = [
        ("unlearned", None, summary["unlearned_metrics"], summary["utility"]["unlearned"]),
        ("target", None, summary["target_metrics"], summary["utility"]["target"]),
    ]
    rows += [
        (n, a["median_recovery"], a["forget_metrics"], a["utility"])
        for n, a in summary["attacks"].items()
    ]
    for name, rec, metrics, utility in rows:
        cells = [_fmt(metrics.get(k)) for k in summary["forget_metrics"]]
        if util:
            cells.append(_fmt(utility.get(util)))
        lines.append(f"| {name} | {_fmt(rec)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
