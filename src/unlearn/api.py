"""The Python API: every entry point the CLI has, as functions.

`forget` and `finetune` train (`unlearn.train`), `evaluate` scores a model (`unlearn.eval`), `report`
compares evaluations (`unlearn.report`). The CLI is a thin layer over these functions, so a notebook
gets exactly the behaviour of the command line: same config resolution (YAML < arguments < dotted
overrides), same checks, same outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearn.config import (
    EVAL_SCALARS,
    EVAL_SECTIONS,
    EvalConfig,
    RunConfig,
    apply_overrides,
    build_config,
    build_eval_config,
    load_yaml,
)
from unlearn.train.loop import StepCallback
from unlearn.train.plan import Plan, RunResult, plan_run
from unlearn.train.recipe import execute

if TYPE_CHECKING:
    from unlearn.eval.suites.builders import Suite
    from unlearn.localization.run import Localization

__all__ = [
    "Plan",
    "RunResult",
    "evaluate",
    "finetune",
    "forget",
    "localize",
    "report",
    "resolve_config",
    "resolve_eval_config",
    "restor",
    "restor_corrupt",
    "restor_eval",
]


def _config_tree(config: str | Path | dict[str, Any] | None) -> dict[str, Any]:
    """The nested settings of a YAML file, a dict, or nothing, before arguments and overrides."""
    if isinstance(config, dict):
        return dict(config)
    return load_yaml(config) if config is not None else {}


def resolve_config(
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **fields: Any,
) -> RunConfig:
    """YAML file (or dict) < explicit arguments < dotted overrides, validated."""
    tree = _config_tree(config)
    flat = []
    for key, value in fields.items():
        if value is None:
            continue
        if key in ("forget", "retain", "data"):
            section = "forget" if key == "data" else key
            tree[section] = {**(tree.get(section) or {}), "path": str(value)}
        elif key == "model":
            tree["model"] = {**(tree.get("model") or {}), "name": str(value)}
        elif key == "method":
            current = tree.get("method") or {}
            current = {"name": current} if isinstance(current, str) else dict(current)
            if current.get("name") not in (None, value):
                current = {}  # a different method: the file's hyperparameters were for another one
            tree["method"] = {**current, "name": value}
        elif key in ("output", "overwrite", "resume"):
            tree[key] = str(value) if key == "output" else bool(value)
        else:
            flat.append(f"{key}={value}")
    tree = apply_overrides(tree, [*flat, *overrides])
    return build_config(tree)


def forget(
    model: str | None = None,
    forget: str | None = None,
    retain: str | None = None,
    method: str | None = None,
    output: str | None = None,
    *,
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool | None = None,
    resume: bool | None = None,
    callbacks: list[StepCallback] | None = None,
    dry_run: bool = False,
) -> RunResult | Plan:
    """Unlearn `forget` from `model` with `method`, keeping `retain`; write the result to `output`.

    `overrides` are dotted `section.key=value` strings (`method.beta=0.2`, `train.lr=1e-5`).
    Returns the output folder and the run's metrics (final losses, forget/retain NLL before/after
    unless `train.nll_check=false`; the manifest's `seconds` says what each phase cost);
    with `dry_run`, the validated Plan instead, having loaded no model and written nothing.
    """
    cfg = resolve_config(
        config,
        overrides,
        model=model,
        forget=forget,
        retain=retain,
        method=method,
        output=output,
        overwrite=overwrite or None,
        resume=resume or None,
    )
    plan = plan_run(cfg, "forget")
    return plan if dry_run else execute(plan, callbacks=callbacks)


def finetune(
    model: str | None = None,
    data: str | None = None,
    output: str | None = None,
    *,
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool | None = None,
    resume: bool | None = None,
    callbacks: list[StepCallback] | None = None,
    dry_run: bool = False,
) -> RunResult | Plan:
    """Fine-tune `model` on `data` (NLL on answer tokens): how target and retain models are made.

    With `dry_run`, returns the validated Plan instead of training.
    """
    cfg = resolve_config(
        config,
        overrides,
        model=model,
        data=data,
        method="finetune",
        output=output,
        overwrite=overwrite or None,
        resume=resume or None,
    )
    plan = plan_run(cfg, "finetune")
    return plan if dry_run else execute(plan, callbacks=callbacks)


def localize(
    model: str | None = None,
    forget: str | None = None,
    retain: str | None = None,
    output: str | None = None,
    *,
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool | None = None,
) -> Localization:
    """Score which weights hold `forget` relative to `retain` (GRIN by default); write the mask.

    `output` receives mask.safetensors (reusable with `localize.mask=OUTPUT` in `forget`),
    localization.json, summary.md and heatmap.png. `overrides` set the `localize` section
    (`localize.top_fraction=0.01`, `localize.method=forget_grad`) and the `prompt`/`model` ones,
    which must match the later forget run.
    """
    from unlearn.localization.run import run_localize

    cfg = resolve_config(
        config,
        overrides,
        model=model,
        forget=forget,
        retain=retain,
        output=output,
        overwrite=overwrite or None,
    )
    return run_localize(cfg)


# ---------------------------------------------------------------------------- evaluate, report
def resolve_eval_config(
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **fields: Any,
) -> EvalConfig:
    """`unlearn eval`'s settings: YAML file (or dict) < explicit arguments < dotted overrides."""
    tree = _config_tree(config)
    flat = []
    for key, value in fields.items():
        if value is None:
            continue
        if key == "model":
            tree["model"] = {**(tree.get("model") or {}), "name": str(value)}
        elif key in EVAL_SCALARS:
            tree[key] = value
        else:
            flat.append(f"{key}={value}")  # rejected below with the list of valid keys
    tree = apply_overrides(
        tree, [*flat, *overrides], sections=list(EVAL_SECTIONS), scalars=EVAL_SCALARS
    )
    return build_eval_config(tree)


def evaluate(
    model: str | None = None,
    output: str | None = None,
    *,
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    suite: Suite | None = None,
    progress: bool = True,
    **fields: Any,
) -> dict[str, Any]:
    """Evaluate `model` on a benchmark; write results.json and records to `output`; return results.

    `fields` are the eval config's top-level keys (benchmark, split, data_dir, forget, retain,
    holdout, reference, compare, retrain_auc, rouge_stem, shots, name, limit, mia_gradnorm,
    examples, overwrite; see `EvalConfig`); `overrides` the dotted
    settings (`generation.max_new_tokens=200`, `prompt.system_prompt=...`, `score.end_of_turn=false`).
    Defaults follow TOFU / OpenUnlearning (docs/metrics.md). `suite` replaces the benchmark by a
    prebuilt suite. Refuses a non-empty `output` unless `overwrite=True`.
    """
    from unlearn.eval.run import run_evaluation

    cfg = resolve_eval_config(config, overrides, model=model, output=output, **fields)
    return run_evaluation(cfg, suite=suite, progress=progress)


def protocol(
    kind: str,
    model: str,
    forget: str | list[str],
    retain: str | None,
    method: str,
    output: str,
    *,
    stages: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    eval_overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
    **eval_fields: Any,
) -> dict[str, Any]:
    """MUSE's scalability or sustainability protocol (`unlearn.protocol`): unlearn stage after
    stage, evaluating each (`eval_fields`: `evaluate`'s keys, e.g. benchmark="muse", data_dir,
    reference); resumes a stopped run in `output`. Returns what protocol.json holds."""
    from unlearn.protocol import Protocol, run_protocol

    p = Protocol(
        kind, model, [forget] if isinstance(forget, str) else list(forget), retain, method,
        output, stages, list(overrides), {k: v for k, v in eval_fields.items() if v is not None},
        list(eval_overrides),
    )  # fmt: skip
    return run_protocol(p, progress=progress)


def report(
    eval_dirs: list[str] | list[Path], output: str | Path, show_examples: bool = False
) -> dict[str, Any]:
    """Write report.md, report.html and summary.json comparing evaluations; return the summary.

    `show_examples` includes the examples' text that evaluations saved with `examples=N`.
    """
    from unlearn.report.build import build_report

    return build_report(list(eval_dirs), output, show_examples=show_examples)


# ---------------------------------------------------------------------------- RESTOR
def restor(
    model: str | None = None,
    facts: str | None = None,
    corruption: str | None = None,
    methods: list[str] | None = None,
    output: str | Path = "restor",
    *,
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
    **fields: Any,
) -> dict[str, Any]:
    """RESTOR, all stages: choose targets, corrupt `model` with `corruption` (generated from
    `facts` when None), unlearn with each of `methods`, evaluate, report into `output`.

    `fields` are the other settings of `unlearn.restor.pipeline.Settings` (entities, targets,
    untouched, n_targets, docs_per_entity, ...); `overrides` dotted ones (`corrupt.lr=1e-4`,
    `eval.judge=exact`). Returns {"report": summary, "seconds": per stage}. Reruns continue.
    """
    from unlearn.restor.pipeline import resolve_settings, run_pipeline

    settings = resolve_settings(
        config, overrides, model=model, facts=facts, corruption=corruption, methods=methods,
        **fields,
    )  # fmt: skip
    return run_pipeline(settings, output, progress=progress)


def restor_corrupt(
    model: str, corruption: str, output: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> Path:
    """Fine-tune `model` on corruption documents into `output` (the RESTOR corruption stage)."""
    from unlearn.restor.pipeline import corrupt, corrupt_settings

    return corrupt(model, corruption, output, corrupt_settings(list(overrides)))


def restor_eval(
    model: str,
    clean: str,
    corrupted: str,
    facts: str,
    output: str | Path = "restor_eval",
    *,
    corruption: str | None = None,
    setup: str | None = None,
    targets: str | list[str] | None = None,
    untouched: str | list[str] | None = None,
    name: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Evaluate `model` on RESTOR facts against the clean and corrupted models; returns the
    results (metrics, skipped with reasons, counts). Targets come from `setup`, `corruption` or
    `targets` (a list, a file, or "A;B")."""
    from unlearn.restor.run import eval_command

    return eval_command(
        model, clean, corrupted, facts, corruption=corruption, setup=setup,
        targets=";".join(targets) if isinstance(targets, list) else targets,
        untouched=";".join(untouched) if isinstance(untouched, list) else untouched,
        name=name, output=str(output), overrides=overrides,
    )  # fmt: skip
