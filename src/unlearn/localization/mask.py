"""From scores to a mask of selected weights, and the mask as a file that knows its model.

Selection is exact and deterministic: the k-th largest score is found by bisection over the bit
patterns of the (non-negative) float32 scores, which order like the numbers, so no concatenated
copy of all scores is ever made; ties at the threshold go to the earlier weight (parameter order,
then flat index).

`mask.safetensors` holds one bool tensor per scored parameter, named like the model's parameter,
and in its metadata a fingerprint of the model it was computed on (`model_fingerprint`), so it is
refused on another model.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from unlearn.errors import UnlearnError

MASK_FILE = "mask.safetensors"
SCORES_FILE = "scores.safetensors"
_SAMPLE = 1 << 16  # values hashed per tensor for the fingerprint (all of a smaller tensor)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the parameters' names, shapes and values (a strided sample per tensor).

    Values are hashed at bfloat16 precision, so the same checkpoint loaded in float32 or
    bfloat16 has one fingerprint; any fine-tuning changes every sampled value.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}\n".encode())
        flat = p.detach().reshape(-1)
        if flat.numel() > _SAMPLE:
            flat = flat[:: flat.numel() // _SAMPLE][:_SAMPLE]
        h.update(flat.to(device="cpu", dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def _value(bits: int) -> float:
    """The float32 a bit pattern stands for; comparing values (not bits) counts -0.0 as 0."""
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def _count_at_least(scores: list[torch.Tensor], bits: int) -> int:
    return sum(int((s >= _value(bits)).sum()) for s in scores)


def _kth_largest_bits(scores: list[torch.Tensor], k: int) -> int:
    """Bit pattern of the k-th largest value: the largest t with count(score >= t) >= k."""
    lo, hi = 0, 0x7F800000  # 0.0 .. +inf
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count_at_least(scores, mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _check_scores(scores: dict[str, torch.Tensor]) -> None:
    for name, s in scores.items():
        if s.dtype != torch.float32:
            raise ValueError(f"scores must be float32, {name} is {s.dtype}")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise UnlearnError(
                f"localization scores of {name} are negative or not finite; the gradients "
                "overflowed; load the model in float32 (model.dtype=float32)"
            )


def _top_k(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks selecting exactly k entries: everything above the k-th largest value, then the
    earliest entries equal to it."""
    value = _value(_kth_largest_bits(scores, k))
    masks = [s > value for s in scores]
    need = k - sum(int(m.sum()) for m in masks)
    for s, m in zip(scores, masks, strict=True):
        if need <= 0:
            break
        ties = (s == value).reshape(-1).nonzero().squeeze(1)[:need]
        m.view(-1)[ties] = True
        need -= len(ties)
    return masks


def select_top(
    scores: dict[str, torch.Tensor], fraction: float, per_tensor: bool = False
) -> dict[str, torch.Tensor]:
    """The top `fraction` of the scored weights, globally or within each tensor.

    Counts: round(fraction * n), at least 1 (per tensor with per_tensor).
    """
    _check_scores(scores)
    names = list(scores)
    if per_tensor:
        out = {}
        for n in names:
            k = max(1, round(fraction * scores[n].numel()))
            out[n] = _top_k([scores[n]], k)[0]
        return out
    total = sum(s.numel() for s in scores.values())
    k = max(1, round(fraction * total))
    return dict(zip(names, _top_k([scores[n] for n in names], k), strict=True))


def save_mask(
    path: Path, mask: dict[str, torch.Tensor], fingerprint: str, info: dict[str, Any]
) -> None:
    """Write mask.safetensors atomically, with the model fingerprint and `info` as metadata."""
    from safetensors.torch import save_file

    from unlearn.outputs import atomic_path

    meta = {"format": "unlearn-mask", "version": "1", "model_fingerprint": fingerprint}
    meta["info"] = json.dumps(info, sort_keys=True, default=str)
    tensors = {n: m.to(device="cpu", dtype=torch.bool).contiguous() for n, m in mask.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def save_scores(path: Path, scores: dict[str, torch.Tensor], fingerprint: str) -> None:
    from safetensors.torch import save_file

    from unlearn.outputs import atomic_path

    tensors = {n: s.detach().to("cpu").contiguous() for n, s in scores.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"model_fingerprint": fingerprint})


def mask_file(path: str | Path) -> Path:
    """A mask path given as the file or as the folder `unlearn localize` wrote."""
    p = Path(path)
    if p.is_dir():
        p = p / MASK_FILE
    if not p.is_file():
        raise UnlearnError(
            f"no mask at {path}: give the folder `unlearn localize` wrote, or its {MASK_FILE}"
        )
    return p


def load_mask(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(mask, metadata) of a saved mask; a file that is not one is a one-line error."""
    from safetensors import safe_open

    p = mask_file(path)
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
            mask = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise UnlearnError(f"{p} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != "unlearn-mask":
        raise UnlearnError(f"{p} is not a mask written by `unlearn localize` (no mask metadata)")
    return mask, meta


def check_mask(
    mask: dict[str, torch.Tensor], meta: dict[str, str], model: torch.nn.Module, where: str
) -> None:
    """Refuse a mask from another model (fingerprint, names, shapes) or with nothing selected."""
    named = dict(model.named_parameters())
    unknown = [n for n in mask if n not in named]
    if unknown:
        raise UnlearnError(
            f"mask {where} names parameter {unknown[0]!r}, which this model does not have: it was "
            "computed on another model; run `unlearn localize` on this one"
        )
    for n, m in mask.items():
        if tuple(m.shape) != tuple(named[n].shape):
            raise UnlearnError(
                f"mask {where}: {n} has shape {tuple(m.shape)}, the model's parameter "
                f"{tuple(named[n].shape)}; the mask comes from another model"
            )
        if m.dtype != torch.bool:
            raise UnlearnError(f"mask {where}: {n} is {m.dtype}, not bool")
    fingerprint = model_fingerprint(model)
    if meta.get("model_fingerprint") != fingerprint:
        raise UnlearnError(
            f"mask {where} was computed on another model (fingerprint "
            f"{meta.get('model_fingerprint')}, this model {fingerprint}); a mask only fits the "
            "weights it was scored on: run `unlearn localize` on this model"
        )
    if not any(bool(m.any()) for m in mask.values()):
        raise UnlearnError(f"mask {where} selects no weight; nothing could be trained")


_LAYER = re.compile(r"\.(\d+)\.")


def layer_and_module(name: str) -> tuple[str, str]:
    """("12", "mlp.down_proj") for model.layers.12.mlp.down_proj.weight; ("-", name) if no layer."""
    m = _LAYER.search(name)
    if not m:
        return "-", name.removesuffix(".weight")
    return m.group(1), name[m.end() :].removesuffix(".weight")


def summarize(mask: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Where the selected weights live: per tensor, and per layer x module type."""
    tensors = []
    grid: dict[str, dict[str, list[int]]] = {}
    for name, m in mask.items():
        sel, n = int(m.sum()), m.numel()
        tensors.append({"name": name, "selected": sel, "weights": n})
        layer, module = layer_and_module(name)
        cell = grid.setdefault(layer, {}).setdefault(module, [0, 0])
        cell[0] += sel
        cell[1] += n
    selected = sum(t["selected"] for t in tensors)
    scored = sum(t["weights"] for t in tensors)
    return {
        "selected": selected,
        "scored": scored,
        "fraction": selected / max(scored, 1),
        "tensors_with_selection": sum(1 for t in tensors if t["selected"]),
        "tensors": tensors,
        "grid": {
            layer: {mod: {"selected": c[0], "weights": c[1]} for mod, c in mods.items()}
            for layer, mods in grid.items()
        },
    }
