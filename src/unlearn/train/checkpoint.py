"""Checkpoints that `--resume` can trust: atomic, labelled with the completed step and the config.

Each checkpoint folder holds accelerate's state plus `progress.json` = {"step": completed optimizer
steps, "config": the resolved settings that decide what the remaining steps compute}. Weights are
safetensors (`model.safetensors`), never a pickle a resume must unpickle; accelerate reads the
optimizer, scheduler and random states back with torch's weights-only loader. A run that trains
adapters checkpoints the adapters only (`register_hooks`): its frozen base is the input model,
which the run never changes, so a 7B base is not copied at every checkpoint. On resume a
changed setting is refused with the list of differences, except the few that are safe to change
mid-run (`ALLOWED`), which are applied explicitly and announced: restoring the optimizer and
scheduler state would otherwise silently keep the old learning rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from unlearn.config import TrainConfig
from unlearn.errors import UnlearnError
from unlearn.prompts import Tokenized

CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"
#: Settings that may differ on --resume: they change no batch and no gradient of the steps left
#: (lr changes the update size, and is applied to the restored optimizer and scheduler).
ALLOWED = (
    "train.lr",
    "train.log_every",
    "train.save_every",
    "train.progress",
    "train.keep_checkpoints",
    "train.nll_check",
)

log = logging.getLogger("unlearn")


def items_hash(items: list[Tokenized] | None) -> str | None:
    """A digest of the token ids and labels: any change of data, prompt or tokenizer changes it."""
    if items is None:
        return None
    h = hashlib.sha256()
    for t in items:
        h.update(json.dumps([t.input_ids, t.labels]).encode())
    return h.hexdigest()[:16]


def run_fingerprint(
    cfg: TrainConfig, method: str, params: Any, data: dict[str, str | None]
) -> dict[str, Any]:
    """The flat {dotted key: value} of everything a checkpoint's remaining steps depend on."""
    out: dict[str, Any] = {f"train.{k}": v for k, v in dataclasses.asdict(cfg).items()}
    out["method.name"] = method
    if dataclasses.is_dataclass(params):
        out.update({f"method.{k}": v for k, v in dataclasses.asdict(params).items()})
    out.update({f"data.{k}": v for k, v in data.items()})
    return json.loads(json.dumps(out, default=str))  # as it reads back from JSON


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, now)} for every setting that differs."""
    keys = sorted(set(saved) | set(now))
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def check_resume(saved: dict[str, Any] | None, now: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """The allowed changes to apply; a refused change raises one line listing all of them."""
    if saved is None:  # a checkpoint from before configs were saved: nothing to compare
        log.warning("checkpoint %s records no config; resuming without checking it", ckpt)
        return {}
    changes = config_changes(saved, now)
    refused = {k: v for k, v in changes.items() if k not in ALLOWED}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise UnlearnError(
            f"cannot --resume from {ckpt}: the config changed since it was saved ({listed}); "
            f"restore those settings, or start over with --overwrite (only {', '.join(ALLOWED)} "
            "may change on resume)"
        )
    return {k: b for k, (a, b) in changes.items()}


def latest_checkpoint(output: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint and its completed-step count, or None."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return None
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and (d / PROGRESS).is_file():
            found.append((int(d.name.split("-", 1)[1]), d))
    if not found:
        return None
    step, path = max(found)
    return path, step


def read_progress(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / PROGRESS).read_text())


def save_checkpoint(
    accelerator,
    output: Path,
    step: int,
    fingerprint: dict[str, Any],
    method_state: dict[str, float] | None = None,
    shard_save: Any = None,
) -> Path:
    """Write `step-N` atomically (staging folder, then rename), then drop older checkpoints only.

    `method_state` (a method's floats carried between steps, e.g. PDU's dual variable) is stored
    in progress.json beside the step, so a resumed run continues with it."""
    root = output / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    if final.exists():
        return final
    staging = root / f".tmp-step-{step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    if shard_save is not None:  # FSDP2: every process writes its shards (torch DCP)
        shard_save(staging)
    if accelerator.is_main_process:
        progress: dict[str, Any] = {"step": step, "config": fingerprint}
        if method_state:
            progress["method_state"] = method_state
        (staging / PROGRESS).write_text(json.dumps(progress))
        os.replace(staging, final)
        for d in root.iterdir():
            if d.name.startswith("step-") and int(d.name.split("-", 1)[1]) < step:
                shutil.rmtree(d, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """On resume, drop log lines past the checkpoint so the log reads like one clean run."""
    if not path.is_file():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in kept if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return [r for r in kept if "step" in r]


def read_log(path: Path, step: int) -> list[dict[str, Any]]:
    """The step records of the log up to `step` (what `truncate_log` keeps)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "step" in r and r["step"] <= step]


def apply_allowed(changes: dict[str, Any], optimizer, scheduler) -> None:
    """Make a changed train.lr real in the restored optimizer and scheduler.

    The scheduler's multiplier at the current step is kept; its base learning rates (and the param
    groups' initial_lr) become the new lr, and every group's current lr is recomputed from them.
    """
    if "train.lr" not in changes:
        return
    lr = float(changes["train.lr"])
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the torch scheduler
    inner.base_lrs = [lr for _ in inner.base_lrs]
    factors = [f(inner.last_epoch) for f in inner.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor
    inner._last_lr = [g["lr"] for g in optimizer.param_groups]


def check_resume_settings(output: Path, settings: dict[str, Any]) -> None:
    """Refuse a resume whose `settings` (dotted keys outside train/method, e.g. `localize.*`)
    differ from the checkpoint's, before the run writes anything (config.yaml included)."""
    found = latest_checkpoint(output)
    if found is None:
        return
    saved = read_progress(found[0]).get("config")
    if saved is None:
        return
    now = json.loads(json.dumps(settings, default=str))
    prefixes = {k.split(".", 1)[0] + "." for k in now}
    ours = {k: v for k, v in saved.items() if any(k.startswith(p) for p in prefixes)}
    check_resume(ours, now, found[0])


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def register_hooks(accelerator) -> None:
    """Checkpoint only the trainable tensors of a model that trains adapters, and load them back
    (the frozen base comes from the input model, as at the start of the run)."""
    from unlearn.adapters import is_adapted

    def save_trainable(models, weights, output_dir) -> None:
        for i, model in enumerate(models):
            inner = accelerator.unwrap_model(model)
            if is_adapted(inner) and i < len(weights):
                keep = _trainable(inner)
                weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def load_trainable(models, input_dir) -> None:
        from safetensors.torch import load_file

        for i in reversed(range(len(models))):
            inner = accelerator.unwrap_model(models[i])
            if not is_adapted(inner):
                continue
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            state = load_file(str(Path(input_dir) / name))
            missing = _trainable(inner) - set(state)
            if missing:
                raise UnlearnError(
                    f"checkpoint {input_dir} lacks adapter tensor {sorted(missing)[0]}; it was "
                    "written by another run: start over with --overwrite"
                )
            inner.load_state_dict(state, strict=False)
            models.pop(i)  # loaded here: accelerate skips it

    accelerator.register_save_state_pre_hook(save_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)
