"""GradDiff: ascent on the forget set plus a weighted NLL or KL retain term, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from method_inputs import HALF, LN2, UNIFORM, close, make_inputs, seqs
from unlearn.errors import UnlearnError
from unlearn.methods import LossInputs, build_params, get_method, grad_diff
from unlearn.methods.retain import objective


def test_grad_diff_weighting_nll() -> None:
    """gamma=2, alpha=0.5, forget A, retain B: -2 * 1.5 ln 2 + 0.5 * 2 ln 2 = -2 ln 2."""
    params = grad_diff.GradDiffParams(gamma=2.0, alpha=0.5)
    loss, logs = objective(grad_diff.METHOD, make_inputs("A", "B"), params)
    close(loss, -2 * LN2)
    close(logs["retain_loss"], 2 * LN2)


def test_grad_diff_weighting_kl() -> None:
    """Retain logits uniform, reference HALF at t=0 (labels [-100, 0, 0]).

    KL term = 1/4 ln(9/8) (derived in test_losses.test_kl_hand_value_and_direction), so
    loss = -2 * 1.5 ln 2 + 0.5 * 1/4 ln(9/8).
    """
    inputs = LossInputs(
        *seqs("A"),
        retain_logits=torch.tensor([[UNIFORM, UNIFORM, UNIFORM]]),
        retain_labels=torch.tensor([[-100, 0, 0]]),
        ref_retain_logits=torch.tensor([[HALF, UNIFORM, UNIFORM]]),
    )
    params = grad_diff.GradDiffParams(gamma=2.0, alpha=0.5, retain_loss="kl")
    loss, _ = objective(grad_diff.METHOD, inputs, params)
    close(loss, -3 * LN2 + 0.125 * math.log(9 / 8))


def test_grad_diff_alpha_zero_needs_no_retain_batch() -> None:
    """alpha=0: Method.needs_retain is False, so the loop sends no retain batch; loss = -1.5 ln 2."""
    params = grad_diff.GradDiffParams(alpha=0.0)
    assert not grad_diff.METHOD.needs_retain(params)
    loss, logs = grad_diff.grad_diff_loss(make_inputs(retain=None), params)
    close(loss, -1.5 * LN2)
    assert "retain_loss" not in logs
    assert get_method("grad_diff").needs(build_params("grad_diff", {"alpha": "0"})).retain is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"retain_loss": "none"}, "retain_loss"), ({"alpha": "-1"}, "alpha")],
)
def test_invalid_values_are_one_line_errors_naming_the_field(overrides, field) -> None:
    with pytest.raises(UnlearnError) as err:
        build_params("grad_diff", overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "grad_diff" in msg
