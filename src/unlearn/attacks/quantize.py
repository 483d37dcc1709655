"""Weight quantization as an attack: does rounding the unlearned weights bring the forgotten
answers back? (Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025,
arXiv:2410.16454: 4-bit quantization of MUSE-unlearned Llama-2-7B models restored on average 83%
of the forgotten knowledge, against 21% in full precision.)

Unlearning moves weights little; a quantizer whose grid is coarser than the move maps unlearned and
original weights to the same values. The attack quantizes every linear layer of the decoder blocks
(what bitsandbytes' 8-bit and 4-bit loading quantize: embeddings and the output head stay as they
are) and writes the dequantized weights back: a weight-only quantized model computes exactly this
(it dequantizes before its matmul), and the result is an ordinary model every evaluation loads.

Schemes (bitsandbytes' own quantizers, which run on CPU and GPU):
  int8: LLM.int8's weight quantization, absmax per output row to int8 (Dettmers et al. 2022;
        bitsandbytes `int8_vectorwise_quant`), what `load_in_8bit` stores;
  nf4:  4-bit NormalFloat in blocks of 64 (QLoRA, Dettmers et al. 2023), `load_in_4bit`'s
        bnb_4bit_quant_type="nf4";
  fp4:  4-bit float in blocks of 64, `load_in_4bit`'s default type;
  rtn4: symmetric round-to-nearest to 4 bits in groups of 128 (by hand: scale = absmax / 7 per
        group), the plain baseline GPTQ/AWQ-style methods improve on. On a 135M model both 4-bit
        schemes cost much utility (docs/results/robustness.md shows it beside every recovery).
"""

from __future__ import annotations

import torch

from unlearn.errors import UnlearnError

SCHEMES = ("int8", "nf4", "fp4", "rtn4")


def _bnb():
    import logging

    # bitsandbytes looks for an optional CPU matmul kernel on import and warns when it cannot
    # load it; the attacks only quantize and dequantize, which never use that kernel
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise UnlearnError(
            "weight quantization attacks (int8, nf4, fp4) need bitsandbytes: pip install "
            "bitsandbytes (CPU and CUDA); rtn4 needs nothing"
        ) from None
    return bnbf


def _rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % group
    groups = torch.nn.functional.pad(flat, (0, pad)).view(-1, group)
    top = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / top
    q = (groups / scale).round().clamp(-top, top) * scale
    return q.reshape(-1)[: flat.numel()].view_as(w)


def quantize_dequantize(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """`w` after a round trip through `scheme`, in w's dtype and on its device."""
    if scheme == "rtn4":
        return _rtn(w, 4, 128).to(w.dtype)
    if scheme not in SCHEMES:
        raise UnlearnError(f"unknown quantization scheme {scheme!r}; choose one of {SCHEMES}")
    bnbf = _bnb()
    x = w.detach()
    if scheme == "int8":
        q, stats, _ = bnbf.int8_vectorwise_quant(x.to(torch.float16 if x.is_cuda else x.dtype))
        return bnbf.int8_vectorwise_dequant(q, stats).to(w.dtype).view_as(w)
    q, state = bnbf.quantize_4bit(x, blocksize=64, quant_type=scheme)
    return bnbf.dequantize_4bit(q, state).to(w.dtype).view_as(w)


def quantized_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers a weight-only quantizer quantizes: those inside the decoder blocks."""
    from unlearn.train.hidden import decoder_blocks

    blocks = list(decoder_blocks(model))
    if not blocks:
        raise UnlearnError(
            f"cannot find the decoder blocks of {type(model).__name__} to quantize; the "
            "quantization attacks support Hugging Face decoder-only models"
        )
    return [
        (f"{i}.{name}", m)
        for i, block in enumerate(blocks)
        for name, m in block.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]


@torch.no_grad()
def quantize_model(model: torch.nn.Module, scheme: str) -> dict[str, float]:
    """Quantize the model's block linear weights in place (pass a copy); returns how much the
    weights moved: the mean |w_q - w| / mean |w| over the quantized layers."""
    moved, size = 0.0, 0.0
    for _, layer in quantized_layers(model):
        w = layer.weight
        q = quantize_dequantize(w.data, scheme)
        moved += float((q.float() - w.float()).abs().sum())
        size += float(w.float().abs().sum())
        w.copy_(q)
    return {"relative_change": moved / max(size, 1e-30)}
