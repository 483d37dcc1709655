"""Hand-made inputs and hand computations shared by the method tests (tests/methods/).

The tiny sequences (vocabulary 3, logit rows [ln 2, 0, 0] -> softmax [1/2, 1/4, 1/4]):
  A: labels [-100, 0, 1], answer log-probs [-ln 2, -2 ln 2]: log pi(y|x) = -3 ln 2, |y| = 2,
     NLL = 1.5 ln 2.
  B: labels [-100, -100, 2], answer log-prob [-2 ln 2]: log pi(y|x) = -2 ln 2, |y| = 1, NLL = 2 ln 2.
  C: labels [-100, 1, 1], answer log-probs [-2 ln 2, -2 ln 2]: log pi = -4 ln 2, |y| = 2,
     per-token NLL 2 ln 2 (the same as B's, twice as long).
"""

from __future__ import annotations

import math

import pytest
import torch

from unlearn import losses
from unlearn.methods.base import LossInputs, Method

LN2 = math.log(2)
HALF = [LN2, 0.0, 0.0]
UNIFORM = [0.0, 0.0, 0.0]
FAST = ["train.progress=false", "train.batch_size=2"]


def seqs(*names: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the named tiny sequences into a batch (logits [B, 3, 3], labels [B, 3])."""
    table = {
        "A": ([HALF, HALF, [9.0, -9.0, 0.0]], [-100, 0, 1]),
        "B": ([[5.0, -5.0, 0.0], HALF, UNIFORM], [-100, -100, 2]),
        "C": ([HALF, HALF, UNIFORM], [-100, 1, 1]),
    }
    logits = torch.tensor([table[n][0] for n in names])
    return logits, torch.tensor([table[n][1] for n in names])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def make_inputs(forget: str = "A", retain: str | None = "B", **extra) -> LossInputs:
    f_logits, f_labels = seqs(*forget)
    r_logits, r_labels = seqs(*retain) if retain else (None, None)
    return LossInputs(f_logits, f_labels, r_logits, r_labels, **extra)


def close(value: torch.Tensor | float, expected: float) -> None:
    assert float(value) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def dpo_inputs(forget: str, preferred: str, lose_shift, win_shift, retain: str | None = None):
    """LossInputs whose reference log-probs are the current ones minus the given shifts, so the
    log-ratios are exactly `lose_shift` (rejected) and `win_shift` (preferred)."""
    f_logits, f_labels = seqs(*forget)
    s_logits, s_labels = seqs(*preferred)
    r_logits, r_labels = seqs(*retain) if retain else (None, None)
    f_logp = losses.sequence_logprob(f_logits, f_labels)[0]
    s_logp = losses.sequence_logprob(s_logits, s_labels)[0]
    return LossInputs(
        f_logits,
        f_labels,
        r_logits,
        r_labels,
        ref_forget_logp=f_logp - torch.tensor(lose_shift),
        second_logits=s_logits,
        second_labels=s_labels,
        ref_second={"sequence_logp": s_logp - torch.tensor(win_shift)},
    )


def full_inputs(method: Method, params=None) -> LossInputs:
    """Inputs carrying every optional tensor a method may declare (forget [A, B], retain B)."""
    params = method.params() if params is None else params
    inputs = make_inputs("AB", "B", ref_forget_logp=torch.tensor([-2.0, -1.0]))
    inputs.ref_retain_logits = inputs.retain_logits.clone()
    inputs.second_logits, inputs.second_labels = seqs("C", "A")
    inputs.ref_second = {"sequence_logp": torch.tensor([-3.0, -2.0])}
    inputs.ref_forget = {
        "logits": inputs.forget_logits.detach().clone(),
        "reinforced_logits": inputs.forget_logits.detach().clone(),
        "sequence_logp": inputs.ref_forget_logp,
        "token_logp": losses.token_logprobs(inputs.forget_logits, inputs.forget_labels)[0].detach(),
    }
    gen = torch.Generator().manual_seed(0)
    for layer in method.needs(params).hidden_layers:  # RMU: one block's outputs
        inputs.forget_hidden[layer] = torch.randn(*inputs.forget_labels.shape, 8, generator=gen)
        inputs.retain_hidden[layer] = torch.randn(*inputs.retain_labels.shape, 8, generator=gen)
        inputs.ref_retain_hidden[layer] = torch.randn(*inputs.retain_labels.shape, 8, generator=gen)
        inputs.ref_forget_hidden[layer] = torch.randn(*inputs.forget_labels.shape, 8, generator=gen)
    if method.init_state is not None:
        inputs.state = dict(method.init_state(params))
    return inputs


# ---- per-token hand computations on random logits (WGA, SatImp, UNDIAL, CE-U, PDU) ----------------


def random_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [2, 5, 4] and labels with a prompt and a padded position."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 4, generator=gen) * 2
    labels = torch.tensor([[-100, -100, 1, 3, 0], [-100, 2, 2, 1, -100]])
    return logits, labels


def weighted_ascent_hand_loss(logits: torch.Tensor, labels: torch.Tensor, weight) -> float:
    """(1/N) sum over answer tokens of weight(p) * log p, one token at a time in plain floats."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            row = [float(v) for v in logits[b, t - 1]]
            logp = row[y] - math.log(sum(math.exp(v) for v in row))
            total += weight(math.exp(logp)) * logp
            count += 1
    return total / count


def weighted_ascent_reference_grad(logits, labels, weight, gamma: float) -> torch.Tensor:
    """The gradient of gamma * sum_t w_t log p_t / N with every weight w_t a constant."""
    y = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(y[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[
        ..., 0
    ]
    mask = labels[:, 1:] != -100
    w = torch.tensor([[weight(math.exp(float(v))) for v in row] for row in logp.detach()])
    (gamma * (w * logp * mask).sum() / mask.sum()).backward()
    return y.grad


def soft_target_batch(seed: int = 0, vocab: int = 7):
    """Logits, reference logits [2, 6, vocab] and labels with a prompt and a padded position."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, vocab, generator=g) * 2
    ref = torch.randn(2, 6, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (2, 6), generator=g)
    labels[0, :2] = -100  # prompt
    labels[1, :3] = -100
    labels[1, 5] = -100  # padding
    return logits, ref, labels


def answer_positions(labels: torch.Tensor, skip_first: int = 0) -> list[tuple[int, int, int]]:
    """(row, logit position, target token) for every answer token after the first `skip_first`."""
    out = []
    for b in range(labels.shape[0]):
        seen = 0
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            seen += 1
            if seen > skip_first and t > 0:
                out.append((b, t - 1, y))
    return out


def soft_ce(target: list[float], logits: list[float]) -> float:
    """-sum_v target_v * log softmax(logits)_v."""
    log_z = math.log(sum(math.exp(z) for z in logits))
    return -sum(q * (z - log_z) for q, z in zip(target, logits, strict=True) if q > 0)


def softmax(zs: list[float]) -> list[float]:
    e = [0.0 if z == -math.inf else math.exp(z) for z in zs]
    return [x / sum(e) for x in e]


# ---- one optimizer step on free logits --------------------------------------------------------------


def forget_nll_after_step(method: Method, params=None) -> tuple[float, float]:
    """One SGD step on the method's loss over free logits that favour the answer tokens (something
    to unlearn): the forget NLL before and after."""
    params = method.params() if params is None else params
    needs = method.needs(params)
    torch.manual_seed(0)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 0]])
    raw = torch.randn(2, 4, 5)
    raw[:, :-1].scatter_add_(-1, labels[:, 1:].clamp(min=0)[..., None], torch.full((2, 3, 1), 3.0))
    logits = torch.nn.Parameter(raw)  # a model that has half learnt its answers: p(answer) ~ 1/2
    retain_logits = torch.nn.Parameter(torch.randn(1, 4, 5))
    retain_labels = torch.tensor([[-100, 0, 1, 2]])
    inputs = LossInputs(logits, labels, retain_logits, retain_labels)
    if "sequence_logp" in needs.reference:
        inputs.ref_forget_logp = losses.sequence_logprob(logits.detach(), labels)[0]
        inputs.ref_forget["sequence_logp"] = inputs.ref_forget_logp
    if "token_logp" in needs.reference:
        inputs.ref_forget["token_logp"] = losses.token_logprobs(logits.detach(), labels)[0]
    if "logits" in needs.reference:  # UNDIAL: the starting model's logits
        inputs.ref_forget["logits"] = logits.detach().clone()
    if "reinforced_logits" in needs.reference:  # WHP: a reinforced gain on the answer tokens
        gain = torch.zeros_like(logits)
        gain[:, :-1].scatter_(-1, labels[:, 1:].clamp(min=0)[..., None], 5.0)
        inputs.ref_forget["reinforced_logits"] = logits.detach() + gain
    if needs.second_target:  # DPO: a preferred answer, its own logits
        inputs.second_logits = torch.nn.Parameter(torch.randn(2, 4, 5))
        inputs.second_labels = torch.tensor([[-100, 0, 0, 1], [-100, -100, 3, 3]])
        s_logp = losses.sequence_logprob(inputs.second_logits.detach(), inputs.second_labels)[0]
        inputs.ref_second = {"sequence_logp": s_logp}
    if method.init_state is not None:
        inputs.state = dict(method.init_state(params))
    before = losses.nll(logits.detach(), labels).item()
    loss, _ = method.loss(inputs, params)
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    return before, losses.nll(logits.detach(), labels).item()
