"""UNO-S: UNO steps alternating with gradient-surgery steps (Mandal & Gottwald 2025,
arXiv:2506.04712; authors' code pinakm9/forget, modules/imagenet/ortho_s.py and surgery.py).

Odd steps (1, 3, ...) are UNO steps (`unlearn.methods.uno`). Even steps are the authors' "Gradient
Surgery #2": with g_f = grad L_f (the memorised forget answers) and g_r = grad (gamma * L_sub +
alpha * L_r) (substitute and retain, as in UNO),

    g_r' = g_r - (g_f . g_r / |g_f|^2) g_f        every surgery step, whatever the sign
    step along g_r' only

so the descent on the substitute and retain answers is projected off the forget gradient: to first
order it leaves the forget answers' NLL where it is instead of relearning them. This is the reverse
of PCGrad (which projects the forget gradient off the retain one, and is `grad_diff`'s
`combine=pcgrad` here). The alternation is fixed (`global_step % 2` in the authors' code) and both
kinds of step share one optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unlearn.methods.base import Method
from unlearn.methods.uno import (
    check_uno_params,
    forget_probe,
    substitute_loss,
    substitute_targets,
    uno_needs,
)


@dataclass(frozen=True)
class UNOSParams:
    # as UNOParams (authors' ImageNet DiT setting, modules/imagenet/ortho_s.py uses the same
    # weights for its UNO steps)
    lam: float = 0.02  # weight of the squared cosine on the UNO steps
    gamma: float = 1.0  # weight of the substitute term L_sub
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl"] = "nll"
    substitute: Literal["idk", "none"] = "idk"
    refusals: str | None = None

    def __post_init__(self) -> None:
        check_uno_params(self)


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="uno_s",
    summary="UNO steps alternating with steps along the substitute+retain gradient projected off the forget gradient",
    params=UNOSParams,
    loss=substitute_loss,
    citation=(
        "Mandal & Gottwald 2025, UNO: Unlearning via Orthogonalization in Generative Models, "
        "arXiv:2506.04712; authors' code pinakm9/forget (modules/imagenet/ortho_s.py, surgery.py)"
    ),
    needs=lambda p: uno_needs(p, "uno_s"),
    second_targets=substitute_targets,
    probe=forget_probe,
)
