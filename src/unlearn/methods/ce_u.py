"""CE-U: cross-entropy towards the model's own distribution with the true token removed.

    q_t = softmax(stopgrad(z_theta_t) with z_theta_t[y_t] = -inf)
    L = mean_{answer tokens t, after the first n of each answer} CE(q_t, softmax(z_theta_t))

Yang 2025, "CE-U: Cross Entropy Unlearning", arXiv:2503.01224. Gradient ascent's gradient on the
true token is (p_y - 1) with the sign flipped, and its loss has no lower bound; CE-U's gradient on
the logits is softmax(z) - q, which pushes p_y to 0 with a magnitude bounded by 2 and vanishes
once the model already puts no mass on y (no explosion, no collapse, no reference model). The
target is the model's own current distribution, renormalised without y, so the other tokens keep
their relative order.

The loss and `ignore_first_n_answer_tokens` follow OpenUnlearning's `compute_batch_ceu` /
`cross_entropy_unlearning_loss` (src/trainer/unlearn/ceu.py), which implements the paper's footnote
in its Training Settings section: the first answer token is not unlearned. Neither the paper nor
OpenUnlearning's CEU trainer uses a retain set, so there is no retain term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearn import losses
from unlearn.methods.base import LossInputs, Method


@dataclass(frozen=True)
class CEUParams:
    # Default: OpenUnlearning configs/trainer/CEU.yaml (ignore_first_n_answer_tokens 1), after the
    # paper's Training Settings footnote. The paper has no loss weight and no retain term.
    ignore_first_n_answer_tokens: int = 1  # leading answer tokens of each example left alone

    def __post_init__(self) -> None:
        if self.ignore_first_n_answer_tokens < 0:
            raise ValueError(
                "ignore_first_n_answer_tokens must be an integer >= 0, "
                f"got {self.ignore_first_n_answer_tokens}"
            )


def unlearning_labels(labels: torch.Tensor, ignore_first_n: int) -> torch.Tensor:
    """`labels` with the first `ignore_first_n` answer tokens of every row set to -100."""
    valid = labels != losses.IGNORE_INDEX
    leading = (valid.cumsum(dim=-1) <= ignore_first_n) & valid
    return labels.masked_fill(leading, losses.IGNORE_INDEX)


def ce_u_forget_term(logits: losses.Logits, labels: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of CE(softmax(detached logits without y), softmax(logits))."""
    student, mask = losses.answer_logits(logits, labels)  # [N, V], only answer positions
    if student.shape[0] == 0:
        return student.sum()  # no answer tokens left: a zero that keeps the graph
    target = student.detach().scatter(-1, labels[:, 1:][mask].unsqueeze(-1), float("-inf"))
    return F.cross_entropy(student, F.softmax(target, dim=-1))


def ce_u_loss(inputs: LossInputs, params: CEUParams) -> tuple[torch.Tensor, dict[str, float]]:
    """CE-U on the forget batch; no retain term."""
    labels = unlearning_labels(inputs.forget_labels, params.ignore_first_n_answer_tokens)
    forget = ce_u_forget_term(inputs.forget_logits, labels)
    logs = {
        "forget_loss": float(forget.detach()),
        "forget_nll": float(losses.nll(inputs.forget_logits.detach(), inputs.forget_labels)),
    }
    return forget, logs


def counted_tokens(item, params: CEUParams) -> int:
    """Answer tokens the forget mean counts: all but each example's first n."""
    from unlearn.train.schedule import answer_tokens

    return max(answer_tokens([item])[0] - params.ignore_first_n_answer_tokens, 0)


METHOD = Method(
    mean_over=counted_tokens,  # a mean over answer tokens, the first n of each left out
    name="ce_u",
    summary="cross-entropy towards the model's own distribution with the answer token removed",
    params=CEUParams,
    loss=ce_u_loss,
    citation=(
        "Yang 2025, CE-U: Cross Entropy Unlearning, arXiv:2503.01224; defaults from "
        "OpenUnlearning CEU.yaml"
    ),
)
