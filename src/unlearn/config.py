"""Typed run configuration: one YAML file plus dotted command-line overrides.

Every section is a dataclass, so a typo (`trian.lr`) is rejected with the list of valid keys
instead of being silently ignored. Values arriving as strings from the command line are coerced
to the field's type by pydantic. The method's hyperparameters are validated against the chosen
method's own dataclass (see `unlearn.methods.build_params`), so `method.beta=0.2` is checked too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError

from unlearn.errors import UnlearnError


@dataclass
class ModelConfig:
    """Which model to start from and how to load it.

    name: hub id, local HF folder, `.gguf` file, or a built-in alias (`smollm2-135m`).
    dtype: "auto" is float32 on CPU (bfloat16 is ~30x slower there) and the checkpoint's dtype
        on a CUDA GPU; a bfloat16 checkpoint on a GPU without bfloat16 runs in float32 (float16
        would overflow its range). `--dry-run` prints the resolved dtype and device.
    device: "auto" is this process's GPU (cuda:LOCAL_RANK under `accelerate launch`), else CPU.
    adapter: "lora" trains LoRA adapters (the `lora` section) instead of the weights.
    base: the base model of an adapter folder given as `name` (default: the one its run's
        manifest names; it must hash the same).
    quantize: "nf4" loads the base model's linear layers in 4-bit NormalFloat with double
        quantization (bitsandbytes; QLoRA, Dettmers et al. 2023) on a CUDA GPU, computing in the
        model's dtype; LoRA adapters (model.adapter=lora) train on the frozen 4-bit base. The
        adapter is saved alone (a merge into 4-bit weights would round it away): load it on the
        full-precision base, as QLoRA does.
    """

    name: str = ""
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    trust_remote_code: bool = False
    cache_dir: str | None = None
    adapter: Literal["none", "lora"] = "none"
    base: str | None = None
    quantize: Literal["none", "nf4"] = "none"


@dataclass
class LoraSettings:
    """LoRA adapters (`model.adapter=lora`, through peft). Defaults: TOFU's LoRA unlearning config
    (locuslab/tofu config/forget_lora.yaml: r 8, alpha 32, dropout 0.05) on every linear layer
    but the output head, as TOFU's `find_all_linear_names` chooses them.

    target_modules: "all-linear", or module names (short, e.g. [q_proj, v_proj], or full)."""

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass
class DataConfig:
    """Where one data set comes from and which columns hold what.

    path: a local json/jsonl/csv/parquet file, or `hub:OWNER/NAME[:CONFIG][:SPLIT]`.
    kind: "qa" (question/answer records), "text" (documents) or "auto" (from the columns).
    preferred_key: the optional column of question/answer records holding the answer to prefer
        over the data's (method `dpo`); read when present, ignored by every other method.
    """

    path: str = ""
    kind: Literal["auto", "qa", "text"] = "auto"
    question_key: str = "question"
    answer_key: str = "answer"
    text_key: str = "text"
    id_key: str | None = None
    limit: int | None = None
    preferred_key: str = "preferred"


@dataclass
class PromptConfig:
    """How question/answer records become token sequences.

    template: "auto" uses the tokenizer's chat template when it has one, "plain" uses
        "Question: ...\\nAnswer: ...".
    system_prompt: "default" leaves the template's own default (if any); "none" passes an empty
        system message; any other text is used as the system message.
    """

    template: Literal["auto", "chat", "plain"] = "auto"
    system_prompt: str = "default"
    max_length: int = 256


@dataclass
class TrainConfig:
    """The shared training loop's settings (fine-tuning and every unlearning method).

    warmup_ratio: share of the optimizer steps spent warming up, in [0, 1]; 1.0 warms up over the
        whole run (TOFU's recipe warms up for one epoch). warmup_steps, when set, wins over it.
    nll_check: measure forget and retain NLL (up to 64 sequences each) before and after training,
        shown by `unlearn forget` and kept in the manifest. It costs 4 forward passes over up to
        128 sequences: 30 s for TOFU forget01 + retain99 with SmolLM2-135M on 2 CPU cores, as
        much as ~6 NPO steps at batch 4 (the manifest's `seconds.nll_check` says what it cost
        you). false skips it.
    gradient_checkpointing: keep only each block's input during the forward pass and recompute
        the rest in the backward pass (non-reentrant torch checkpointing): activation memory
        falls from every block's intermediates to one tensor per block, for about one more
        forward pass of compute. The training forward then runs each batch whole (no shared
        prompt prefix); the numbers are the same up to float rounding.
    sharding: "fsdp2" shards parameters, gradients and optimizer state over the processes of a
        torchrun launch (`unlearn.train.sharding`); "deepspeed" hands them to DeepSpeed ZeRO
        through accelerate (`unlearn.train.deepspeed`); "none" is plain data parallelism (DDP).
    deepspeed: with sharding=deepspeed, the DeepSpeed config: "zero2", "zero3" (shipped in
        unlearn/resources/deepspeed/) or a JSON file; its "auto" values are filled from this
        section (batch counts, gradient_clipping from max_grad_norm, bf16 from the model).
    autocast: "auto" runs the forward passes under bfloat16 autocast on a CUDA GPU that has
        bfloat16 (with model.dtype=auto a float32 checkpoint then trains as float32 weights with
        bfloat16 matmuls, a bfloat16 one as bfloat16; losses are computed in float32 either
        way), and not elsewhere; "bf16" forces it (on CPU it is slow); "none" never.
    logits_chunk: answer positions per chunk of the output layer and its softmax (0: the whole
        [batch, length, vocabulary] logits at once). Chunked, the loss terms and the reference
        passes keep the last hidden states only and project `logits_chunk` answer positions at a
        time, recomputing a chunk's logits in the backward pass (`losses.HeadLogits`): memory for
        logits falls from 3 float32 copies of batch x length x vocabulary (logits, log-softmax,
        gradient) to one chunk's, for one more output-layer matmul in the backward pass. Worth it
        for long documents and large vocabularies; the numbers are the same up to float rounding.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.01
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0
    log_every: int = 1
    keep_checkpoints: bool = False
    progress: bool = True
    nll_check: bool = True
    gradient_checkpointing: bool = False
    sharding: Literal["none", "fsdp2", "deepspeed"] = "none"
    deepspeed: str = "zero2"
    autocast: Literal["auto", "bf16", "none"] = "auto"
    logits_chunk: int = 0

    def num_warmup_steps(self, total: int) -> int:
        """Warm-up optimizer steps for a run of `total`: `warmup_steps` wins over the ratio."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(self.warmup_ratio * total)


#: Parameters never scored by default: embeddings and the output head (tied to the embeddings in
#: many small models) and normalisation scales; see `LocalizeConfig.exclude`.
DEFAULT_LOCALIZE_EXCLUDE = r"embed|lm_head|wte|wpe|norm|ln_"


@dataclass
class LocalizeConfig:
    """Which weights an unlearning run may change, chosen before it starts (GRIN and its controls).

    method: "none" (every weight trains), "grin" (gradient ratio |g_forget| / (|g_retain| + eps)),
        "forget_grad" (|g_forget| only, no ratio), "random" (as many weights as grin, uniformly at
        random), "regex" (every entry of the parameters `include` names), "uoe" (the expert of a
        mixture-of-experts layer the forget data is routed to most, plus a router anchor loss).
    top_fraction: share of the scored weights selected, in (0, 1]. A masked run moves few
        weights, so it needs a larger train.lr than an unmasked one (docs/methods/grin.md).
    select: "global" ranks all scored weights together; "per_tensor" takes top_fraction of each.
    accumulate: how gradients add up over batches: "abs_sum" |sum_b g_b| (the gradient of the
        whole set's mean NLL), "sum_abs" sum_b |g_b|, "squared" sum_b g_b^2 (Fisher-like). The
        last two depend on `batch_size`.
    include / exclude: regexes (re.search) over parameter names. include None scores every weight
        of a linear layer (nn.Linear, transformers' Conv1D) and fused expert tensors; exclude
        drops embeddings, the output head and norms (why: docs/methods/grin.md).
    retain_size: retain examples scored (a seeded sample); None = as many as forget examples.
    eps: added to the retain gradient's magnitude so the ratio stays finite.
    noise_std: Gaussian noise, in units of each tensor's weight std, added to the selected
        weights before fine-tuning (GRIN's noise injection); 0 disables. Off by default: on the
        measured setup every noise level cost utility and bought no forgetting.
    reference: with noise_std > 0, which model every starting-model value a method compares
        against is taken from: "clean" (the model before the noise) or "noised" (after it). It
        applies alike to NPO/DPO log-probs, the KL retain model, UNDIAL's teacher, WHP's labels,
        RMU's frozen activations and the task vector's start (docs/methods/grin.md).
    train_all: after the noise, let every weight train (default: only the selected ones move).
    mask: a saved mask (a `unlearn localize` output folder or its mask.safetensors) used instead
        of scoring; it must come from the same model.
    scores: also save the scores themselves (scores.safetensors, one float32 per scored weight).
    batch_size: sequences per scoring batch.
    seed: seed of the retain sample, the random mask and the noise; None = train.seed.
    uoe_layers: MoE layers whose top expert is unlearned (uoe); None = every MoE layer.
    anchor_weight: weight of UOE's router anchor loss.
    uoe_tokens: which tokens' routing picks the expert: "answer" (labelled tokens) or "all".
    """

    method: Literal["none", "grin", "forget_grad", "random", "regex", "uoe"] = "none"
    # top_fraction 0.05 and noise_std 0: the best of benchmarks/grin.py's sweep (docs/results/grin.md)
    top_fraction: float = 0.05
    select: Literal["global", "per_tensor"] = "global"
    accumulate: Literal["abs_sum", "sum_abs", "squared"] = "abs_sum"
    include: str | None = None
    exclude: str | None = DEFAULT_LOCALIZE_EXCLUDE
    retain_size: int | None = None
    eps: float = 1e-8
    noise_std: float = 0.0
    reference: Literal["clean", "noised"] = "clean"
    train_all: bool = False
    mask: str | None = None
    scores: bool = False
    batch_size: int = 8
    seed: int | None = None
    uoe_layers: int | None = 1
    anchor_weight: float = 1.0
    uoe_tokens: Literal["answer", "all"] = "answer"

    @property
    def active(self) -> bool:
        """Whether a run localizes at all (a method, or a saved mask)."""
        return self.method != "none" or self.mask is not None


def validate_localize(cfg: LocalizeConfig) -> None:
    """One-line errors for settings that would only fail after the model has loaded."""
    import re

    if not 0 < cfg.top_fraction <= 1:
        raise UnlearnError(
            f"localize.top_fraction must be in (0, 1], got {cfg.top_fraction}; e.g. 0.01 selects "
            "1% of the scored weights"
        )
    if not cfg.noise_std >= 0:
        raise UnlearnError(
            f"localize.noise_std must be >= 0 (0 disables noise), got {cfg.noise_std}"
        )
    if not cfg.eps > 0:
        raise UnlearnError(f"localize.eps must be > 0, got {cfg.eps}")
    if cfg.batch_size < 1:
        raise UnlearnError(f"localize.batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.retain_size is not None and cfg.retain_size < 1:
        raise UnlearnError(
            f"localize.retain_size must be at least 1 (or null), got {cfg.retain_size}"
        )
    if cfg.uoe_layers is not None and cfg.uoe_layers < 1:
        raise UnlearnError(
            f"localize.uoe_layers must be at least 1 (or null), got {cfg.uoe_layers}"
        )
    if cfg.anchor_weight < 0:
        raise UnlearnError(f"localize.anchor_weight must be >= 0, got {cfg.anchor_weight}")
    if cfg.method == "regex" and not cfg.include:
        raise UnlearnError(
            "localize.method=regex needs localize.include, a regex of the parameters to train, "
            "e.g. localize.include='layers\\.(4|5|6)\\.mlp\\.'"
        )
    for key in ("include", "exclude"):
        pattern = getattr(cfg, key)
        if pattern is None:
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UnlearnError(
                f"localize.{key} is not a valid regex ({exc}): {pattern!r}"
            ) from None


@dataclass
class RunConfig:
    """Everything one `unlearn forget` (or `unlearn finetune`) run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    forget: DataConfig = field(default_factory=DataConfig)
    retain: DataConfig | None = None
    method: dict[str, Any] = field(default_factory=lambda: {"name": "npo"})
    train: TrainConfig = field(default_factory=TrainConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    output: str = ""
    overwrite: bool = False
    resume: bool = False
    merge: bool = False  # with adapters: also write the merged model into the output folder
    request: str | None = None  # the deletion request this run applies (`unlearn audit`)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "forget": DataConfig,
    "retain": DataConfig,
    "train": TrainConfig,
    "prompt": PromptConfig,
    "localize": LocalizeConfig,
    "lora": LoraSettings,
}
_SCALARS = {"output", "overwrite", "resume", "merge", "request"}


def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build a config dataclass from a dict, rejecting unknown keys and coercing types."""
    if not isinstance(values, dict):
        raise UnlearnError(
            f"config section '{where}' must be a mapping, got {type(values).__name__}"
        )
    valid = _valid_keys(cls)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise UnlearnError(
            f"unknown config key '{where}.{unknown[0]}'; valid keys in '{where}': {', '.join(valid)}"
        )
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise UnlearnError(
            f"bad value for '{where}.{loc}': {err['msg']} (got {err.get('input')!r})"
        ) from None


def _parse_value(raw: str) -> Any:
    """CLI values are YAML scalars: `3` is an int, `null` is None, `true` a bool, else a string."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(
    tree: dict[str, Any],
    overrides: list[str],
    *,
    sections: list[str] | None = None,
    scalars: set[str] | None = None,
) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested dict (a copy).

    `sections`/`scalars` name the valid keys of another config tree (e.g. `unlearn eval`'s);
    by default those of a training run.
    """
    valid_sections = [*_SECTIONS, "method"] if sections is None else sections
    valid_scalars = _SCALARS if scalars is None else scalars
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for item in overrides:
        if "=" not in item:
            raise UnlearnError(
                f"override '{item}' is not of the form key=value (e.g. method.beta=0.2)"
            )
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1:
            if parts[0] not in valid_scalars:
                raise UnlearnError(
                    f"unknown config key '{parts[0]}'; top-level keys: "
                    f"{', '.join([*valid_sections, *sorted(valid_scalars)])}"
                )
            tree[parts[0]] = _parse_value(raw)
            continue
        if len(parts) != 2:
            raise UnlearnError(f"override key '{key}' must be section.key (e.g. train.lr=1e-5)")
        section, name = parts
        if section not in valid_sections:
            raise UnlearnError(
                f"unknown config section '{section}'; valid sections: {', '.join(valid_sections)}"
            )
        current = tree.get(section) or {}
        current = dict(current)
        current[name] = _parse_value(raw)
        tree[section] = current
    return tree


def resolve_tree(
    config: str | Path | dict[str, Any] | None,
    overrides: list[str] | tuple[str, ...],
    fields: dict[str, Any],
    *,
    sections: list[str] | None = None,
    scalars: set[str] | None = None,
    paths: tuple[str, ...] = (),
    names: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Every command's settings, resolved alike: a YAML file (or dict) < explicit arguments <
    dotted `section.key=value` overrides. `paths` / `names` are arguments that fill a section's
    `path` / `name` (`--forget FILE` is `forget.path`); other arguments are top-level keys, or
    are checked as overrides (an unknown one is a one-line error listing the valid keys)."""
    if isinstance(config, dict):
        tree = dict(config)
    else:
        tree = load_yaml(config) if config is not None else {}
    flat = []
    for key, value in fields.items():
        if value is None:
            continue
        if key in paths or key in names:
            field_name = "path" if key in paths else "name"
            tree[key] = {**(tree.get(key) or {}), field_name: str(value)}
        elif scalars is not None and key in scalars:
            tree[key] = value
        else:
            flat.append(f"{key}={value}")
    return apply_overrides(tree, [*flat, *overrides], sections=sections, scalars=scalars)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; a missing file or bad YAML is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise UnlearnError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UnlearnError(f"config file {p} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise UnlearnError(f"config file {p} must be a mapping of sections, not a list or scalar")
    return data


def build_config(tree: dict[str, Any]) -> RunConfig:
    """Turn a nested dict (YAML plus overrides) into a validated RunConfig."""
    valid_top = [*_SECTIONS, "method", *sorted(_SCALARS)]
    unknown = sorted(set(tree) - set(valid_top))
    if unknown:
        raise UnlearnError(
            f"unknown config key '{unknown[0]}'; top-level keys: {', '.join(valid_top)}"
        )
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if tree.get(name) is not None:
            kwargs[name] = build_section(cls, tree[name], name)
    method = tree.get("method") or {}
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict):
        raise UnlearnError("config section 'method' must be a mapping with at least 'name'")
    kwargs["method"] = {"name": "npo", **method}
    for name in _SCALARS:
        if name in tree and tree[name] is not None:
            kwargs[name] = tree[name]
    cfg = RunConfig(**kwargs)
    if not isinstance(cfg.output, str):
        raise UnlearnError("'output' must be a folder path")
    return cfg


def validate_train(train: TrainConfig) -> None:
    """Catch settings that would only fail (or silently do nothing) after the model has loaded."""
    if train.lr <= 0:
        raise UnlearnError(f"train.lr must be positive, got {train.lr}; try train.lr=1e-5")
    if train.batch_size < 1:
        raise UnlearnError(f"train.batch_size must be at least 1, got {train.batch_size}")
    if train.grad_accum < 1:
        raise UnlearnError(f"train.grad_accum must be at least 1, got {train.grad_accum}")
    if train.epochs < 1 and not train.max_steps:
        raise UnlearnError(f"train.epochs must be at least 1, got {train.epochs}")
    if train.max_steps is not None and train.max_steps < 1:
        raise UnlearnError(f"train.max_steps must be at least 1, got {train.max_steps}")
    if not 0 <= train.warmup_ratio <= 1:
        raise UnlearnError(
            f"train.warmup_ratio must be in [0, 1] (1.0 warms up over the whole run), got "
            f"{train.warmup_ratio}"
        )
    if train.warmup_steps is not None and train.warmup_steps < 0:
        raise UnlearnError(f"train.warmup_steps must be >= 0 (or null), got {train.warmup_steps}")
    warms_up = train.warmup_ratio > 0 or bool(train.warmup_steps)
    if warms_up and train.scheduler == "constant":
        raise UnlearnError(
            "train.scheduler=constant ignores warm-up; use train.scheduler=constant_with_warmup, "
            "or drop train.warmup_ratio/warmup_steps"
        )
    if train.max_grad_norm < 0:
        raise UnlearnError("train.max_grad_norm must be >= 0 (0 disables clipping)")
    if train.logits_chunk < 0:
        raise UnlearnError(
            f"train.logits_chunk must be >= 0 (0: no chunking; e.g. 1024), got {train.logits_chunk}"
        )
    if train.logits_chunk and train.sharding == "fsdp2":
        raise UnlearnError(
            "train.logits_chunk does not work with train.sharding=fsdp2 (the output layer's "
            "weights are sharded outside the model's forward); set train.logits_chunk=0"
        )


def validate_adapter(cfg: RunConfig) -> None:
    """Adapter settings that cannot work, refused before the model loads."""
    lora = cfg.lora
    if cfg.merge and cfg.train.sharding != "none":
        raise UnlearnError(
            f"--merge with train.sharding={cfg.train.sharding} is not supported; save the "
            "adapter, then load it (it merges in memory) or run without sharding"
        )
    if cfg.model.quantize != "none":
        _validate_quantized(cfg)
    if cfg.model.adapter == "none":
        if cfg.merge:
            raise UnlearnError("--merge merges trained adapters; it needs model.adapter=lora")
        return
    if lora.r < 1:
        raise UnlearnError(f"lora.r must be at least 1, got {lora.r}")
    if lora.alpha <= 0:
        raise UnlearnError(f"lora.alpha must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise UnlearnError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    loc = cfg.localize
    if not loc.active:
        return
    # GRIN and its controls choose where the adapters go (`unlearn.adapters.modules_from_mask`)
    if loc.method == "uoe":
        raise UnlearnError(
            "localize.method=uoe trains chosen experts' weights, not adapters; use "
            "model.adapter=none with it"
        )
    if loc.noise_std > 0 or loc.train_all:
        raise UnlearnError(
            "with LoRA adapters the localization only chooses the modules that get adapters; "
            "localize.noise_std and localize.train_all act on base weights: leave them at 0/false"
        )
    if lora.target_modules != "all-linear":
        raise UnlearnError(
            "with a localize section the localization chooses lora.target_modules; leave it at "
            "its default (all-linear)"
        )


def _validate_quantized(cfg: RunConfig) -> None:
    if cfg.model.adapter != "lora":
        raise UnlearnError(
            f"model.quantize={cfg.model.quantize} (QLoRA) trains adapters on a frozen 4-bit base; "
            "add model.adapter=lora"
        )
    if cfg.merge:
        raise UnlearnError(
            "--merge into a 4-bit base would round the adapter away; save the adapter (the "
            "default) and load it on the full-precision base"
        )
    if cfg.localize.active:
        raise UnlearnError(
            "a localize section scores gradients of the base weights, which a 4-bit base does "
            "not have; drop model.quantize or the localize section"
        )
    if cfg.train.sharding != "none":
        raise UnlearnError(
            f"model.quantize={cfg.model.quantize} with train.sharding={cfg.train.sharding} is "
            "not supported; run QLoRA on one GPU (or data-parallel, sharding=none)"
        )


def to_dict(cfg: Any) -> Any:
    """A plain, YAML/JSON-ready copy of a config dataclass (for manifests and `--dry-run`)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {k: to_dict(v) for k, v in dataclasses.asdict(cfg).items()}
    return cfg


# ---------------------------------------------------------------------------- `unlearn eval`
# The evaluation's own config tree (engineer C). Defaults follow the TOFU / OpenUnlearning protocol.

#: Token cap of one prompt + answer when evaluating: TOFU's and OpenUnlearning's 512. Training's
#: default is 256 (PromptConfig) to save compute; an evaluation must see whole answers.
EVAL_MAX_LENGTH = 512


@dataclass
class EvalPromptConfig:
    """The prompt of an evaluation.

    template, system_prompt: None uses the evaluated model's own training settings (the `prompt`
        of its unlearn.json), else PromptConfig's defaults, so a fine-tuned model is asked questions
        the way it learned them.
    max_length: EVAL_MAX_LENGTH (512) unless set; sequences cut by it are counted and reported.
    """

    template: Literal["auto", "chat", "plain"] | None = None
    system_prompt: str | None = None
    max_length: int = EVAL_MAX_LENGTH

    def resolve(self, trained: PromptConfig | None) -> PromptConfig:
        """The PromptConfig to evaluate with, given the model's training prompt (if any)."""
        base = trained or PromptConfig()
        return PromptConfig(
            template=self.template or base.template,
            system_prompt=base.system_prompt if self.system_prompt is None else self.system_prompt,
            max_length=self.max_length,
        )


@dataclass
class GenerationConfig:
    """Greedy generation for the ROUGE and keyword metrics (TOFU's / OpenUnlearning's 200 tokens).

    batch_size: rows decoded together (finished rows leave and waiting prompts take their place).
        On SmolLM2 on a 2-core CPU with 200 new tokens, 128 questions decoded at 264 tokens/s with
        128 rows, 206 with 64 and 167 with 32 (identical answers); lower it for a large model on a
        small GPU (the KV cache grows with rows x length).
    """

    max_new_tokens: int = 200
    batch_size: int = 128


@dataclass
class ScoreConfig:
    """Which tokens teacher-forced scoring counts (probability, truth ratio, MIA, memorization).

    end_of_turn: true (default, the TOFU / OpenUnlearning protocol) scores every label token after
        the prompt: the answer, the template's end-of-turn marker and what the template appends
        after it (ChatML: `<|im_end|>` and a newline). false scores the answer text only.
    batch_size: teacher-forced sequences per forward batch (also capped at 4,096 tokens).
    """

    end_of_turn: bool = True
    batch_size: int = 32


@dataclass
class EvalConfig:
    """Everything one `unlearn eval` needs: sections plus the benchmark's top-level keys.

    examples: save the first N rows of each question/answer set (question, reference answer,
        generation) in results.json for `unlearn report --show-examples`; 0 (default) keeps the
        data's text out of results.json.
    reference: the retain model's evaluation folder (the comparison named "retain");
        compare: other named comparisons, NAME=EVAL_DIR (e.g. corrupted=..., before=...).
    retrain_auc: privleak's retrained-model Min-K AUC in MUSE's orientation, when no retain
        evaluation is given (MUSE's published value is used on its whole data otherwise).
    privleak: false leaves privacy leakage out (e.g. the retrained model's own evaluation, which
        is the reference and has none to compare with).
    rouge_stem: stem words before ROUGE (None: the benchmark's own choice: TOFU yes, MUSE no).
    shots: few-shot examples of multiple-choice questions (MMLU's dev rows; 0 = zero-shot).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: EvalPromptConfig = field(default_factory=EvalPromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    benchmark: str = "tofu"
    split: str | None = None
    data_dir: str | None = None
    forget: str | None = None
    retain: str | None = None
    holdout: str | None = None
    reference: str | None = None
    compare: list[str] | None = None
    retrain_auc: float | None = None
    privleak: bool = True
    rouge_stem: bool | None = None
    shots: int = 0
    name: str | None = None
    limit: int | None = None
    mia_gradnorm: bool = False
    examples: int = 0
    output: str = ""
    overwrite: bool = False


#: `unlearn attack`'s attacks: weight quantization (`unlearn.attacks.quantize`, by scheme),
#: relearning (`unlearn.attacks.relearn`) and prompts (`unlearn.attacks.prompts`).
QUANT_ATTACKS = {"quant8": "int8", "quant4": "nf4", "quant4_fp4": "fp4", "quant4_rtn": "rtn4"}
ATTACKS = (*QUANT_ATTACKS, "relearn", "relearn_split", "paraphrase", "fewshot", "jailbreak")


@dataclass
class AttackSettings:
    """The `attack` section of `unlearn attack`.

    names: the attacks, in order (ATTACKS): quant8 (LLM.int8 weights), quant4 (NF4), quant4_fp4,
        quant4_rtn (round-to-nearest, groups of 128); relearn (fine-tune on forget rows, then
        measure them), relearn_split (fine-tune on half of the forget rows, measure the other
        half: Deeb & Roger 2024); paraphrase, fewshot, jailbreak (prompts).
    relearn_examples: forget rows relearned (0: all of them; relearn_split: half, always).
    relearn_steps / relearn_lr / relearn_batch_size: the fine-tuning (Fan et al. 2025 relearn for
        a few epochs or 15 steps; 15 steps at 2e-5 by default).
    relearn_data: a file of related question/answer rows or documents to relearn on instead of
        the forget rows (Hu et al. 2025: loosely related text also restores).
    shots: forget question/answer pairs put before each question (fewshot).
    extra_length: tokens added to prompt.max_length for the prompt attacks' evaluations (their
        prompts are longer; the answers must not be cut off).
    keep_models: keep the attacked models (OUT/attacks/NAME/model) after their evaluation; off by
        default, since each is a full copy of the weights (14 GB for a 7B model in bf16).
    seed: which rows relearning takes and which shots each question gets.
    """

    names: list[str] = field(
        default_factory=lambda: ["quant8", "quant4", "relearn", "paraphrase", "fewshot"]
    )
    relearn_examples: int = 0
    relearn_steps: int = 15
    relearn_lr: float = 2e-5
    relearn_batch_size: int = 4
    relearn_data: str | None = None
    shots: int = 3
    extra_length: int = 256
    keep_models: bool = False
    seed: int = 0


def validate_attack(settings: AttackSettings) -> None:
    unknown = [n for n in settings.names if n not in ATTACKS]
    if unknown:
        raise UnlearnError(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
    if not settings.names:
        raise UnlearnError(f"no attack chosen; pass --attacks with some of {', '.join(ATTACKS)}")
    if settings.relearn_steps < 1 or settings.relearn_lr <= 0 or settings.relearn_batch_size < 1:
        raise UnlearnError(
            "attack.relearn_steps and attack.relearn_batch_size must be >= 1 and "
            "attack.relearn_lr > 0"
        )
    if settings.relearn_examples < 0 or settings.shots < 1:
        raise UnlearnError("attack.relearn_examples must be >= 0 and attack.shots >= 1")


EVAL_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "prompt": EvalPromptConfig,
    "generation": GenerationConfig,
    "score": ScoreConfig,
}
EVAL_SCALARS = {f.name for f in dataclasses.fields(EvalConfig)} - set(EVAL_SECTIONS)


def build_eval_config(tree: dict[str, Any]) -> EvalConfig:
    """Turn a nested dict (YAML plus overrides) into a validated EvalConfig."""
    valid_top = [*EVAL_SECTIONS, *sorted(EVAL_SCALARS)]
    unknown = sorted(set(tree) - set(valid_top))
    if unknown:
        raise UnlearnError(
            f"unknown eval config key '{unknown[0]}'; top-level keys: {', '.join(valid_top)}"
        )
    values: dict[str, Any] = {k: tree[k] for k in EVAL_SCALARS if tree.get(k) is not None}
    for name, cls in EVAL_SECTIONS.items():
        if tree.get(name) is not None:
            values[name] = build_section(cls, tree[name], name)
    cfg: EvalConfig = build_section(EvalConfig, values, "eval")
    _validate_eval(cfg)
    return cfg


def _validate_eval(cfg: EvalConfig) -> None:
    """Settings that would only fail after the model has loaded."""
    checks = [
        (cfg.generation.max_new_tokens >= 1, "generation.max_new_tokens must be at least 1"),
        (cfg.generation.batch_size >= 1, "generation.batch_size must be at least 1"),
        (cfg.score.batch_size >= 1, "score.batch_size must be at least 1"),
        (cfg.prompt.max_length >= 16, "prompt.max_length must be at least 16 (default 512)"),
        (cfg.limit is None or cfg.limit >= 1, "limit must be at least 1 (or unset for all rows)"),
        (cfg.examples >= 0, "examples must be >= 0 (0 saves no data text)"),
        (0 <= cfg.shots <= 5, "shots must be between 0 and 5 (MMLU's dev rows per subject)"),
        (
            cfg.retrain_auc is None or 0.0 < cfg.retrain_auc < 1.0,
            "retrain_auc must be strictly between 0 and 1 (MUSE's orientation, e.g. 0.4772)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UnlearnError(message)
