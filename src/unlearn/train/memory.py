"""The peak memory a run will need per process, estimated before any weight is loaded (what
`unlearn forget --dry-run` prints under "memory").

Everything is counted from the model's configuration (the model built on the meta device, so
parameter counts are exact, adapters and a method's trainable subset included), the run's
settings and the data's real token counts (the run's tokenizer and prompt format):

* weights, gradients and AdamW's two moments of the trainable parameters, divided by the process
  count under FSDP2 (plus the root's unsharded embeddings and head, and two blocks gathered at a
  time);
* frozen copies: a KL retain term's starting model (none with adapters: the same weights with the
  adapters off), RMU's truncated copy, WHP's reinforced copy while it trains;
* cached reference values (NPO's log-probs are nothing; UNDIAL's and WHP's logits are N x T' x V);
* activations of the largest micro-batch this process runs: a Llama-style block keeps about
  11 H + 4 I floats per token in training (each norm's input, normalized and scaled outputs; q,
  and k, v repeated to every head; the attention output and its reshaped copy; the MLP's gate,
  up, activation and product: 12,028 floats per token on SmolLM2 by autograd's saved tensors,
  11 H + 4 I = 12,480), plus for each LoRA module the input after its dropout (and the dropout's
  mask) and A's output; with gradient checkpointing one block input per block plus one block
  recomputed; logits as 3 float32 copies of tokens x vocabulary (logits, log-softmax, gradient)
  or one chunk's with `train.logits_chunk`;
* on CPU, the process as it is before loading (Python, torch, transformers, tokenizer, data),
  read from /proc; weights loaded on CPU are the checkpoint file's pages, resident once read, so
  a method that stops after an early block (RMU) holds only the blocks it runs.

The peak is the largest phase: loading, the reinforced copy's training, a training step. It is an
estimate: allocator caching (glibc's arenas on CPU, the CUDA caching allocator) and kernels'
workspaces are not modelled; `benchmarks/memory_estimate.py` checks it against measured peaks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearn.errors import UnlearnError

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Shapes:
    """What the estimate reads from a model built on the meta device."""

    params: int
    trainable: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    root: int  # parameters outside the decoder blocks (embeddings, final norm, head)
    block: int  # parameters of one decoder block
    eager_heads: int  # attention heads when attention is eager (it keeps T x T probabilities)
    adapter_floats: int  # floats per token per block the LoRA modules keep (dropout output, A x)
    adapter_bytes: int  # and bytes (dropout masks)
    linear: int  # weights of the blocks' linear layers (what a 4-bit base quantizes)


def _meta_model(plan) -> tuple[Any, Any]:
    """(the model on the meta device with the run's adapters, its tokenizer or None)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from unlearn.models import cache_root, converted_folder, resolve_model

    cfg = plan.config.model
    resolved = resolve_model(cfg)
    if resolved.adapter:
        raise UnlearnError(
            "--dry-run estimates memory from a base model, not an adapter folder; pass the base "
            "as model.name and model.adapter=lora"
        )
    common: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    source, gguf = resolved.path, None
    if resolved.kind in ("alias", "gguf"):
        path = Path(resolved.path)
        label = resolved.spec if resolved.kind == "alias" else None
        converted = converted_folder(path, cache_root(cfg), label)
        if (converted / "config.json").is_file():
            source = str(converted)
        else:
            source, gguf = str(path.parent), path.name
    try:
        extra = {"gguf_file": gguf} if gguf else {"revision": cfg.revision}
        config = AutoConfig.from_pretrained(source, **common, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, **common, **extra)
    except (OSError, ValueError) as exc:
        first = (str(exc).splitlines() or ["?"])[0][:160]
        raise UnlearnError(f"--dry-run could not read {cfg.name}'s config ({first})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    if cfg.adapter == "lora":
        from unlearn import adapters

        targets = adapters.method_targets(plan.method, plan.params, model)
        model = adapters.wrap(model, plan.config.lora, targets, plan.config.train.seed)
    return model, tokenizer


def shapes(model: Any, plan) -> Shapes:
    """Counts and sizes of a (meta) model, with the run's trainable parameters."""
    from unlearn.train.hidden import decoder_blocks

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    config = config or model.config
    named = dict(model.named_parameters())
    params = sum(p.numel() for p in named.values())
    trainable = sum(p.numel() for p in named.values() if p.requires_grad)
    method = plan.method
    if method.parameter_mask is not None and not any("lora_" in n for n in named):
        chosen = method.parameter_mask(model, plan.params)
        trainable = sum(named[n].numel() for n in chosen if n in named)
    blocks = list(decoder_blocks(model))
    block = sum(p.numel() for p in blocks[0].parameters()) if blocks else 0
    lora_names = ("lora_A", "lora_B", "lora_embedding")
    linear = sum(
        m.weight.numel()
        for b in blocks
        for n, m in b.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(k in n for k in lora_names)
    )
    floats, masks = 0, 0
    for module in blocks[0].modules() if blocks else []:
        a = getattr(module, "lora_A", None)
        if not a:
            continue
        name = next(iter(a))
        floats += a[name].out_features  # A's output, kept by B
        if not isinstance(module.lora_dropout[name], torch.nn.Identity):
            floats += a[name].in_features  # the dropped-out input, kept by A
            masks += a[name].in_features
    hidden = int(config.hidden_size)
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    return Shapes(
        params=params,
        trainable=trainable,
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
        layers=len(blocks),
        vocab=int(config.vocab_size),
        root=params - block * len(blocks),
        block=block,
        eager_heads=int(config.num_attention_heads) if attn == "eager" else 0,
        adapter_floats=floats,
        adapter_bytes=masks,
        linear=linear,
    )


def _process_rss() -> int:
    """This process's resident memory now, in bytes (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _batch_shape(items: list, per_process: int) -> tuple[int, int, int, int]:
    """(rows, padded length, positions whose logits are kept, answer tokens) of the largest
    micro-batch: the `per_process` longest sequences."""
    if not items:
        return 0, 0, 0, 0
    longest = sorted(items, key=lambda it: len(it.input_ids), reverse=True)[:per_process]
    width = len(longest[0].input_ids)
    kept, answers = 0, 0
    for it in longest:
        labelled = [i for i, x in enumerate(it.labels) if x != -100]
        if labelled:
            kept = max(kept, width - max(labelled[0] - 1, 0))
            answers += len(labelled)
    return len(longest), width, kept or width, answers


def estimate(plan, world: int | None = None) -> dict[str, Any]:
    """The estimated peak per process, in GiB, with its parts and the phase that sets it."""
    from unlearn.models import describe_placement, resolve_model
    from unlearn.prompts import PromptFormatter
    from unlearn.train.recipe import _tokenize

    cfg = plan.config
    train = cfg.train
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    model, tokenizer = _meta_model(plan)
    s = shapes(model, plan)
    placement = describe_placement(cfg.model, resolve_model(cfg.model))
    dtype = placement["dtype"] if placement["dtype"] in BYTES else "float32"
    width = BYTES[dtype]
    on_cpu = placement["device"] == "cpu"
    seqs = _tokenize(plan, PromptFormatter(tokenizer, cfg.prompt), False)
    needs = plan.method.needs(plan.params)
    adapted = cfg.model.adapter != "none"
    shard = world if train.sharding == "fsdp2" else 1
    per_process = -(-train.batch_size // world)

    # under bfloat16 autocast (train.autocast) the activations are bfloat16 whatever the weights
    autocast = train.autocast == "bf16" or (train.autocast == "auto" and not on_cpu)
    act_width = 2 if autocast else width
    # a method reading no logits stops the forward after its deepest block (one process)
    stops = not needs.logits and bool(needs.hidden_layers) and world == 1
    depth = max(needs.hidden_layers) + 1 if stops else s.layers
    weights = s.params * width / shard
    if cfg.model.quantize == "nf4":  # 4 bits + double-quantized scales (QLoRA: 0.127 bit/param)
        weights = (s.params - s.linear) * width + s.linear * 4.127 / 8
    if on_cpu and stops:
        # weights loaded on CPU are the file's pages, resident once read: blocks past the
        # deepest one are never read (the embeddings and head count whole)
        weights = (s.root + depth * s.block) * width
    grads = s.trainable * width / shard
    optimizer = 2 * s.trainable * width / shard
    gathered = (s.root + 2 * s.block) * width if shard > 1 else 0.0

    frozen = 0.0
    if not adapted and needs.retain is not None and needs.retain.kind == "kl":
        frozen += s.params * width / shard
    if not adapted and needs.reference_hidden_layers:  # RMU: embeddings, blocks to its layer
        last = max(needs.reference_hidden_layers)
        frozen += (s.vocab * s.hidden + (last + 1) * s.block) * width / shard

    cached = 0.0
    logit_kinds = [k for k in needs.reference if k in ("logits", "reinforced_logits")]
    for _ in logit_kinds:
        for it in seqs.forget:
            labelled = [i for i, x in enumerate(it.labels) if x != -100]
            kept = len(it.input_ids) - max(labelled[0] - 1, 0) if labelled else 0
            cached += kept * s.vocab * 4
    if "token_logp" in needs.reference:
        cached += sum(len(it.input_ids) for it in seqs.forget) * 4

    def activations(items: list, kl: bool = False) -> float:
        rows, length, kept, answers = _batch_shape(items, per_process)
        tokens = rows * length
        floats = 11 * s.hidden + 4 * s.intermediate + 2 * s.eager_heads * length + s.adapter_floats
        per_token = floats * act_width + s.adapter_bytes
        if train.gradient_checkpointing:
            body = tokens * (depth * s.hidden * act_width + per_token)
        else:
            body = tokens * depth * per_token
        if not needs.logits:
            return body
        if train.logits_chunk:
            projected = min(train.logits_chunk, answers) * s.vocab * 4
            logits = rows * kept * s.hidden * act_width + 3 * projected
        else:
            logits = 3 * rows * kept * s.vocab * 4
        if kl:  # the starting model's logits and the KL's temporaries
            logits *= 2 if train.logits_chunk else 3
        return body + logits

    forget_act = activations(seqs.forget)
    if seqs.second is not None:
        forget_act += activations(seqs.second)
    kl = needs.retain is not None and needs.retain.kind == "kl"
    retain_act = activations(seqs.retain or [], kl) if needs.retain is not None else 0.0
    step_peak = max(forget_act, grads + retain_act, grads)
    runtime = _process_rss() if on_cpu else 0
    parts = {
        "runtime": runtime,
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "frozen_copies": frozen,
        "cached_reference": cached,
        "sharding_gathered": gathered,
        "activations_forget": forget_act,
        "activations_retain": retain_act,
    }
    phases = {
        "train": runtime + weights + optimizer + frozen + cached + gathered + step_peak,
        # on CPU the loaded weights are the file's pages, resident as they are read
        "load": runtime + weights,
    }
    if needs.reinforce is not None:  # a trained copy of the whole model, before the first step
        copy = s.params * width
        phases["reinforce"] = runtime + weights + 4 * copy + forget_act
    phase = max(phases, key=lambda k: phases[k])

    def gib(v: float) -> float:
        return float(f"{v / GIB:.4g}")

    return {
        "peak_gib": gib(phases[phase]),
        "phase": phase,
        "phases_gib": {k: gib(v) for k, v in phases.items()},
        "parts_gib": {k: gib(v) for k, v in parts.items()},
        "processes": world,
        "device": placement["device"],
        "dtype": dtype,
        "parameters": s.params,
        "trainable_parameters": s.trainable,
        "note": "an estimate per process; allocator caching and kernel workspaces are not counted",
    }
