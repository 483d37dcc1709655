"""Gradient ascent: the negated forget NLL, by hand, and no retain term."""

from __future__ import annotations

from method_inputs import LN2, close, make_inputs
from unlearn.methods import build_params, get_method, grad_ascent


def test_grad_ascent_is_negative_forget_nll() -> None:
    """A: -NLL = -1.5 ln 2."""
    loss, logs = grad_ascent.grad_ascent_loss(
        make_inputs(retain=None), grad_ascent.GradAscentParams()
    )
    close(loss, -1.5 * LN2)
    close(logs["forget_nll"], 1.5 * LN2)


def test_grad_ascent_needs_no_retain_batch() -> None:
    assert not get_method("grad_ascent").needs_retain(build_params("grad_ascent", {}))
