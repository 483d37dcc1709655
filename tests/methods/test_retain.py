"""The shared retain term (`unlearn.methods.retain`) by hand, and for every registered method: its
loss is its forget term only, and the declared retain term is the rest of its objective."""

from __future__ import annotations

import dataclasses
import math

import pytest

from method_inputs import LN2, close, full_inputs, make_inputs
from unlearn.methods import METHODS
from unlearn.methods.retain import objective, retain_term


def test_retain_term_nll_kl_none() -> None:
    """nll on B = 2 ln 2; kl against identical reference = 0; none = 0 without a retain batch."""
    inputs = make_inputs(retain="B")
    close(retain_term("nll", inputs), 2 * LN2)
    inputs.ref_retain_logits = inputs.retain_logits.clone()
    close(retain_term("kl", inputs), 0.0)
    close(retain_term("none", make_inputs(retain=None)), 0.0)


def test_retain_term_errors() -> None:
    with pytest.raises(ValueError, match="retain_logits"):
        retain_term("nll", make_inputs(retain=None))
    with pytest.raises(ValueError, match="ref_retain_logits"):
        retain_term("kl", make_inputs(retain="B"))
    with pytest.raises(ValueError, match="unknown retain_loss"):
        retain_term("l2", make_inputs())  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(METHODS))
def test_a_methods_loss_is_its_forget_term_and_the_retain_term_is_the_declared_one(name):
    """The retain term is stated once (`needs().retain`): a method's loss ignores retain inputs,
    and the loop's forget pass plus its weighted retain pass is the method's whole objective."""
    method = METHODS[name]
    params = method.params()
    with_retain = full_inputs(method, params)
    forget_only = dataclasses.replace(
        with_retain,
        retain_logits=None,
        retain_labels=None,
        ref_retain_logits=None,
        retain_hidden={},
        ref_retain_hidden={},
    )
    forget_part, _ = method.loss(forget_only, params)
    assert float(method.loss(with_retain, params)[0]) == float(forget_part)
    term = method.needs(params).retain
    joint, logs = objective(method, with_retain, params)
    if term is None:
        assert float(joint) == float(forget_part) and "retain_loss" not in logs
        return
    value = term.loss(with_retain) if term.loss is not None else retain_term(term.kind, with_retain)
    weight = term.weight * (with_retain.state[term.state_weight] if term.state_weight else 1.0)
    assert float(value) != 0 and math.isfinite(logs["retain_loss"])
    assert float(forget_part + weight * value) == pytest.approx(float(joint), rel=1e-6)
