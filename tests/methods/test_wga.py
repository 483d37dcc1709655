"""WGA: the loss against a token-by-token hand computation, detached weights, the retain term, one
real training run on the tiny Llama, one-line errors for bad hyperparameters, and the listing."""

from __future__ import annotations

import pytest
import torch

import unlearn
from method_inputs import (
    FAST,
    random_batch,
    weighted_ascent_hand_loss,
    weighted_ascent_reference_grad,
)
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, describe_methods
from unlearn.methods.base import LossInputs
from unlearn.methods.retain import objective
from unlearn.methods.wga import METHOD as WGA
from unlearn.methods.wga import WGAParams, wga_loss

CASES = [
    (WGAParams(beta=1.0), lambda p: p),
    (WGAParams(beta=2.5), lambda p: p**2.5),
    (WGAParams(beta=0.0), lambda p: 1.0),  # gradient ascent
]


@pytest.mark.parametrize(("params", "weight"), CASES)
def test_loss_matches_hand_computation(params, weight):
    logits, labels = random_batch()
    params = WGAParams(**{**params.__dict__, "retain_loss": "none"})
    loss, logs = wga_loss(LossInputs(logits, labels), params)
    expected = params.gamma * weighted_ascent_hand_loss(logits, labels, weight)
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    hand = weighted_ascent_hand_loss(logits, labels, weight)
    assert logs["forget_loss"] == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize(("params", "weight"), CASES)
def test_weights_are_detached(params, weight):
    """The gradient is the weighted gradient-ascent one: sum_t w_t grad log p_t / N, w constant."""
    logits, labels = random_batch(1)
    params = WGAParams(**{**params.__dict__, "retain_loss": "none"})
    x = logits.clone().requires_grad_(True)
    wga_loss(LossInputs(x, labels), params)[0].backward()
    expected = weighted_ascent_reference_grad(logits, labels, weight, params.gamma)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-7)


def test_retain_term_is_added():
    logits, labels = random_batch()
    r_logits, r_labels = random_batch(2)
    inputs = LossInputs(logits, labels, r_logits, r_labels)
    loss, logs = objective(WGA, inputs, WGAParams(gamma=2.0))
    assert float(loss) == pytest.approx(2 * logs["forget_loss"] + logs["retain_loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"beta": "-1"}, "beta"), ({"beta": "inf"}, "beta"), ({"gamma": -1}, "gamma")],
)
def test_invalid_hyperparameters_are_one_line(overrides, field):
    with pytest.raises(UnlearnError) as err:
        build_params("wga", overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "wga" in msg


def test_describe_methods_lists_the_defaults():
    wga = next(line for line in describe_methods() if line.startswith("wga:"))
    assert "beta=1.0" in wga and "alpha=1.0" in wga


def test_training_raises_forget_nll(target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    res = unlearn.forget(
        str(target_dir), str(forget), str(retain), "wga", str(tmp_path / "out"),
        overrides=[*FAST, "train.lr=1e-3", "train.max_steps=2", "method.alpha=0"],
    )  # fmt: skip
    assert res.metrics["steps"] == 2
    before = res.metrics["nll_before"]["forget_nll"]
    after = res.metrics["nll_after"]["forget_nll"]
    assert after > before, f"wga: forget NLL {before:.4f} -> {after:.4f}"
    final = res.metrics["final_losses"]
    assert 0 < final["token_weight"] < 1 and "retain_loss" not in final
