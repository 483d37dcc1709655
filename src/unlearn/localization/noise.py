"""GRIN's noise injection: perturb the selected weights before the unlearning fine-tune.

Noise scaled to each tensor's own spread (its weight std) moves every selected weight by a
comparable relative amount whatever the layer's scale; the fine-tune that follows then starts away
from the memorised solution, in the region the mask says the forget data lives
(Anjarlekar & Pombra 2025, arXiv:2508.06467).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def inject_noise(
    model: torch.nn.Module, mask: dict[str, torch.Tensor], noise_std: float, seed: int
) -> dict[str, float]:
    """Add N(0, (noise_std * std(W))^2) to the selected entries of each masked tensor, in place.

    Only selected entries change (torch.where, so every other weight keeps its exact bits). The
    noise comes from a seeded CPU generator in the model's parameter order: the same seed gives the
    same noise on any device. Returns {parameter: the std used} (empty when noise_std is 0).
    """
    if noise_std == 0:
        return {}
    gen = torch.Generator().manual_seed(seed)
    used = {}
    for name, p in model.named_parameters():
        m = mask.get(name)
        if m is None or not bool(m.any()):
            continue
        std = float(p.detach().float().std(correction=0))  # a 1-entry tensor: 0, not NaN
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * (noise_std * std)
        m = m.to(p.device)
        p.copy_(torch.where(m, p + noise.to(device=p.device, dtype=p.dtype), p))
        used[name] = std
    return used
