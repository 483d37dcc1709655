"""The recipe of one training run from a validated config: plan it, load the model, tokenize,
check the NLL, localize, train, check again, save, write the manifest.

`unlearn.api.forget` / `finetune` resolve the config and call `plan_run` then `execute`; the CLI goes
through the same functions.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from unlearn.config import RunConfig, to_dict
from unlearn.errors import UnlearnError
from unlearn.outputs import (
    CONFIG_FILE,
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    prepare_output,
    save_model,
    versions,
)
from unlearn.prompts import PromptFormatter, Tokenized, tokenize_examples
from unlearn.train.checkpoint import CHECKPOINTS, check_resume_settings
from unlearn.train.job import StepCallback, TrainJob
from unlearn.train.loop import train
from unlearn.train.manifest import (
    LOCALIZATION_DIR,
    Clock,
    base_model_record,
    data_record,
    localization_record,
    request_chain,
)
from unlearn.train.nll_check import NLL_CHECK_SEQUENCES, nll_pair, reference_covers, reference_nll
from unlearn.train.plan import Plan, RunResult, resolved_config


@dataclass
class _Sequences:
    """The run's tokenized data: what trains, and what the before/after NLL check scores."""

    forget: list[Tokenized]
    second: list[Tokenized] | None
    retain: list[Tokenized] | None
    original: list[Tokenized]  # the forget data's own answers (differs under refusal targets)
    check_forget: list[Tokenized]
    check_retain: list[Tokenized]
    new_answers: bool


def _tokenize(plan: Plan, formatter: PromptFormatter, nll_check: bool) -> _Sequences:
    """Forget targets are the method's declaration: its hooks may replace the data's answers
    (refusals) or add a second answer per example (DPO); see unlearn.methods.base.Method. The
    "did it forget" numbers and localization measure the original answers, not refusal targets."""
    seed, method, params = plan.config.train.seed, plan.method, plan.params
    answers = method.forget_targets(plan.forget, params, seed) if method.forget_targets else None
    forget = tokenize_examples(plan.forget, formatter, answers)
    if not forget:
        raise UnlearnError("the forget data produced no training sequences (documents too short?)")
    second = None
    if method.needs(params).second_target and method.second_targets is not None:
        second_answers = method.second_targets(plan.forget, params, seed)
        second = tokenize_examples(plan.forget, formatter, second_answers)
    retain = tokenize_examples(plan.retain, formatter) if plan.retain else None
    original = tokenize_examples(plan.forget, formatter) if answers is not None else forget
    n = NLL_CHECK_SEQUENCES if nll_check else 0
    return _Sequences(
        forget, second, retain, original, original[:n], (retain or [])[:n], answers is not None
    )


def execute(
    plan: Plan, callbacks: list[StepCallback] | None = None, nll_check: bool | None = None
) -> RunResult:
    """Load the model, train, save the model and manifest. The input model's files are only read.

    `nll_check` (default: `train.nll_check`) measures forget/retain NLL before and after training.
    Every phase's wall time goes into the manifest's `seconds`, so the cost around the loop shows.
    """
    from unlearn.models import load_model_and_tokenizer, resolve_model

    cfg, method = plan.config, plan.method
    nll_check = cfg.train.nll_check if nll_check is None else nll_check
    clock = Clock()
    resolved = resolve_model(cfg.model)
    model_dir = resolved.path if resolved.kind == "local" else None
    ranks = _ranks(cfg)  # under torchrun every process runs this; one writes the output folder
    if ranks.is_main_process:
        prepare_output(cfg.output, model_dir, cfg.overwrite, cfg.resume)
    ranks.wait_for_everyone()
    out = Path(cfg.output).expanduser()
    settings = _resume_settings(cfg)
    if cfg.resume:  # before anything is written: a refused resume leaves the folder as it was
        check_resume_settings(out, settings)
    model, tokenizer, resolved = load_model_and_tokenizer(cfg.model)
    if cfg.model.adapter == "lora":  # a bad target module fails now, before any scoring
        from unlearn import adapters

        adapters.check_targets(model, cfg.lora.target_modules)
        if cfg.localize.active and method.parameter_mask is not None:
            raise UnlearnError(
                f"method '{method.name}' chooses its own parameters; it cannot be combined with a "
                "localize section (set localize.method=none)"
            )
    clock.lap("load")
    pad_id = tokenizer.pad_token_id
    seqs = _tokenize(plan, PromptFormatter(tokenizer, cfg.prompt), nll_check)
    clock.lap("tokenize")

    # The forget half of "before" is read off the loop's reference pass when it scores the same
    # sequences on the same starting model (NPO & co.): no second pass over them.
    noised = (
        cfg.localize.active and cfg.localize.noise_std > 0 and cfg.localize.reference == "noised"
    )
    covered = reference_covers(method, plan.params, seqs.new_answers, noised)
    from_reference = nll_check and not cfg.resume and covered
    before: dict[str, float] = {}
    if nll_check and not cfg.resume:
        forget = [] if from_reference else seqs.check_forget
        before = nll_pair(model, forget, seqs.check_retain, pad_id)
    clock.lap("nll_check")

    out.mkdir(parents=True, exist_ok=True)
    localization = None
    if cfg.localize.active:  # before config.yaml: a mask refused here leaves nothing to clean up
        localization = _localize(model, seqs.original, seqs.retain, pad_id, cfg, out)
        clock.lap("localize")
    if cfg.model.adapter == "lora":  # after localizing: GRIN's mask chooses the adapted modules
        from unlearn import adapters

        targets = (
            adapters.modules_from_mask(model, localization.mask)
            if localization is not None
            else adapters.method_targets(method, plan.params, model)
        )
        model = adapters.wrap(model, cfg.lora, targets, cfg.train.seed)
    config_text = yaml.safe_dump(resolved_config(cfg, plan.params), sort_keys=False)
    if ranks.is_main_process:
        atomic_write_text(out / CONFIG_FILE, config_text)
    job = TrainJob(
        model, method, plan.params, seqs.forget, cfg.train, out, pad_id,
        retain=seqs.retain, second=seqs.second, resume=cfg.resume,
        callbacks=list(callbacks or []), settings=settings,
        prepared=method.prepare(plan.params, tokenizer) if method.prepare else None,
    )  # fmt: skip
    if localization is not None and cfg.model.adapter == "none":
        job.mask, job.anchor = localization.train_mask, localization.anchor
        job.perturb = _noise(localization, cfg)
        job.reference = "after" if cfg.localize.reference == "noised" else "before"
    result = train(job)
    if localization is not None:
        localization.noise = result.perturbed or {}
    clock.lap("train")
    if from_reference:
        value = reference_nll(result.reference, seqs.check_forget)
        before = {"forget_nll": value, **before} if value is not None else before
    result.reference = {}  # it may hold [T, V] logits: freed before the after-check
    after = nll_pair(model, seqs.check_forget, seqs.check_retain, pad_id) if nll_check else {}
    clock.lap("nll_check")

    adapter = None
    # a sharded model is gathered whole (every process takes part); one process writes it
    state = None
    if cfg.train.sharding == "fsdp2":
        from unlearn.train.sharding import full_state_dict

        state = full_state_dict(model)
    elif cfg.train.sharding == "deepspeed":
        from unlearn.train import deepspeed

        state = deepspeed.full_state_dict(model) if deepspeed.stage(cfg.train) >= 3 else None
    if cfg.model.adapter == "lora":
        from unlearn import adapters
        from unlearn.models import local_folder

        adapter = {**adapters.describe(model), "merged": cfg.merge}
        if ranks.is_main_process:
            source = local_folder(resolved, cfg.model)
            model = adapters.save(model, tokenizer, out, source, cfg.merge, state)
    elif ranks.is_main_process:
        save_model(model, tokenizer, out, state)
    metrics: dict[str, Any] = {"steps": result.steps, "final_losses": result.final_logs}
    if nll_check:
        metrics["nll_before"] = before or None
        metrics["nll_after"] = after
    manifest = _manifest(plan, resolved, seqs, result, metrics, localization, clock, model, out)
    manifest["adapter"] = adapter
    clock.lap("save")
    clock.seconds["reference"] = round(result.reference_seconds, 2)  # part of "train"
    manifest["wall_seconds"] = clock.total()
    if ranks.is_main_process:
        atomic_write_json(out / MANIFEST, manifest)  # last: its presence means the run finished
        if not cfg.train.keep_checkpoints:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    ranks.wait_for_everyone()
    return RunResult(output=out, metrics=metrics, manifest=manifest)


def _ranks(cfg: RunConfig):
    """This launch's processes (one, or torchrun's): who writes, and a barrier. On CPU, accelerate
    must be told so (as the training loop's Accelerator is) to see torchrun's processes."""
    from accelerate import PartialState

    from unlearn.models import pick_device
    from unlearn.train import deepspeed

    deepspeed.preload()
    if cfg.train.sharding == "deepspeed":  # accelerate's DeepSpeed state is never a CPU one
        return PartialState()
    return PartialState(cpu=pick_device(cfg.model).type == "cpu")


def _resume_settings(cfg: RunConfig) -> dict[str, Any]:
    """Settings outside `train`/`method` that decide what the remaining steps compute: the
    localization (a resumed run reuses the saved mask, so changed settings would be ignored) and
    the adapters."""
    out = {f"localize.{k}": v for k, v in to_dict(cfg.localize).items()}
    out["model.adapter"] = cfg.model.adapter
    if cfg.model.adapter != "none":
        out.update({f"lora.{k}": v for k, v in to_dict(cfg.lora).items()})
    return out


def _localize(model, forget: list[Tokenized], retain, pad_id: int, cfg: RunConfig, out: Path):
    """Compute (or, on resume, load) the mask and save it with the run."""
    from unlearn.localization.run import localize

    seed = cfg.localize.seed if cfg.localize.seed is not None else cfg.train.seed
    return localize(
        model, forget, retain, pad_id, cfg.localize, seed, out / LOCALIZATION_DIR, reuse=cfg.resume
    )


def _noise(loc, cfg: RunConfig):
    """GRIN's noise on the selected weights, applied by the loop before or after it takes the
    starting model's values (`localize.reference`); None when there is no noise."""
    if cfg.localize.noise_std == 0:
        return None
    from unlearn.localization.noise import inject_noise

    seed = cfg.localize.seed if cfg.localize.seed is not None else cfg.train.seed
    return lambda model: inject_noise(model, loc.mask, cfg.localize.noise_std, seed)


def _manifest(plan: Plan, resolved, seqs: _Sequences, result, metrics, loc, clock, model, out):
    from unlearn.models import cache_root, weights_sha256
    from unlearn.train.setup import autocasts

    cfg = plan.config
    cache = cache_root(cfg.model)
    base = base_model_record(resolved, cache)
    forget = data_record(cfg.forget, plan.forget)
    before = weights_sha256(resolved.path, cache) if resolved.kind == "local" else base["sha256"]
    applied = {
        "request": cfg.request,
        "method": plan.method.name,
        "hyperparameters": dataclasses.asdict(plan.params),
        "metrics": metrics,
        "weights_before": before,
        "weights_after": weights_sha256(out, cache),
    }
    return {
        "command": plan.command,
        "method": plan.method.name,
        "hyperparameters": dataclasses.asdict(plan.params),
        "citation": plan.method.citation,
        "seed": cfg.train.seed,
        "versions": versions(),
        "base_model": base,
        "requests": request_chain(resolved, base, plan.command, forget, applied),
        "data": {
            "forget": forget,
            "retain": data_record(cfg.retain, plan.retain) if plan.retain else None,
            "forget_sequences": len(seqs.forget),
            "nll_check_forget_sequences": len(seqs.check_forget),
            "nll_check_retain_examples": len(seqs.check_retain),
        },
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "seconds": clock.seconds,  # filled in by the caller, once saving is done
        "train_seconds": round(result.wall_seconds, 2),
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "autocast": "bf16" if autocasts(cfg.train, next(model.parameters()).device) else None,
        "metrics": metrics,
        "localization": localization_record(loc),
        "log": str(Path(result.log_path).relative_to(out)),
        "config": resolved_config(cfg, plan.params),
    }
