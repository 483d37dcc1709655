"""One training run from a validated config: plan it, load the model, train, save, write the manifest.

`unlearn.api.forget` / `finetune` resolve the config and call `plan_run` then `execute`; the CLI goes
through the same functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from unlearn.config import DataConfig, RunConfig, to_dict, validate_train
from unlearn.data import Example, dataset_hash, load_examples, manifest_entries
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, get_method
from unlearn.methods.base import Method
from unlearn.outputs import (
    CONFIG_FILE,
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    prepare_output,
    save_model,
    versions,
)
from unlearn.prompts import PromptFormatter, Tokenized, collate, tokenize_examples
from unlearn.train.loop import StepCallback, plan_steps, train

#: How many retain examples the before/after NLL check uses (a sample keeps it cheap).
NLL_CHECK_RETAIN = 64


@dataclass
class RunResult:
    """What a run returns: where the model is and the numbers a caller usually wants next."""

    output: Path
    metrics: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """A validated run, before any model is loaded (what `--dry-run` prints)."""

    config: RunConfig
    method: Method
    params: Any
    forget: list[Example]
    retain: list[Example] | None
    command: str

    def describe(self) -> dict[str, Any]:
        from unlearn.models import resolve_model

        resolved = resolve_model(self.config.model)
        n_steps = len(plan_steps(max(len(self.forget), 1), self.config.train))
        return {
            "command": self.command,
            "model": {"spec": resolved.spec, "kind": resolved.kind, "source": resolved.path},
            "method": self.method.name,
            "hyperparameters": dataclasses.asdict(self.params),
            "forget_examples": len(self.forget),
            "retain_examples": len(self.retain) if self.retain is not None else 0,
            "uses_retain": self.method.needs_retain(self.params),
            "keeps_reference_model": self.method.needs_reference_model(self.params),
            "caches_reference_logp": self.method.needs_reference_logp,
            "optimizer_steps": n_steps,
            "output": self.config.output,
        }


def plan_run(cfg: RunConfig, command: str = "forget") -> Plan:
    """Validate everything that can be checked without loading a model."""
    method_cfg = dict(cfg.method)
    method = get_method(method_cfg.pop("name"))
    params = build_params(method, method_cfg)
    validate_train(cfg.train)
    if cfg.prompt.max_length < 8:
        raise UnlearnError(f"prompt.max_length must be at least 8, got {cfg.prompt.max_length}")
    role = "data" if command == "finetune" else "forget"
    forget = load_examples(cfg.forget, role)
    retain = None
    if cfg.retain is not None and cfg.retain.path:
        retain = load_examples(cfg.retain, "retain")
    if command == "forget" and method.needs_retain(params) and retain is None:
        raise UnlearnError(
            f"method '{method.name}' has a retain term (alpha={getattr(params, 'alpha', '?')}), but "
            "no retain data was given; pass --retain FILE, or method.alpha=0 to train without one"
        )
    if not cfg.output:
        raise UnlearnError("no output folder given; pass --output DIR")
    from unlearn.models import resolve_model

    resolve_model(cfg.model)
    return Plan(cfg, method, params, forget, retain, command)


@torch.no_grad()
def mean_nll(
    model: torch.nn.Module, items: list[Tokenized], pad_id: int, batch_size: int = 8
) -> float:
    """Mean per-token NLL of the labelled tokens: the quick "did it forget" number in the manifest."""
    from unlearn.losses import token_logprobs

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(items[start : start + batch_size], pad_id).items()
        }
        labels = batch.pop("labels")
        logp, mask = token_logprobs(model(**batch).logits, labels)
        total -= float(logp.sum())
        count += int(mask.sum())
    model.train(was)
    return total / max(count, 1)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _base_model_record(resolved, source: str) -> dict[str, Any]:
    from unlearn.models import hash_model_files

    record: dict[str, Any] = {"spec": resolved.spec, "kind": resolved.kind}
    if resolved.kind in ("alias", "gguf"):
        record["sha256"] = _file_sha256(Path(resolved.path))
        record["hashed"] = Path(resolved.path).name
    elif resolved.kind == "local":
        record["sha256"] = hash_model_files(source)
    else:
        record["sha256"] = None
        record["note"] = "hub model: identified by id and revision"
    return record


def execute(
    plan: Plan, callbacks: list[StepCallback] | None = None, nll_check: bool = True
) -> RunResult:
    """Load the model, train, save the model and manifest. The input model's files are only read."""
    from unlearn.models import load_model_and_tokenizer, local_folder, resolve_model

    cfg = plan.config
    t0 = time.time()
    resolved = resolve_model(cfg.model)
    model_dir = resolved.path if resolved.kind == "local" else None
    out = prepare_output(cfg.output, model_dir, cfg.overwrite, cfg.resume)
    model, tokenizer, resolved = load_model_and_tokenizer(cfg.model)
    resolved_source = local_folder(resolved, cfg.model)
    pad_id = tokenizer.pad_token_id
    formatter = PromptFormatter(tokenizer, cfg.prompt)

    answers = None
    if plan.method.forget_target == "refusal":
        from unlearn.refusals import load_refusals, pick_refusal

        refusals = load_refusals(getattr(plan.params, "refusals", None))
        if any(e.kind != "qa" for e in plan.forget):
            raise UnlearnError(
                f"method '{plan.method.name}' replaces answers with refusals, so the forget data must "
                "be question/answer records, not documents"
            )
        answers = [pick_refusal(refusals, i, cfg.train.seed) for i in range(len(plan.forget))]
    forget_items = tokenize_examples(plan.forget, formatter, answers)
    retain_items = tokenize_examples(plan.retain, formatter) if plan.retain else None
    if not forget_items:
        raise UnlearnError("the forget data produced no training sequences (documents too short?)")

    # The "did it forget" numbers measure the original answers, not refusal targets.
    check_forget = (
        tokenize_examples(plan.forget, formatter) if answers is not None else forget_items
    )
    check_retain = (retain_items or [])[:NLL_CHECK_RETAIN]
    before: dict[str, float] = {}
    if nll_check and not cfg.resume:
        before = {"forget_nll": mean_nll(model, check_forget, pad_id)}
        if check_retain:
            before["retain_nll"] = mean_nll(model, check_retain, pad_id)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    result = train(
        model,
        plan.method,
        plan.params,
        forget_items,
        cfg.train,
        out,
        pad_id,
        retain=retain_items,
        resume=cfg.resume,
        callbacks=callbacks,
    )
    after: dict[str, float] = {}
    if nll_check:
        after = {"forget_nll": mean_nll(model, check_forget, pad_id)}
        if check_retain:
            after["retain_nll"] = mean_nll(model, check_retain, pad_id)

    save_model(model, tokenizer, out)
    metrics: dict[str, Any] = {"steps": result.steps, "final_losses": result.final_logs}
    if nll_check:
        metrics["nll_before"] = before or None
        metrics["nll_after"] = after
    manifest = {
        "command": plan.command,
        "method": plan.method.name,
        "hyperparameters": dataclasses.asdict(plan.params),
        "citation": plan.method.citation,
        "seed": cfg.train.seed,
        "versions": versions(),
        "base_model": _base_model_record(resolved, resolved_source),
        "data": {
            "forget": _data_record(cfg.forget, plan.forget),
            "retain": _data_record(cfg.retain, plan.retain) if plan.retain else None,
            "forget_sequences": len(forget_items),
            "nll_check_retain_examples": len(check_retain),
        },
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "wall_seconds": round(time.time() - t0, 2),
        "train_seconds": round(result.wall_seconds, 2),
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "metrics": metrics,
        "log": str(Path(result.log_path).relative_to(out)),
        "config": to_dict(cfg),
    }
    atomic_write_json(out / MANIFEST, manifest)
    if not cfg.train.keep_checkpoints:
        import shutil

        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return RunResult(output=out, metrics=metrics, manifest=manifest)


def _data_record(cfg: DataConfig | None, examples: list[Example] | None) -> dict[str, Any]:
    assert cfg is not None and examples is not None
    return {
        "source": cfg.path,
        "kind": examples[0].kind,
        "n": len(examples),
        "sha256": dataset_hash(examples),
        "examples": manifest_entries(examples),
    }
