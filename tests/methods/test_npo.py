"""NPO: the forget term from hand log-ratios (sequence sums), its limit as beta -> 0, its
declarations, and hyperparameter parsing."""

from __future__ import annotations

import pytest
import torch

from method_inputs import LN2, close, log_sigmoid, make_inputs, seqs
from unlearn import losses
from unlearn.errors import UnlearnError
from unlearn.methods import LossInputs, build_params, describe_methods, get_method, npo
from unlearn.methods.base import RetainTerm
from unlearn.methods.retain import objective


def test_npo_forget_term_from_hand_log_ratios() -> None:
    """Forget batch [A, B]: log pi = [-3 ln 2, -2 ln 2]; reference chosen so d = [-1, 2].

    forget = -(2/beta) * mean(log sigmoid(-beta * -1), log sigmoid(-beta * 2)), beta = 0.1;
    gamma = 1, alpha = 0 (no retain batch), so the loss is exactly that.
    """
    beta = 0.1
    ref = torch.tensor([-3 * LN2 + 1.0, -2 * LN2 - 2.0])
    inputs = make_inputs("AB", retain=None, ref_forget_logp=ref)
    loss, logs = npo.npo_loss(inputs, npo.NPOParams(beta=beta, alpha=0.0))
    expected = -(2 / beta) * (log_sigmoid(beta * 1.0) + log_sigmoid(-beta * 2.0)) / 2
    close(loss, expected)
    close(logs["forget_loss"], expected)
    close(logs["log_ratio"], 0.5)


def test_npo_at_init_is_two_over_beta_log_two() -> None:
    """pi_theta = pi_ref: d = 0, log sigmoid(0) = -ln 2, forget = (2/beta) ln 2 = 20 ln 2.

    Default weights gamma = alpha = 1 with NLL retain on B: total = 20 ln 2 + 2 ln 2.
    """
    logp, _ = losses.sequence_logprob(*seqs("A"))
    inputs = make_inputs("A", "B", ref_forget_logp=logp.clone())
    loss, logs = objective(npo.METHOD, inputs, npo.NPOParams())
    close(logs["forget_loss"], 20 * LN2)
    close(logs["log_ratio"], 0.0)
    close(loss, 22 * LN2)


def test_npo_uses_sequence_sums() -> None:
    """The same per-token log-ratio on a longer answer gives a larger d (sum, not mean).

    d = -1 on A's summed log-prob; with a token mean it would be -0.5 and the value would differ.
    """
    beta = 0.1
    logp, _ = losses.sequence_logprob(*seqs("A"))
    inputs = make_inputs("A", retain=None, ref_forget_logp=logp + 1.0)
    loss, _ = npo.npo_loss(inputs, npo.NPOParams(beta=beta, alpha=0.0))
    close(loss, -(2 / beta) * log_sigmoid(beta * 1.0))


def test_npo_tends_to_gradient_ascent_as_beta_goes_to_zero() -> None:
    """d/dtheta of -(2/beta) log sigmoid(-beta d) = 2 sigmoid(beta d) dd/dtheta -> dd/dtheta.

    So for small beta the gradient of the forget term equals that of mean_b log pi(y_b|x_b).
    """
    logits = torch.nn.Parameter(seqs("A", "B")[0].clone())
    labels = seqs("A", "B")[1]
    ref = losses.sequence_logprob(logits.detach(), labels)[0] + 0.3
    inputs = LossInputs(logits, labels, ref_forget_logp=ref)
    (grad_npo,) = torch.autograd.grad(
        npo.npo_loss(inputs, npo.NPOParams(beta=1e-6, alpha=0))[0], logits
    )
    (grad_ga,) = torch.autograd.grad(losses.sequence_logprob(logits, labels)[0].mean(), logits)
    torch.testing.assert_close(grad_npo, grad_ga, atol=1e-5, rtol=1e-4)


def test_npo_without_reference_logp_fails() -> None:
    with pytest.raises(ValueError, match="ref_forget_logp"):
        npo.npo_loss(make_inputs(), npo.NPOParams())


def test_needs_retain_and_reference_model() -> None:
    m = get_method("npo")
    assert m.needs_retain(m.params()) and not m.needs_reference_model(m.params())
    assert m.needs_reference_model(build_params(m, {"retain_loss": "kl"}))
    assert not m.needs_retain(build_params(m, {"retain_loss": "none"}))
    assert not m.needs_retain(build_params(m, {"alpha": "0"}))
    assert m.needs_reference_logp
    assert m.needs(m.params()).reference == ("sequence_logp",)
    assert m.needs(build_params(m, {"alpha": "0.5"})).retain == RetainTerm(0.5, "nll")


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(UnlearnError) as err:
        build_params("npo", {"betaa": 0.2})
    assert str(err.value) == (
        "unknown hyperparameter 'betaa' for method 'npo'; valid: beta, gamma, alpha, retain_loss"
    )


def test_strings_from_the_cli_are_coerced() -> None:
    params = build_params("npo", {"beta": "0.2", "alpha": "2", "retain_loss": "kl"})
    assert params == npo.NPOParams(beta=0.2, alpha=2.0, retain_loss="kl")
    assert isinstance(params.beta, float)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"retain_loss": "l2"}, "retain_loss"),
        ({"beta": "abc"}, "beta"),
        ({"beta": "0"}, "beta"),
        ({"beta": -1.0}, "beta"),
    ],
)
def test_invalid_values_are_one_line_errors_naming_the_field(overrides, field) -> None:
    with pytest.raises(UnlearnError) as err:
        build_params("npo", overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "npo" in msg


def test_describe_methods_shows_the_defaults() -> None:
    npo_line = next(line for line in describe_methods() if line.startswith("npo:"))
    assert "beta=0.1" in npo_line and "retain_loss=nll" in npo_line
