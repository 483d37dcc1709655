"""SimNPO: the reference-free, length-normalised forget term by hand (and in the paper's
notation), its default weighting, and hyperparameter errors."""

from __future__ import annotations

import pytest

from method_inputs import LN2, close, log_sigmoid, make_inputs
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, describe_methods, simnpo
from unlearn.methods.retain import objective


@pytest.mark.parametrize("delta", [0.0, 0.5])
def test_simnpo_forget_term(delta: float) -> None:
    """A: avg NLL = 3 ln 2 / 2 = 1.5 ln 2; forget = -(2/beta) log sigmoid(beta (1.5 ln 2 - delta)).

    In the paper's notation, log sigmoid(-(beta/|y|) log pi - gamma_paper) with gamma_paper =
    beta * delta: the same number.
    """
    beta = 4.5
    params = simnpo.SimNPOParams(beta=beta, delta=delta, gamma=1.0, alpha=0.0)
    loss, _ = simnpo.simnpo_loss(make_inputs("A", retain=None), params)
    expected = -(2 / beta) * log_sigmoid(beta * (1.5 * LN2 - delta))
    close(loss, expected)
    paper = -(2 / beta) * log_sigmoid(-(beta / 2) * (-3 * LN2) - beta * delta)
    close(loss, paper)


def test_simnpo_is_length_normalised() -> None:
    """B (1 token, NLL 2 ln 2) and C (2 tokens, 2 ln 2 each) have the same per-token NLL, so the
    same SimNPO term, although log pi(C) = 2 log pi(B)."""
    params = simnpo.SimNPOParams(gamma=1.0, alpha=0.0)
    loss_b, _ = simnpo.simnpo_loss(make_inputs("B", retain=None), params)
    loss_c, _ = simnpo.simnpo_loss(make_inputs("C", retain=None), params)
    close(loss_b, float(loss_c))
    close(loss_b, -(2 / 4.5) * log_sigmoid(4.5 * 2 * LN2))


def test_simnpo_default_weighting() -> None:
    """Defaults gamma = 0.125, alpha = 1, beta = 4.5, NLL retain on B (= 2 ln 2)."""
    loss, logs = objective(simnpo.METHOD, make_inputs("A", "B"), simnpo.SimNPOParams())
    forget = -(2 / 4.5) * log_sigmoid(4.5 * 1.5 * LN2)
    close(loss, 0.125 * forget + 2 * LN2)
    close(logs["forget_loss"], forget)
    assert not simnpo.METHOD.needs_reference_logp


@pytest.mark.parametrize(
    ("overrides", "field"), [({"beta": "-0.5"}, "beta"), ({"beta": "nan"}, "beta")]
)
def test_invalid_values_are_one_line_errors_naming_the_field(overrides, field) -> None:
    with pytest.raises(UnlearnError) as err:
        build_params("simnpo", overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "simnpo" in msg


def test_describe_methods_shows_delta() -> None:
    assert any(line.startswith("simnpo:") and "delta=0.0" in line for line in describe_methods())
