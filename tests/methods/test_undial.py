"""UNDIAL: the loss against a hand computation on random logits, its gradient at the start, one
real run that raises the forget NLL from cached teacher logits, one-line errors for bad
hyperparameters, and the `unlearn methods` listing.

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
from unlearn.methods.undial import UNDIALParams, undial_loss

FAST = ["train.progress=false", "train.batch_size=2", "train.max_steps=2", "train.lr=1e-3"]


def hand_undial(logits, ref, labels, beta: float) -> float:
    terms = []
    for b, t, y in answer_positions(labels):
        teacher = ref[b, t].tolist()
        teacher[y] -= beta
        terms.append(soft_ce(softmax(teacher), logits[b, t].tolist()))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("beta", [0.0, 3.0, 10.0])
def test_undial_loss_matches_hand_computation(beta: float) -> None:
    logits, ref, labels = soft_target_batch()
    inputs = LossInputs(logits, labels, ref_forget={"logits": ref})
    loss, logs = undial_loss(inputs, UNDIALParams(beta=beta, gamma=0.5))
    assert float(loss) == pytest.approx(0.5 * hand_undial(logits, ref, labels, beta), rel=1e-5)
    assert logs["forget_loss"] == pytest.approx(hand_undial(logits, ref, labels, beta), rel=1e-5)


def test_undial_without_reference_logits_fails() -> None:
    logits, _, labels = soft_target_batch()
    with pytest.raises(ValueError, match="ref_forget"):
        undial_loss(LossInputs(logits, labels), UNDIALParams())


def test_undial_at_the_start_pushes_only_the_answer_token_down() -> None:
    """Student = teacher: with beta = 0 nothing moves; with beta > 0 a descent step on the logits
    lowers the answer token's logit and raises every other one (gradient = p - q)."""
    logits, _, labels = soft_target_batch(1)
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


def test_defaults_and_needs() -> None:
    assert UNDIALParams() == UNDIALParams(beta=10.0, gamma=1.0, alpha=0.0, retain_loss="nll")
    undial = get_method("undial")
    assert undial.needs(UNDIALParams()).reference == ("logits",)
    assert not undial.needs_retain(UNDIALParams())
    assert undial.needs_retain(UNDIALParams(alpha=1.0))
    assert not undial.needs_reference_model(UNDIALParams())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"beta": "-1"}, "beta"),
        ({"beta": "inf"}, "beta"),
        ({"gamma": "-0.5"}, "gamma"),
        ({"retain_loss": "l2"}, "retain_loss"),
        ({"delta": "1"}, "delta"),
    ],
)
def test_invalid_hyperparameters_are_one_line(overrides, field) -> None:
    with pytest.raises(UnlearnError) as err:
        build_params("undial", overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "undial" in msg


def test_overrides_are_coerced() -> None:
    assert build_params("undial", {"beta": "3"}).beta == 3.0


def test_describe_methods_lists_the_defaults() -> None:
    lines = {line.split(":")[0]: line for line in describe_methods()}
    assert "beta=10.0" in lines["undial"] and "alpha=0.0" in lines["undial"]


def test_two_steps_raise_the_forget_nll(tiny_model_dir, qa_files, tmp_path, monkeypatch) -> None:
    """Two optimizer steps in the real loop make the forget answers less likely; UNDIAL's teacher
    comes from cached logits (at step 1 equal to the model's own, at step 2 not), never from a
    frozen second model."""
    import unlearn.methods as methods
    import unlearn.train.setup as train_setup

    monkeypatch.setattr(train_setup, "frozen_copy", lambda *a: pytest.fail("kept a second model"))
    method, same = methods.METHODS["undial"], []

    def checking_loss(inputs, params):
        ref = inputs.ref_forget["logits"]
        mask = inputs.forget_labels[:, 1:] != -100
        own = inputs.forget_logits[:, :-1][mask].detach()
        same.append(torch.allclose(ref[:, :-1].to(own)[mask], own, atol=1e-4))
        return method.loss(inputs, params)

    monkeypatch.setitem(methods.METHODS, "undial", dataclasses.replace(method, loss=checking_loss))
    forget, retain = qa_files
    res = unlearn.forget(
        str(tiny_model_dir), str(forget), str(retain), "undial", str(tmp_path / "out"),
        overrides=FAST,
    )  # fmt: skip
    assert res.metrics["steps"] == 2
    assert res.metrics["nll_after"]["forget_nll"] > res.metrics["nll_before"]["forget_nll"]
    assert math.isfinite(res.metrics["final_losses"]["forget_loss"])
    assert same == [True, False]
