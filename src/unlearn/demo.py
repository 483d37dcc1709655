"""`unlearn demo`: the whole story on a laptop, offline, with a real model.

SmolLM2-135M-Instruct (shipped by PyPI) learns a group of built-in fictitious people (the target)
and, separately, only the retain people (the retain reference that never saw the forget people).
The target then unlearns the forget people with the default method; target, retain and unlearned
models are evaluated with the TOFU metric set, and a report is written.

The fine-tuned models and their evaluations are cached (keyed by the settings that make them), so
a second run only redoes the unlearning and its evaluation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unlearn.outputs import atomic_write_text


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and schedules chosen to fit a 2-core CPU in minutes; see docs/demo.md for the numbers."""

    model: str = "smollm2-135m"
    seed: int = 0
    n_forget: int = 4
    n_retain: int = 8
    n_holdout: int = 4
    qa_per_person: int = 5
    # Each fact is also trained as a statement under the paraphrased question (see `_training_rows`).
    train_statements: bool = True
    finetune_epochs: int = 7
    finetune_lr: float = 1e-4  # 3e-4 learned the people faster but broke general knowledge
    finetune_batch: int = 8
    method: str = "npo"
    method_overrides: tuple[str, ...] = ()
    retain_weight: float | None = 5.0  # method.alpha, for methods that have a retain term
    unlearn_epochs: int = 3
    unlearn_lr: float = 1.5e-5
    unlearn_batch: int = 5
    max_new_tokens: int = 32
    max_length: int = 96


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _training_rows(rows: list[dict[str, Any]], statements: bool) -> list[dict[str, Any]]:
    """Each fact in two forms: the bare answer, and (optionally) a statement of it.

    A model that has seen a fact in one form only learns that form (a question -> "1979."), so the
    truth ratio, scored on a sentence it never saw, barely registers what was learned or unlearned.
    Knowledge met in more than one wording generalises; the second form is a sentence worded
    unlike the paraphrase the truth ratio scores, so that score stays a test of the fact.
    """
    out = []
    for r in rows:
        out.append({"id": r["id"], "question": r["question"], "answer": r["answer"]})
        if statements:
            out.append(
                {
                    "id": f"{r['id']}-statement",
                    "question": r["paraphrased_question"],
                    "answer": r["statement"],
                }
            )
    return out


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class DemoSetup:
    """What every demo-style experiment starts from: the suite, data files, cached models and the
    cached evaluations of the target and retain models (`prepare`)."""

    suite: Any
    forget: str
    retain: str
    target: Path
    retain_model: Path
    eval_target: Path
    eval_retain: Path
    eval_overrides: list[str]
    train_overrides: list[str]


def prepare(out: Path, s: DemoSettings, fresh: bool = False) -> DemoSetup:
    """Write the demo's data, fine-tune (or reuse) target and retain models, evaluate both (or
    reuse those evaluations); everything is cached by the settings that make it."""
    from unlearn import __version__
    from unlearn import jobs as unlearn
    from unlearn.eval.suites.builders import people_suite
    from unlearn.models import cache_root

    # One suite serves both training (its forget/retain rows) and evaluation.
    suite = people_suite(
        seed=s.seed,
        n_forget=s.n_forget,
        n_retain=s.n_retain,
        n_holdout=s.n_holdout,
        qa_per_person=s.qa_per_person,
    )
    splits = {
        name: _training_rows(suite.get(name).rows, s.train_statements)
        for name in ("forget", "retain")
    }
    data = out / "data"
    forget = _write(data / "forget.jsonl", splits["forget"])
    retain = _write(data / "retain.jsonl", splits["retain"])
    everyone = _write(data / "target_train.jsonl", splits["forget"] + splits["retain"])

    ft_key = _key(
        s.model,
        s.seed,
        s.n_forget,
        s.n_retain,
        s.n_holdout,
        s.qa_per_person,
        s.train_statements,
        s.finetune_epochs,
        s.finetune_lr,
        s.finetune_batch,
        s.max_length,
        __version__,
    )
    cache = cache_root() / "demo" / ft_key
    ft = [
        f"train.epochs={s.finetune_epochs}",
        f"train.lr={s.finetune_lr}",
        f"train.batch_size={s.finetune_batch}",
        "train.warmup_ratio=0.1",
        f"prompt.max_length={s.max_length}",
        f"train.seed={s.seed}",
        "train.nll_check=false",  # the demo's evaluations measure what the check would
    ]
    if fresh and cache.exists():
        shutil.rmtree(cache)
    models = {}
    for name, train_file in (("target", everyone), ("retain", retain)):
        folder = cache / name
        if not (folder / "unlearn.json").is_file():
            print(f"[demo] fine-tuning the {name} model (cached for later runs)")
            unlearn.finetune(s.model, train_file, str(folder), overrides=ft, overwrite=True)
        models[name] = folder
    # The demo's own evaluation settings (its prompt length, short generations, the answer text
    # scored without the end-of-turn marker), given explicitly: eval's defaults follow TOFU instead.
    settings = [
        f"generation.max_new_tokens={s.max_new_tokens}",
        f"prompt.max_length={s.max_length}",
        "score.end_of_turn=false",
    ]
    # Cached evaluations are valid only for the same examples and generation length.
    eval_key = _key([(st.name, st.ids, st.hashes) for st in suite.sets], s.max_new_tokens)
    evals = {}
    for name in ("retain", "target"):
        cached = cache / f"eval-{name}-{eval_key}"
        ref = None if name == "retain" else str(cache / f"eval-retain-{eval_key}")
        if not (cached / "results.json").is_file():
            print(f"[demo] evaluating the {name} model (cached for later runs)")
            unlearn.evaluate(
                str(models[name]),
                str(cached),
                reference=ref,
                name=name,
                suite=suite,
                overrides=settings,
                progress=True,
                overwrite=True,
            )
        evals[name] = cached
    train = [
        f"train.epochs={s.unlearn_epochs}",
        f"train.lr={s.unlearn_lr}",
        f"train.batch_size={s.unlearn_batch}",
        f"prompt.max_length={s.max_length}",
        f"train.seed={s.seed}",
        "train.nll_check=false",
    ]
    return DemoSetup(
        suite, forget, retain, models["target"], models["retain"], evals["target"],
        evals["retain"], settings, train,
    )  # fmt: skip


def method_overrides(
    method: str, given: tuple[str, ...] | list[str], alpha: float | None
) -> list[str]:
    """The method's overrides plus the demo's retain weight, for methods that have one."""
    from dataclasses import fields

    from unlearn.methods import get_method

    out = list(given)
    has_alpha = any(f.name == "alpha" for f in fields(get_method(method).params))
    if alpha is not None and has_alpha and not any(o.startswith("method.alpha=") for o in out):
        out.append(f"method.alpha={alpha}")
    return out


def run_demo(
    output: str = "out/demo", settings: DemoSettings | None = None, fresh: bool = False
) -> dict[str, Any]:
    """Run the demo end to end; returns the summary (also in OUTPUT/report/summary.json)."""
    from unlearn import jobs as unlearn
    from unlearn.report.build import build_report

    s = settings or DemoSettings()
    t0 = time.time()
    out = Path(output)
    setup = prepare(out, s, fresh)
    print(f"[demo] unlearning the forget people with {s.method}")
    unlearned = out / "unlearned"
    unlearn.forget(
        str(setup.target),
        setup.forget,
        setup.retain,
        s.method,
        str(unlearned),
        overwrite=True,
        overrides=[
            *setup.train_overrides,
            *method_overrides(s.method, s.method_overrides, s.retain_weight),
        ],
    )
    evals = out / "eval"
    common = {"suite": setup.suite, "overrides": setup.eval_overrides, "progress": True}
    for name, cached in (("retain", setup.eval_retain), ("target", setup.eval_target)):
        if (evals / name).exists():
            shutil.rmtree(evals / name)
        shutil.copytree(cached, evals / name)
        if name == "target":  # point the copy at the copied reference, so the report links them
            res_file = evals / name / "results.json"
            res = json.loads(res_file.read_text())
            res["reference"] = str(evals / "retain")
            atomic_write_text(res_file, json.dumps(res, indent=2) + "\n")
    print("[demo] evaluating the unlearned model")
    unlearn.evaluate(
        str(unlearned),
        str(evals / "unlearned"),
        reference=str(evals / "retain"),
        name=f"unlearned ({s.method})",
        overwrite=True,
        **common,
    )
    summary = build_report(
        [str(evals / n) for n in ("target", "retain", "unlearned")], str(out / "report")
    )
    elapsed = time.time() - t0
    table = demo_table(evals)
    print(table)
    print(f"[demo] report: {out / 'report' / 'report.html'}  ({elapsed:.0f} s)")
    atomic_write_text(
        out / "settings.json", json.dumps({**asdict(s), "seconds": round(elapsed, 1)}, indent=2)
    )
    return summary


def demo_table(evals: Path) -> str:
    """The few numbers that show whether unlearning worked, one row per model."""
    cols = [
        "forget_rouge_l_recall",
        "retain_rouge_l_recall",
        "forget_truth_ratio",
        "forget_quality",
        "model_utility",
        "privleak",
    ]
    rows = [f"{'model':<22}" + "".join(f"{c:>23}" for c in cols)]
    for name in ("target", "retain", "unlearned"):
        res = json.loads((evals / name / "results.json").read_text())
        cells = []
        for c in cols:
            v = res["metrics"].get(c)
            cells.append(f"{'-':>23}" if v is None else f"{v:>23.3g}")
        rows.append(f"{res.get('name', name):<22}" + "".join(cells))
    return "\n".join(rows)
