"""LoRA adapters (the `peft` library): unlearning that trains low-rank adapters, not the weights.

`model.adapter=lora` wraps the loaded model in peft's LoRA before training; every method trains the
adapters only. What a method compares against is the starting model, and with adapters that is
the same network with its adapters switched off (`DisabledAdapters`): no second copy of the
weights for a KL retain term or reference hidden states. Cached reference values (NPO's log-probs)
are taken before the first step, when every adapter is still zero (peft initialises B = 0).

Design choices, each for a reason:
- A method that chooses its own parameters (RMU: the down projections of a few blocks) chooses
  where the adapters go, unless `lora.target_modules` is set: the adapters then cover exactly the
  weights the method would have trained.
- A task vector with adapters negates the adapter delta: only the B matrices are negated and
  scaled (B starts at 0, so B' = -alpha B), keeping A, so the final delta is -alpha (scale B A), the
  task-vector formula applied to the weight delta LoRA learned.
- GRIN (and its controls: a forget-gradient, random or regex mask) chooses where the adapters go:
  its mask selects the top weights by gradient ratio; an adapter spans a whole module, so the
  adapters go on the linear modules where the selection is enriched, i.e. whose share of selected
  weights is at least the share over all linear weights (`modules_from_mask`). No noise is
  injected (it would perturb frozen base weights that no adapter can undo entry by entry), and
  UOE, which trains chosen experts' weights, is refused with adapters.

Output: the adapter folder (`adapter_config.json`, `adapter_model.safetensors`, the tokenizer and
the run's manifest); with `--merge` the output folder is the merged model (`model.safetensors`,
`config.json`: a plain model folder) and the adapter goes to its `adapter/` subfolder. Never both in
one folder: transformers would load such a folder's weights and then apply its adapter again. An adapter folder loads as a model
anywhere a model is taken (eval, localize, restor, forget): its base (the run's manifest names it
and its hash; `model.base` overrides which files) plus the adapter, merged in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from unlearn.errors import UnlearnError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"  # where the adapter goes beside a merged model
#: Target-module shorthand: every linear layer but the output head (peft's "all-linear").
ALL_LINEAR = "all-linear"


def is_adapter_folder(path: Path) -> bool:
    """A saved adapter without a merged model beside it."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def is_adapted(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(getattr(model, "module", model), PeftModel)


def _linear_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers adapters can go on (the output head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def wrap(model: torch.nn.Module, settings: Any, targets: list[str] | None = None, seed: int = 0):
    """The model with LoRA adapters (peft), ready to train; only the adapters require grad.

    `targets`: module names chosen by the method (used when `lora.target_modules` is the default).
    The A matrices' random start is drawn from `seed` (the run's), not from whatever the global
    generator holds, so two runs in one process start from the same adapters."""
    from peft import LoraConfig, get_peft_model

    wanted: str | list[str] = settings.target_modules
    if targets and wanted == ALL_LINEAR:
        wanted = targets
    check_targets(model, wanted)
    if isinstance(wanted, str) and wanted != ALL_LINEAR:
        wanted = [wanted]
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=wanted,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return get_peft_model(model, config)
    except ValueError as exc:  # e.g. "all-linear" on a model without a known output layer
        first = (str(exc).splitlines() or ["?"])[0][:200]
        raise UnlearnError(
            f"cannot put LoRA adapters on {type(model).__name__} ({first})"
        ) from None


def check_targets(model: torch.nn.Module, wanted: str | list[str]) -> None:
    """One line listing valid names when a target module matches nothing."""
    if wanted == ALL_LINEAR:
        return
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    modules = {name for name, _ in model.named_modules()}
    short = {n.rsplit(".", 1)[-1] for n in modules}
    missing = [t for t in wanted if t not in short and t not in modules]
    if missing:
        valid = ", ".join(_linear_names(model)[:8]) or "none"
        raise UnlearnError(
            f"lora.target_modules entry '{missing[0]}' matches no module of "
            f"{type(model).__name__}; linear layers are named e.g. {valid}"
        )


def method_targets(method, params: Any, model: torch.nn.Module) -> list[str] | None:
    """Module names a method that chooses its own parameters would train (RMU), else None."""
    if method.parameter_mask is None:
        return None
    chosen = method.parameter_mask(model, params)
    return sorted({name.rsplit(".", 1)[0] for name, m in chosen.items() if bool(m.any())})


def modules_from_mask(model: torch.nn.Module, mask: dict[str, torch.Tensor]) -> list[str]:
    """The linear modules (full names) whose share of selected weight entries is at least the
    share over all linear weights of the mask: where the localization concentrates."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    }
    counts: dict[str, tuple[int, int]] = {}
    for name, m in mask.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in linear:
            counts[module] = (int(m.sum()), m.numel())
    selected = sum(s for s, _ in counts.values())
    if not selected:
        raise UnlearnError(
            "the localization selected no weight of a linear layer, so there is nowhere to put "
            "LoRA adapters; widen localize.include or raise localize.top_fraction"
        )
    overall = selected / sum(n for _, n in counts.values())
    return sorted(m for m, (s, n) in counts.items() if s and s / n >= overall)


def delta_names(model: torch.nn.Module) -> list[str]:
    """The adapter tensors whose negation negates the learned weight delta (the B matrices)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n]


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """What the manifest records about the adapters."""
    inner = getattr(model, "module", model)
    cfg = inner.peft_config[inner.active_adapter]
    targets = cfg.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list)) else [targets]
    trainable = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    return {
        "kind": "lora",
        "r": cfg.r,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "target_modules": targets,
        "module_types": sorted({t.rsplit(".", 1)[-1] for t in targets}),
        "trainable_parameters": trainable,
    }


class DisabledAdapters(torch.nn.Module):
    """The starting model: the adapted model run with its adapters switched off, in eval mode,
    without gradients. It stands in for a frozen copy (a KL retain term, reference hidden states:
    `hidden.run` hooks `.module`'s blocks), so no second copy of the weights is kept."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = getattr(model, "module", model)

    def forward(self, **kwargs):
        was = self.module.training
        self.module.eval()
        try:
            with torch.no_grad(), self.module.disable_adapter():
                return self.module(**kwargs)
        finally:
            self.module.train(was)


def save(
    model, tokenizer, out: Path, source: str, merge: bool, state_dict: dict | None = None
) -> torch.nn.Module:
    """Write the adapter (and with `merge` the merged model) into `out` through a staging folder;
    returns the model that now holds the result (the merged one with `merge`). `state_dict`: the
    whole model's tensors when its own are shards (FSDP2); peft keeps the adapter's."""
    inner = getattr(model, "module", model)
    inner.peft_config[inner.active_adapter].base_model_name_or_path = source
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=out))
    try:
        inner.save_pretrained(
            staging / ADAPTER_DIR if merge else staging,
            safe_serialization=True,
            state_dict=state_dict,
        )
        tokenizer.save_pretrained(staging)
        result = inner
        if merge:
            result = inner.merge_and_unload()
            result.save_pretrained(staging, safe_serialization=True)
        if merge and (out / ADAPTER_DIR).exists():
            shutil.rmtree(out / ADAPTER_DIR)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def base_of(folder: Path, override: str | None) -> tuple[str, str | None]:
    """(base model spec, its recorded sha256 or None) of an adapter folder: the run's manifest
    names both; `override` (model.base) replaces the spec, and must hash the same."""
    manifest = folder / "unlearn.json"
    spec, sha = None, None
    if manifest.is_file():
        base = json.loads(manifest.read_text(encoding="utf-8")).get("base_model") or {}
        spec, sha = base.get("spec"), base.get("sha256")
    if spec is None:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        spec = cfg.get("base_model_name_or_path")
    spec = override or spec
    if not spec:
        raise UnlearnError(
            f"adapter folder {folder} does not say which base model it belongs to; pass "
            "model.base=MODEL"
        )
    return spec, sha


def check_base(folder: Path, spec: str, recorded: str | None, actual: str | None) -> None:
    if recorded and actual and recorded != actual:
        raise UnlearnError(
            f"the adapter in {folder} was trained on a base model with sha256 {recorded[:12]}..., "
            f"but {spec} has {actual[:12]}...: an adapter only applies to its own base model"
        )


def merge_into(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """The base with the adapter of `folder` merged into its weights (inference needs no peft)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
