"""A run validated before any model is loaded: the method, its hyperparameters, the data and the
settings, and what `--dry-run` prints. `recipe.execute` runs it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn.config import (
    RunConfig,
    to_dict,
    validate_adapter,
    validate_localize,
    validate_train,
)
from unlearn.data import Example, load_examples
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, get_method
from unlearn.methods.base import Method
from unlearn.train.schedule import plan_steps


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
        """Everything the run will do, resolved: model placement, method, prompt and training."""
        from unlearn.models import describe_placement, resolve_model

        cfg = self.config
        resolved = resolve_model(cfg.model)
        n_steps = len(plan_steps(max(len(self.forget), 1), cfg.train))
        return {
            "command": self.command,
            "model": {
                "spec": resolved.spec,
                "kind": resolved.kind,
                "source": resolved.path,
                **describe_placement(cfg.model, resolved),
            },
            "method": self.method.name,
            "hyperparameters": dataclasses.asdict(self.params),
            "prompt": to_dict(cfg.prompt),
            "train": {**to_dict(cfg.train), "warmup_steps": cfg.train.num_warmup_steps(n_steps)},
            "forget_examples": len(self.forget),
            "retain_examples": len(self.retain) if self.retain is not None else 0,
            "uses_retain": self.method.needs_retain(self.params),
            "keeps_reference_model": self.method.needs_reference_model(self.params),
            "caches_reference_values": list(self.method.needs(self.params).reference),
            "optimizer_steps": n_steps,
            "localize": to_dict(cfg.localize) if cfg.localize.active else None,
            "output": self.config.output,
            "memory": self.memory(),
        }

    def memory(self) -> dict[str, Any]:
        """The estimated peak memory per process (`unlearn.train.memory`), or why there is none
        (a hub model's config cannot be read offline, an adapter folder as the model)."""
        from unlearn.train.memory import estimate

        try:
            return estimate(self)
        except UnlearnError as exc:
            return {"peak_gib": None, "error": str(exc)}


def plan_run(cfg: RunConfig, command: str = "forget") -> Plan:
    """Validate everything that can be checked without loading a model."""
    method_cfg = dict(cfg.method)
    method = get_method(method_cfg.pop("name"))
    params = build_params(method, method_cfg)
    validate_train(cfg.train)
    validate_localize(cfg.localize)
    validate_adapter(cfg)
    if cfg.model.quantize != "none":
        from unlearn.models import check_quantizable

        check_quantizable(cfg.model)
    if cfg.train.sharding == "deepspeed":
        from unlearn.train import deepspeed

        deepspeed.validate(cfg, method, params)
    if cfg.localize.active and command != "forget":
        raise UnlearnError("the localize section applies to `unlearn forget` only")
    if cfg.localize.mask is not None:
        from unlearn.localization.mask import mask_file

        mask_file(cfg.localize.mask)  # a missing mask fails now, not after loading the model
    if cfg.prompt.max_length < 8:
        raise UnlearnError(f"prompt.max_length must be at least 8, got {cfg.prompt.max_length}")
    role = "data" if command == "finetune" else "forget"
    forget = load_examples(cfg.forget, role)
    retain = None
    if cfg.retain is not None and cfg.retain.path:
        retain = load_examples(cfg.retain, "retain")
    if method.needs(params).second_target and method.second_targets is not None:
        method.second_targets(forget, params, cfg.train.seed)  # a missing answer fails here
    if command == "forget" and method.forget_targets is not None:
        method.forget_targets(
            forget, params, cfg.train.seed
        )  # documents fail here, not after loading
    if command == "forget" and method.needs_retain(params) and retain is None:
        raise UnlearnError(
            f"method '{method.name}' has a retain term (alpha={getattr(params, 'alpha', '?')}), but "
            "no retain data was given; pass --retain FILE, or method.alpha=0 to train without one"
        )
    if not cfg.output:
        raise UnlearnError("no output folder given; pass --output DIR")
    if cfg.localize.active:
        from unlearn.localization.run import check_retain

        check_retain(cfg.localize, retain is not None)
    from unlearn.models import resolve_model

    resolve_model(cfg.model)
    total = len(plan_steps(max(len(forget), 1), cfg.train))
    counted = all(e.kind == "qa" for e in forget)  # a document may yield several sequences
    if counted and (cfg.train.warmup_steps or 0) > total:
        raise UnlearnError(
            f"train.warmup_steps={cfg.train.warmup_steps} is more than the run's {total} optimizer "
            f"steps, so the learning rate would never reach train.lr; use at most {total} (or "
            "train.warmup_ratio=1.0)"
        )
    return Plan(cfg, method, params, forget, retain, command)


def resolved_config(cfg: RunConfig, params: Any) -> dict[str, Any]:
    """The run's config with every method hyperparameter filled in (what config.yaml holds).

    Written so that `--config out/config.yaml` reruns exactly this run, even after a default changes.
    """
    tree = to_dict(cfg)
    tree["method"] = {
        "name": cfg.method["name"],
        **json.loads(json.dumps(dataclasses.asdict(params))),
    }
    return tree
