"""One training run from a validated config: plan it, load the model, train, save, write the manifest.

`unlearn.api.forget` / `finetune` resolve the config and call `plan_run` then `execute`; the CLI goes
through the same functions.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from unlearn.config import DataConfig, RunConfig, to_dict, validate_localize, validate_train
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

#: How many forget and retain sequences the before/after NLL check uses at most (the first ones):
#: its cost stays bounded for large forget sets; `unlearn eval` is the full measurement.
NLL_CHECK_SEQUENCES = 64


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
        }


def plan_run(cfg: RunConfig, command: str = "forget") -> Plan:
    """Validate everything that can be checked without loading a model."""
    method_cfg = dict(cfg.method)
    method = get_method(method_cfg.pop("name"))
    params = build_params(method, method_cfg)
    validate_train(cfg.train)
    validate_localize(cfg.localize)
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


@torch.no_grad()
def mean_nll(
    model: torch.nn.Module, items: list[Tokenized], pad_id: int, batch_size: int = 8
) -> float:
    """Mean per-token NLL of the labelled tokens: the quick "did it forget" number in the manifest.

    Cheap by construction: sequences are batched in length order (little padding), the vocabulary
    projection runs only from the first position that predicts a labelled token
    (`logits_to_keep`), not over system prompt and question, and the tokens every sequence starts
    with (chat template, system prompt: 24 of SmolLM2's ~80 on TOFU) run once for the whole call,
    their keys/values reused by every batch.
    """
    from unlearn.losses import IGNORE_INDEX, token_logprobs

    if not items:
        return 0.0
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    trims = "logits_to_keep" in inspect.signature(model.forward).parameters
    order = sorted(items, key=lambda t: len(t.input_ids))
    head = _shared_head(model, order, device) if trims else None
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(order[start : start + batch_size], pad_id).items()
        }
        labels = batch.pop("labels")
        first = 0
        if trims:
            labelled = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
            first = int(labelled.min()) if len(labelled) else 0
            batch["logits_to_keep"] = labels.size(1) - first
        shared = head is not None and first >= head[0]  # else this batch has no labels at all
        logits = _after_head(model, batch, head) if shared else model(**batch).logits
        logp, mask = token_logprobs(logits, labels[:, first:])
        total -= float(logp.sum())
        count += int(mask.sum())
    model.train(was)
    return total / max(count, 1)


#: Fewer common first tokens than this are not worth a separate forward.
_MIN_SHARED = 4


def _shared_head(model: torch.nn.Module, items: list[Tokenized], device: torch.device):
    """(n, KV cache) of the first n tokens every item starts with, run once; None if not worth it.

    n stops before the first position whose logits predict a labelled token (those must come out of
    the batch's own forward), so documents, labelled from their first token, share nothing.
    """
    from unlearn.eval.records.prefix import shareable
    from unlearn.kvcache import cache_of

    params = inspect.signature(model.forward).parameters
    if not items or ("cache" not in params and "past_key_values" not in params):
        return None
    first = items[0].input_ids
    limit = min(len(first), *(_first_scored(t) - 1 for t in items))
    n = 0
    while n < limit and all(len(t.input_ids) > n and t.input_ids[n] == first[n] for t in items):
        n += 1
    if n < _MIN_SHARED:
        return None
    out = model(input_ids=torch.tensor([first[:n]], device=device), use_cache=True)
    cache = cache_of(out)
    return (n, cache) if shareable(cache) else None


def _first_scored(item: Tokenized) -> int:
    """Index of the first labelled token after position 0 (its logits sit one position earlier)."""
    from unlearn.losses import IGNORE_INDEX

    for j in range(1, len(item.labels)):
        if item.labels[j] != IGNORE_INDEX:
            return j
    return len(item.labels)


def _after_head(model: torch.nn.Module, batch: dict[str, torch.Tensor], head) -> torch.Tensor:
    """Logits of a collated batch whose rows all start with the head's n tokens: only the rest
    runs, after a per-batch copy of the head's cache (the forward appends to the copy)."""
    from unlearn.eval.records.prefix import cache_rows
    from unlearn.kvcache import past

    n, cache = head
    ids = batch["input_ids"]
    rows, width = ids.shape
    zeros = torch.zeros(rows, dtype=torch.long, device=ids.device)
    positions = torch.arange(n, width, device=ids.device).expand(rows, -1)
    return model(
        input_ids=ids[:, n:],
        attention_mask=batch["attention_mask"],
        position_ids=positions,
        use_cache=True,
        logits_to_keep=batch["logits_to_keep"],
        **past(model, cache_rows(cache, zeros)),
    ).logits


def _base_model_record(resolved, source: str, cache: Path) -> dict[str, Any]:
    from unlearn.models import file_sha256, hash_model_files

    record: dict[str, Any] = {"spec": resolved.spec, "kind": resolved.kind}
    if resolved.kind in ("alias", "gguf"):
        record["sha256"] = file_sha256(resolved.path, cache)
        record["hashed"] = Path(resolved.path).name
    elif resolved.kind == "local":
        record["sha256"] = hash_model_files(source, cache)
    else:
        record["sha256"] = None
        record["note"] = "hub model: identified by id and revision"
    return record


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


def execute(
    plan: Plan, callbacks: list[StepCallback] | None = None, nll_check: bool | None = None
) -> RunResult:
    """Load the model, train, save the model and manifest. The input model's files are only read.

    `nll_check` (default: `train.nll_check`) measures forget/retain NLL before and after training.
    Every phase's wall time goes into the manifest's `seconds`, so the cost around the loop shows.
    """
    from unlearn.models import cache_root, load_model_and_tokenizer, local_folder, resolve_model

    cfg = plan.config
    nll_check = cfg.train.nll_check if nll_check is None else nll_check
    clock = _Clock()
    resolved = resolve_model(cfg.model)
    model_dir = resolved.path if resolved.kind == "local" else None
    out = prepare_output(cfg.output, model_dir, cfg.overwrite, cfg.resume)
    model, tokenizer, resolved = load_model_and_tokenizer(cfg.model)
    resolved_source = local_folder(resolved, cfg.model)
    clock.lap("load")
    pad_id = tokenizer.pad_token_id
    formatter = PromptFormatter(tokenizer, cfg.prompt)

    # Forget targets are the method's declaration: its hooks may replace the data's answers
    # (refusals) or add a second answer per example (DPO); see unlearn.methods.base.Method.
    seed, method = cfg.train.seed, plan.method
    answers = (
        method.forget_targets(plan.forget, plan.params, seed) if method.forget_targets else None
    )
    forget_items = tokenize_examples(plan.forget, formatter, answers)
    second_items = None
    if method.needs(plan.params).second_target and method.second_targets is not None:
        second = method.second_targets(plan.forget, plan.params, seed)
        second_items = tokenize_examples(plan.forget, formatter, second)
    retain_items = tokenize_examples(plan.retain, formatter) if plan.retain else None
    if not forget_items:
        raise UnlearnError("the forget data produced no training sequences (documents too short?)")

    # The "did it forget" numbers measure the original answers, not refusal targets.
    n_check = NLL_CHECK_SEQUENCES if nll_check else 0
    check_forget = (
        tokenize_examples(plan.forget[:n_check], formatter) if answers is not None else forget_items
    )[:n_check]
    check_retain = (retain_items or [])[:n_check]
    clock.lap("tokenize")
    # The forget half of "before" is read off the loop's reference pass when it scores the same
    # sequences on the same starting model (NPO & co.): no second pass over them.
    from_reference = nll_check and not cfg.resume and _reference_covers(plan, answers is not None)
    before: dict[str, float] = {}
    if nll_check and not cfg.resume:
        before = _nll_pair(model, [] if from_reference else check_forget, check_retain, pad_id)
    clock.lap("nll_check")

    out.mkdir(parents=True, exist_ok=True)
    localization = None
    if cfg.localize.active:  # before config.yaml: a mask refused here leaves nothing to clean up
        # Scored on the data's own answers (what the model memorised), not on refusal targets.
        scored = tokenize_examples(plan.forget, formatter) if answers is not None else forget_items
        localization = _localize(model, scored, retain_items, pad_id, cfg, out)
        clock.lap("localize")
    config_text = yaml.safe_dump(resolved_config(cfg, plan.params), sort_keys=False)
    atomic_write_text(out / CONFIG_FILE, config_text)
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
        second=second_items,
        mask=localization.train_mask if localization else None,
        anchor=localization.anchor if localization else None,
        prepared=method.prepare(plan.params, tokenizer) if method.prepare else None,
    )
    clock.lap("train")
    if from_reference:  # (TrainResult has `reference`: checked by _reference_covers)
        value = _reference_nll(getattr(result, "reference", {}), check_forget)
        result.reference = {}  # it may hold [T, V] logits: freed before the after-check
        before = {"forget_nll": value, **before} if value is not None else before
    after: dict[str, float] = {}
    if nll_check:
        after = _nll_pair(model, check_forget, check_retain, pad_id)
    clock.lap("nll_check")

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
        "base_model": _base_model_record(resolved, resolved_source, cache_root(cfg.model)),
        "data": {
            "forget": _data_record(cfg.forget, plan.forget),
            "retain": _data_record(cfg.retain, plan.retain) if plan.retain else None,
            "forget_sequences": len(forget_items),
            "nll_check_forget_sequences": len(check_forget),
            "nll_check_retain_examples": len(check_retain),
        },
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "seconds": clock.seconds,  # filled in below, once saving is done
        "train_seconds": round(result.wall_seconds, 2),
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "metrics": metrics,
        "localization": _localization_record(localization),
        "log": str(Path(result.log_path).relative_to(out)),
        "config": resolved_config(cfg, plan.params),
    }
    clock.lap("save")
    clock.seconds["reference"] = round(result.reference_seconds, 2)  # part of "train"
    manifest["wall_seconds"] = clock.total()
    atomic_write_json(out / MANIFEST, manifest)  # last: its presence means the run finished
    if not cfg.train.keep_checkpoints:
        import shutil

        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return RunResult(output=out, metrics=metrics, manifest=manifest)


#: Where `unlearn forget` writes its localization (mask, summary, heatmap) inside the run folder.
LOCALIZATION_DIR = "localization"


def _localize(model, forget: list[Tokenized], retain, pad_id: int, cfg: RunConfig, out: Path):
    """Compute (or load) the mask, save it with the run, inject the noise into the model."""
    from unlearn.localization.noise import inject_noise
    from unlearn.localization.run import localize

    seed = cfg.localize.seed if cfg.localize.seed is not None else cfg.train.seed
    loc = localize(
        model, forget, retain, pad_id, cfg.localize, seed, out / LOCALIZATION_DIR, reuse=cfg.resume
    )
    loc.noise = inject_noise(model, loc.mask, cfg.localize.noise_std, seed)
    return loc


def _localization_record(loc) -> dict[str, Any] | None:
    if loc is None:
        return None
    keep = ("method", "selected", "scored", "fraction", "seconds", "peak_memory_mb", "experts")
    record = {k: loc.info[k] for k in keep if k in loc.info}
    record["folder"] = LOCALIZATION_DIR
    record["train_all"] = loc.train_all
    record["noise_tensors"] = len(loc.noise)
    if "loaded_from" in loc.info:
        record["loaded_from"] = loc.info["loaded_from"]
    return record


class _Clock:
    """Wall seconds per phase of a run (a phase seen twice, like the NLL check, adds up)."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self.mark, 2)
        self.mark = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


def _nll_pair(
    model: torch.nn.Module, forget: list[Tokenized], retain: list[Tokenized], pad_id: int
) -> dict[str, float]:
    values = {"forget_nll": mean_nll(model, forget, pad_id)} if forget else {}
    if retain:
        values["retain_nll"] = mean_nll(model, retain, pad_id)
    return values


#: Reference values (`Method.needs().reference`) from which a sequence's answer NLL can be read.
_NLL_KINDS = ("sequence_logp", "token_logp", "logits")


def _reference_covers(plan: Plan, new_answers: bool) -> bool:
    """Whether the loop's reference pass gives the before-training forget NLL of the check.

    It must score the check's own sequences (the data's answers, not refusal targets) on the model
    as loaded (no localization noise injected before it), and the loop must hand its values back
    (`TrainResult.reference`).
    """
    from unlearn.train.loop import TrainResult

    if new_answers or plan.config.localize.active:
        return False
    if "reference" not in {f.name for f in dataclasses.fields(TrainResult)}:
        return False
    return any(k in _NLL_KINDS for k in plan.method.needs(plan.params).reference)


def _reference_nll(values: dict[str, list[torch.Tensor]], items: list[Tokenized]) -> float | None:
    """Mean NLL over the labelled tokens of `items` (the first forget sequences) from the starting
    model's cached values: what `mean_nll` measures, up to float rounding."""
    from unlearn.losses import IGNORE_INDEX, token_logprobs
    from unlearn.train.reference import LOGITS_START

    kind = next((k for k in _NLL_KINDS if len(values.get(k, ())) >= len(items)), None)
    if kind is None or not items:
        return None
    total = 0.0
    for i, item in enumerate(items):
        value = values[kind][i]
        if kind == "logits":  # [T', V] from position `start` on: they predict labels start+1...
            start = int(values[LOGITS_START][i]) if LOGITS_START in values else 0
            labels = torch.tensor([item.labels[start:]], device=value.device)
            value = token_logprobs(value[None], labels)[0]
        total -= float(value.sum())
    count = sum(sum(1 for x in t.labels[1:] if x != IGNORE_INDEX) for t in items)
    return total / max(count, 1)


def _data_record(cfg: DataConfig | None, examples: list[Example] | None) -> dict[str, Any]:
    assert cfg is not None and examples is not None
    return {
        "source": cfg.path,
        "kind": examples[0].kind,
        "n": len(examples),
        "sha256": dataset_hash(examples),
        "examples": manifest_entries(examples),
    }
