"""Single jobs: one training run, one localization, one evaluation, each from settings resolved
the same way (YAML < arguments < dotted overrides).

This is the layer the orchestrations (`unlearn.protocol`, `unlearn.restor.pipeline`) build on, and
the Python API (`unlearn.api`) re-exports; nothing here imports either of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from unlearn.config import _SCALARS as RUN_SCALARS
from unlearn.config import (
    EVAL_SCALARS,
    EVAL_SECTIONS,
    AttackSettings,
    EvalConfig,
    RunConfig,
    build_config,
    build_eval_config,
    build_section,
    load_yaml,
    resolve_tree,
)
from unlearn.errors import UnlearnError
from unlearn.train.loop import StepCallback
from unlearn.train.plan import Plan, RunResult, plan_run
from unlearn.train.recipe import execute

if TYPE_CHECKING:
    from unlearn.eval.suites.builders import Suite
    from unlearn.localization.run import Localization


def resolve_config(
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **fields: Any,
) -> RunConfig:
    """A training run's settings (`resolve_tree`), validated. `data` is `forget`'s other name (what
    `finetune` trains on); a `method` other than the file's drops the file's hyperparameters."""
    tree = load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    if fields.get("data") is not None:
        fields = {**fields, "forget": fields["data"]}
    fields.pop("data", None)
    method = fields.pop("method", None)
    if method is not None:
        current = tree.get("method") or {}
        current = {"name": current} if isinstance(current, str) else dict(current)
        if current.get("name") not in (None, method):
            current = {}  # a different method: the file's hyperparameters were for another one
        tree["method"] = {**current, "name": method}
    for key in ("overwrite", "resume", "merge"):
        if fields.get(key) is not None:
            fields[key] = bool(fields[key])
    if fields.get("output") is not None:
        fields["output"] = str(fields["output"])
    tree = resolve_tree(
        tree, overrides, fields, paths=("forget", "retain"), names=("model",),
        scalars=set(RUN_SCALARS),
    )  # fmt: skip
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
    merge: bool | None = None,
    request: str | None = None,
    callbacks: list[StepCallback] | None = None,
    dry_run: bool = False,
) -> RunResult | Plan:
    """Unlearn `forget` from `model` with `method`, keeping `retain`; write the result to `output`.

    `request`: the deletion request's id, recorded with the run in the model's request chain
    (`unlearn.json` "requests", checked by `unlearn audit`).

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
        merge=merge or None,
        request=request,
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
    merge: bool | None = None,
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
        merge=merge or None,
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
    """`unlearn eval`'s settings (`resolve_tree`), validated."""
    tree = resolve_tree(
        config, overrides, fields, sections=list(EVAL_SECTIONS), scalars=EVAL_SCALARS,
        names=("model",),
    )  # fmt: skip
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


# ---------------------------------------------------------------------------- attack
def resolve_attack_config(
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    attacks: str | list[str] | None = None,
    **fields: Any,
) -> tuple[EvalConfig, AttackSettings]:
    """`unlearn attack`'s settings: the evaluation's (as `unlearn eval`'s) and the `attack`
    section (YAML `attack:`, overrides `attack.relearn_steps=30`, `--attacks a,b`)."""
    tree = dict(config) if isinstance(config, dict) else load_yaml(config) if config else {}
    section = dict(tree.pop("attack", None) or {})
    rest = []
    for item in overrides:
        if item.startswith("attack."):
            key, sep, raw = item.removeprefix("attack.").partition("=")
            if not sep:
                raise UnlearnError(f"override {item!r} is not KEY=VALUE")
            section[key] = yaml.safe_load(raw) if raw else raw
        else:
            rest.append(item)
    if attacks is not None:
        names = attacks.split(",") if isinstance(attacks, str) else list(attacks)
        section["names"] = [n.strip() for n in names if n.strip()]
    settings = build_section(AttackSettings, section, "attack")
    return resolve_eval_config(tree, rest, **fields), settings


def attack(
    model: str | None = None,
    target: str | None = None,
    output: str | None = None,
    *,
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    attacks: str | list[str] | None = None,
    suite: Any = None,
    baselines: dict[str, str] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Attack the unlearned `model` (quantization, relearning, prompts) and measure how much of
    what unlearning removed comes back, against `target` (the model before unlearning); writes
    `output`/attack.json and attack.md, the evaluations and the attacked models. `fields` are
    `unlearn eval`'s (benchmark, split, data_dir, forget, retain, reference, limit, ...);
    `suite` a prebuilt suite, `baselines` reusable evaluations ({"target": DIR}) of it."""
    from unlearn.attacks.run import run_attacks

    cfg, settings = resolve_attack_config(
        config, overrides, attacks, model=model, output=output, **fields
    )
    return run_attacks(cfg, target or "", settings, suite, baselines)


def audit(
    model: str,
    data: str | None = None,
    *,
    eval_dir: str | None = None,
    attack_dir: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """The deletion requests applied to `model` (its unlearn.json chain), checked link by link
    against the weights' hashes; whether the `data` file was requested; certificates in `output`
    (with `eval_dir`'s forget metrics and `attack_dir`'s recovery as evidence)."""
    from unlearn.deletion import audit as run_audit

    return run_audit(model, data, eval_dir, attack_dir, output)
