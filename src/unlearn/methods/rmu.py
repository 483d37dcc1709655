"""RMU, representation misdirection for unlearning: steer one block's activations on forget text
toward a fixed random vector, and keep them where they were on retain text.

    u   = r / |r|,  r ~ U[0, 1)^H, drawn once from a generator seeded by `seed`
    L_f = mean_b (1/|A_b|) sum_{t in A_b} (1/H) |h_theta(x)_bt - c u|^2          (forget batch)
    L_r = mean_b (1/|A_b|) sum_{t in A_b} (1/H) |h_theta(x)_bt - h_ref(x)_bt|^2  (retain batch)
    L   = gamma * L_f + alpha * L_r

h is the output of decoder block `layer` (H wide), A_b the answer tokens of sequence b (labels !=
-100; every token of a plain-text document), h_ref the frozen starting model. Li et al. 2024, "The
WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning", arXiv:2403.03218. Why it
works: the later blocks were trained on the activations the model really produces; replacing them on
forget text by a large, fixed, input-independent vector leaves nothing for those blocks to read, so
the model's processing of that text turns to noise, while the retain term pins the same activations
on everything else. Nothing after the block enters the loss, so the model runs only up to it and
only a few MLP weights at and just before it train (the WMDP recipe: the down projections of blocks
layer-2..layer).

The masked per-sequence average is OpenUnlearning's `compute_activation_loss`
(src/trainer/unlearn/rmu.py); the WMDP code averages over every position of the batch instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from unlearn.errors import UnlearnError
from unlearn.methods.base import LossInputs, Method, Needs, RetainTerm
from unlearn.methods.retain import check_weights

AUTO = "auto"
# Names of an MLP's output (down) projection: Llama/Mistral/Qwen, GPT-2, OPT/Phi, GPT-NeoX/Falcon,
# Mixtral experts.
_DOWN = re.compile(r"(^|\.)(down_proj|c_proj|fc2|dense_4h_to_h|w2)(\.weight)?$")
_ATTN = re.compile(r"attn|attention", re.IGNORECASE)  # GPT-2's attention output is c_proj too


@dataclass(frozen=True)
class RMUParams:
    # Defaults: the WMDP authors' Zephyr-7B run (github.com/centerforaisafety/wmdp, README command
    # for rmu/unlearn.py: layer 7, steering coefficient 6.5, alpha 1200, blocks 5-7 down_proj,
    # lr 5e-5). OpenUnlearning's configs/trainer/RMU.yaml uses steering 2, alpha 1, gamma 1.
    layer: int = 7  # decoder block (0-based) whose output is steered
    steering_coeff: float = 6.5  # c, the norm of the control vector; scale it to the model
    alpha: float = 1200.0  # weight of the retain activation term
    gamma: float = 1.0  # weight of the forget term (OpenUnlearning RMU.yaml)
    seed: int = 0  # seed of the random direction u
    trainable: str = AUTO  # "auto": down projections of blocks layer-2..layer; or a name regex

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer must be a decoder block index >= 0, got {self.layer}")
        if not (math.isfinite(self.steering_coeff) and self.steering_coeff > 0):
            raise ValueError(
                f"steering_coeff must be a finite number > 0, got {self.steering_coeff}"
            )
        check_weights(gamma=self.gamma, alpha=self.alpha)
        if self.trainable != AUTO:
            try:
                re.compile(self.trainable)
            except re.error as exc:
                raise ValueError(
                    f"trainable is not a valid regex ({exc}): {self.trainable!r}"
                ) from None


def control_vector(dim: int, coeff: float, seed: int) -> torch.Tensor:
    """c * u: a uniform [0, 1) vector from a generator seeded by `seed`, scaled to norm c [dim]."""
    r = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (r / r.norm() * coeff).float()


def activation_mse(h: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token mean squared error over the hidden size, averaged over each sequence's answer
    tokens, then over the sequences that have any. h [B, T, H]; target broadcasts to it."""
    mask = (labels != -100).to(torch.float32)
    per_token = (h.float() - target.float()).pow(2).mean(-1)
    count = mask.sum(-1)
    per_seq = (per_token * mask).sum(-1) / count.clamp(min=1)
    has = (count > 0).to(per_seq.dtype)
    return (per_seq * has).sum() / has.sum().clamp(min=1)


def _hidden(states: dict[int, torch.Tensor], layer: int, where: str) -> torch.Tensor:
    if layer not in states:
        raise ValueError(
            f"RMU needs the {where} hidden state of block {layer} (Needs.hidden_layers)"
        )
    return states[layer]


def retain_activation_term(inputs: LossInputs, layer: int) -> torch.Tensor:
    """L_r: the model's block output against the frozen starting model's, on the retain batch."""
    if inputs.retain_labels is None:
        raise ValueError("RMU's retain term needs retain_labels, got None")
    h = _hidden(inputs.retain_hidden, layer, "retain")
    ref = _hidden(inputs.ref_retain_hidden, layer, "reference retain")
    return activation_mse(h, ref.detach().to(h), inputs.retain_labels)


def rmu_loss(inputs: LossInputs, params: RMUParams) -> tuple[torch.Tensor, dict[str, float]]:
    """gamma * L_f; the retain term alpha * L_r is the declared one (`rmu_needs`)."""
    h = _hidden(inputs.forget_hidden, params.layer, "forget")
    labels = inputs.forget_labels
    target = control_vector(h.shape[-1], params.steering_coeff, params.seed).to(h.device)
    forget = activation_mse(h, target, labels)
    with torch.no_grad():  # |h| per answer token: what c should be compared with
        mask = (labels != -100).to(torch.float32)
        norm = (h.float().norm(dim=-1) * mask).sum() / mask.sum().clamp(min=1)
    logs = {"forget_loss": float(forget.detach()), "forget_activation_norm": float(norm)}
    return params.gamma * forget, logs


def rmu_needs(params: RMUParams) -> Needs:
    """Block `layer` of the model; of the frozen start only when the retain term is on."""
    retain = None
    if params.alpha != 0:
        retain = RetainTerm(
            weight=params.alpha,
            kind="rmu_activation",
            loss=partial(retain_activation_term, layer=params.layer),
            mean_over="sequence",  # a mean of per-sequence activation errors
        )
    return Needs(
        retain=retain,
        hidden_layers=(params.layer,),
        reference_hidden_layers=(params.layer,) if retain is not None else (),
        reference_hidden_on=("retain",),  # the forget term's target is the control vector
        logits=False,
    )


def _blocks(model: torch.nn.Module) -> tuple[str, int]:
    """(qualified name, length) of the model's decoder block list."""
    from unlearn.train.hidden import decoder_blocks  # lazy: unlearn.train imports the methods

    blocks = decoder_blocks(model)
    name = next(n for n, m in model.named_modules() if m is blocks)
    return name, len(blocks)


def trainable_names(model: torch.nn.Module, params: RMUParams) -> list[str]:
    """The parameters RMU trains; a one-line UnlearnError when the layer or the regex is off."""
    prefix, depth = _blocks(model)
    if params.layer >= depth:
        raise UnlearnError(
            f"rmu layer {params.layer} is past the model's {depth} decoder blocks; "
            f"set method.layer between 0 and {depth - 1}"
        )
    names = [n for n, _ in model.named_parameters()]
    if params.trainable != AUTO:
        chosen = [n for n in names if re.fullmatch(params.trainable, n)]
        if not chosen:
            raise UnlearnError(
                f"rmu method.trainable={params.trainable!r} matches no parameter of this model "
                f"(names look like {names[0]!r}); fix the regex or use method.trainable=auto"
            )
        return chosen
    first = max(0, params.layer - 2)
    blocks = "|".join(str(i) for i in range(first, params.layer + 1))
    in_block = re.compile(rf"{re.escape(prefix)}\.({blocks})\.(?P<inner>.+)")
    chosen = []
    for n in names:
        m = in_block.fullmatch(n)
        if m and _DOWN.search(m["inner"]) and not _ATTN.search(m["inner"]):
            chosen.append(n)
    if not chosen:
        raise UnlearnError(
            f"rmu found no MLP down-projection weights in blocks {first}-{params.layer} of "
            f"{type(model).__name__}; set method.trainable to a regex of parameter names"
        )
    return chosen


def rmu_mask(model: torch.nn.Module, params: Any) -> dict[str, torch.Tensor]:
    """Whole-tensor masks: the selected parameters train, everything else stays frozen."""
    named = dict(model.named_parameters())
    return {n: torch.ones(named[n].shape, dtype=torch.bool) for n in trainable_names(model, params)}


METHOD = Method(
    name="rmu",
    summary="steer one block's activations on forget text to a random vector, keep them on retain",
    params=RMUParams,
    loss=rmu_loss,
    needs=rmu_needs,
    parameter_mask=rmu_mask,
    citation=(
        "Li et al. 2024, The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning, "
        "arXiv:2403.03218; defaults from the WMDP repository's Zephyr-7B run, loss averaging from "
        "OpenUnlearning src/trainer/unlearn/rmu.py"
    ),
)
