"""CE-U: the loss against a hand computation on random logits, its detached target and gradient,
one real run that raises the forget NLL, one-line errors for bad hyperparameters, and the
`unlearn methods` listing.

The hand version loops over answer tokens and builds the target distributions from exp / sum, so it
shares nothing with the module's masked, vectorised code.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import unlearn
from method_inputs import answer_positions, soft_ce, soft_target_batch, softmax
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, describe_methods, get_method
from unlearn.methods.base import LossInputs
from unlearn.methods.ce_u import CEUParams, ce_u_loss

FAST = ["train.progress=false", "train.batch_size=2", "train.max_steps=2", "train.lr=1e-3"]


def hand_ce_u(logits, labels, skip_first: int) -> float:
    terms = []
    for b, t, y in answer_positions(labels, skip_first):
        target = logits[b, t].tolist()
        target[y] = -math.inf
        terms.append(soft_ce(softmax(target), logits[b, t].tolist()))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("skip", [0, 1, 2])
def test_ce_u_loss_matches_hand_computation(skip: int) -> None:
    logits, _, labels = soft_target_batch(2)
    loss, logs = ce_u_loss(LossInputs(logits, labels), CEUParams(ignore_first_n_answer_tokens=skip))
    assert float(loss) == pytest.approx(hand_ce_u(logits, labels, skip), rel=1e-5)
    assert logs["forget_loss"] == pytest.approx(float(loss))


def test_ce_u_target_is_detached_and_gradient_lowers_the_answer_token() -> None:
    logits, _, labels = soft_target_batch(3)
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


def test_defaults_and_needs() -> None:
    assert CEUParams() == CEUParams(ignore_first_n_answer_tokens=1)
    assert not get_method("ce_u").needs_retain(CEUParams())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"ignore_first_n_answer_tokens": "-1"}, "ignore_first_n_answer_tokens"),
        ({"ignore_first_n_answer_tokens": "1.5"}, "ignore_first_n_answer_tokens"),
        ({"alpha": "1"}, "alpha"),
    ],
)
def test_invalid_hyperparameters_are_one_line(overrides, field) -> None:
    with pytest.raises(UnlearnError) as err:
        build_params("ce_u", overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "ce_u" in msg


def test_overrides_are_coerced() -> None:
    assert build_params("ce_u", {"ignore_first_n_answer_tokens": "0"}) == CEUParams(0)


def test_describe_methods_lists_the_default() -> None:
    lines = {line.split(":")[0]: line for line in describe_methods()}
    assert "ignore_first_n_answer_tokens=1" in lines["ce_u"]


def test_two_steps_raise_the_forget_nll(tiny_model_dir, qa_files, tmp_path, monkeypatch) -> None:
    """Two optimizer steps in the real loop make the forget answers less likely, with no frozen
    second model and no cached reference logits."""
    import unlearn.methods as methods
    import unlearn.train.setup as train_setup

    monkeypatch.setattr(train_setup, "frozen_copy", lambda *a: pytest.fail("kept a second model"))
    method, seen = methods.METHODS["ce_u"], []

    def checking_loss(inputs, params):
        seen.append("logits" in inputs.ref_forget)
        return method.loss(inputs, params)

    monkeypatch.setitem(methods.METHODS, "ce_u", dataclasses.replace(method, loss=checking_loss))
    forget, retain = qa_files
    res = unlearn.forget(
        str(tiny_model_dir), str(forget), str(retain), "ce_u", str(tmp_path / "out"),
        overrides=FAST,
    )  # fmt: skip
    assert res.metrics["steps"] == 2
    assert res.metrics["nll_after"]["forget_nll"] > res.metrics["nll_before"]["forget_nll"]
    assert math.isfinite(res.metrics["final_losses"]["forget_loss"])
    assert seen == [False, False]
