"""UNDIAL and CE-U: the loss against a hand computation on random logits, one real run each that
raises the forget NLL, one-line errors for bad hyperparameters, and the `unlearn methods` listing.

The hand versions loop over answer tokens and build the target distributions from exp / sum, so
they share nothing with the modules' masked, vectorised code.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import unlearn
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, describe_methods, get_method
from unlearn.methods.base import LossInputs
from unlearn.methods.ce_u import CEUParams, ce_u_loss
from unlearn.methods.undial import UNDIALParams, undial_loss

FAST = ["train.progress=false", "train.batch_size=2", "train.max_steps=2", "train.lr=1e-3"]


def random_batch(seed: int = 0, vocab: int = 7):
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


def hand_undial(logits, ref, labels, beta: float) -> float:
    terms = []
    for b, t, y in answer_positions(labels):
        teacher = ref[b, t].tolist()
        teacher[y] -= beta
        terms.append(soft_ce(softmax(teacher), logits[b, t].tolist()))
    return sum(terms) / len(terms)


def hand_ce_u(logits, labels, skip_first: int) -> float:
    terms = []
    for b, t, y in answer_positions(labels, skip_first):
        target = logits[b, t].tolist()
        target[y] = -math.inf
        terms.append(soft_ce(softmax(target), logits[b, t].tolist()))
    return sum(terms) / len(terms)


# ---- the loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 3.0, 10.0])
def test_undial_loss_matches_hand_computation(beta: float) -> None:
    logits, ref, labels = random_batch()
    inputs = LossInputs(logits, labels, ref_forget={"logits": ref})
    loss, logs = undial_loss(inputs, UNDIALParams(beta=beta, gamma=0.5))
    assert float(loss) == pytest.approx(0.5 * hand_undial(logits, ref, labels, beta), rel=1e-5)
    assert logs["forget_loss"] == pytest.approx(hand_undial(logits, ref, labels, beta), rel=1e-5)


def test_undial_without_reference_logits_fails() -> None:
    logits, _, labels = random_batch()
    with pytest.raises(ValueError, match="ref_forget"):
        undial_loss(LossInputs(logits, labels), UNDIALParams())


def test_undial_at_the_start_pushes_only_the_answer_token_down() -> None:
    """Student = teacher: with beta = 0 nothing moves; with beta > 0 a descent step on the logits
    lowers the answer token's logit and raises every other one (gradient = p - q)."""
    logits, _, labels = random_batch(1)
    for beta, moves in ((0.0, False), (10.0, True)):
        z = logits.clone().requires_grad_(True)
        loss, _ = undial_loss(
            LossInputs(z, labels, ref_forget={"logits": logits}), UNDIALParams(beta=beta)
        )
        loss.backward()
        for b, t, y in answer_positions(labels):
            grad = z.grad[b, t]
            if not moves:
                assert grad.abs().max() < 1e-6
            else:
                assert grad[y] > 0 and (torch.cat([grad[:y], grad[y + 1 :]]) <= 0).all()


@pytest.mark.parametrize("skip", [0, 1, 2])
def test_ce_u_loss_matches_hand_computation(skip: int) -> None:
    logits, _, labels = random_batch(2)
    loss, logs = ce_u_loss(LossInputs(logits, labels), CEUParams(ignore_first_n_answer_tokens=skip))
    assert float(loss) == pytest.approx(hand_ce_u(logits, labels, skip), rel=1e-5)
    assert logs["forget_loss"] == pytest.approx(float(loss))


def test_ce_u_target_is_detached_and_gradient_lowers_the_answer_token() -> None:
    logits, _, labels = random_batch(3)
    z = logits.clone().requires_grad_(True)
    loss, _ = ce_u_loss(LossInputs(z, labels), CEUParams(ignore_first_n_answer_tokens=0))
    loss.backward()
    n = len(answer_positions(labels))
    for b, t, y in answer_positions(labels):
        p = torch.softmax(logits[b, t], -1)
        q = p.clone()
        q[y] = 0
        q = q / q.sum()
        # the gradient of a soft cross-entropy with a constant target: (p - q) / N
        assert torch.allclose(z.grad[b, t], (p - q) / n, atol=1e-6)
        assert z.grad[b, t, y] > 0


def test_ce_u_with_every_answer_token_skipped_is_zero() -> None:
    logits = torch.randn(1, 3, 5, requires_grad=True)
    labels = torch.tensor([[-100, -100, 2]])
    loss, _ = ce_u_loss(LossInputs(logits, labels), CEUParams())
    loss.backward()
    assert float(loss.detach()) == 0.0 and logits.grad is not None


# ---- hyperparameters and registry ----------------------------------------------------------------


def test_defaults_and_needs() -> None:
    assert UNDIALParams() == UNDIALParams(beta=10.0, gamma=1.0, alpha=0.0, retain_loss="nll")
    assert CEUParams() == CEUParams(ignore_first_n_answer_tokens=1)
    undial = get_method("undial")
    assert undial.needs(UNDIALParams()).reference == ("logits",)
    assert not undial.needs_retain(UNDIALParams())
    assert undial.needs_retain(UNDIALParams(alpha=1.0))
    assert not undial.needs_reference_model(UNDIALParams())
    assert not get_method("ce_u").needs_retain(CEUParams())


@pytest.mark.parametrize(
    ("method", "overrides", "field"),
    [
        ("undial", {"beta": "-1"}, "beta"),
        ("undial", {"beta": "inf"}, "beta"),
        ("undial", {"gamma": "-0.5"}, "gamma"),
        ("undial", {"retain_loss": "l2"}, "retain_loss"),
        ("undial", {"delta": "1"}, "delta"),
        ("ce_u", {"ignore_first_n_answer_tokens": "-1"}, "ignore_first_n_answer_tokens"),
        ("ce_u", {"ignore_first_n_answer_tokens": "1.5"}, "ignore_first_n_answer_tokens"),
        ("ce_u", {"alpha": "1"}, "alpha"),
    ],
)
def test_invalid_hyperparameters_are_one_line(method, overrides, field) -> None:
    with pytest.raises(UnlearnError) as err:
        build_params(method, overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and method in msg


def test_overrides_are_coerced() -> None:
    assert build_params("undial", {"beta": "3"}).beta == 3.0
    assert build_params("ce_u", {"ignore_first_n_answer_tokens": "0"}) == CEUParams(0)


def test_describe_methods_lists_both() -> None:
    lines = {line.split(":")[0]: line for line in describe_methods()}
    assert "beta=10.0" in lines["undial"] and "alpha=0.0" in lines["undial"]
    assert "ignore_first_n_answer_tokens=1" in lines["ce_u"]


# ---- a real run ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["undial", "ce_u"])
def test_two_steps_raise_the_forget_nll(
    name, tiny_model_dir, qa_files, tmp_path, monkeypatch, one_torch_thread
) -> None:
    """Two optimizer steps in the real loop make the forget answers less likely; UNDIAL's teacher
    comes from cached logits (at step 1 equal to the model's own, at step 2 not), never from a
    frozen second model."""
    import unlearn.methods as methods
    import unlearn.train.setup as train_setup

    monkeypatch.setattr(train_setup, "frozen_copy", lambda *a: pytest.fail("kept a second model"))
    method, same = methods.METHODS[name], []

    def checking_loss(inputs, params):
        ref = inputs.ref_forget.get("logits")
        if ref is not None:
            mask = inputs.forget_labels[:, 1:] != -100
            own = inputs.forget_logits[:, :-1][mask].detach()
            same.append(torch.allclose(ref[:, :-1].to(own)[mask], own, atol=1e-4))
        return method.loss(inputs, params)

    monkeypatch.setitem(methods.METHODS, name, dataclasses.replace(method, loss=checking_loss))
    forget, retain = qa_files
    res = unlearn.forget(
        str(tiny_model_dir), str(forget), str(retain), name, str(tmp_path / "out"), overrides=FAST
    )
    assert res.metrics["steps"] == 2
    before = res.metrics["nll_before"]["forget_nll"]
    after = res.metrics["nll_after"]["forget_nll"]
    assert after > before
    assert math.isfinite(res.metrics["final_losses"]["forget_loss"])
    assert same == ([True, False] if name == "undial" else [])
