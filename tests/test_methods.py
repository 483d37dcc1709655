"""Every method's loss against hand-computed values, the registry, and the refusal lists.

The tiny sequences (vocabulary 3, logit rows [ln 2, 0, 0] -> softmax [1/2, 1/4, 1/4]):
  A: labels [-100, 0, 1], answer log-probs [-ln 2, -2 ln 2]: log pi(y|x) = -3 ln 2, |y| = 2,
     NLL = 1.5 ln 2.
  B: labels [-100, -100, 2], answer log-prob [-2 ln 2]: log pi(y|x) = -2 ln 2, |y| = 1, NLL = 2 ln 2.
  C: labels [-100, 1, 1], answer log-probs [-2 ln 2, -2 ln 2]: log pi = -4 ln 2, |y| = 2,
     per-token NLL 2 ln 2 (the same as B's, twice as long).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from unlearn import losses
from unlearn.errors import UnlearnError
from unlearn.methods import (
    METHODS,
    LossInputs,
    build_params,
    describe_methods,
    finetune,
    get_method,
    grad_ascent,
    grad_diff,
    idk_nll,
    npo,
    simnpo,
)
from unlearn.methods.base import RetainTerm
from unlearn.methods.retain import objective, retain_term
from unlearn.refusals import load_refusals, pick_refusal

LN2 = math.log(2)
HALF = [LN2, 0.0, 0.0]
UNIFORM = [0.0, 0.0, 0.0]
TOFU_IDK = Path("/work/shared/data/tofu/idontknow.jsonl")


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
    return math.log(1.0 / (1.0 + math.exp(-x)))


def make_inputs(forget: str = "A", retain: str | None = "B", **extra) -> LossInputs:
    f_logits, f_labels = seqs(*forget)
    r_logits, r_labels = seqs(*retain) if retain else (None, None)
    return LossInputs(f_logits, f_labels, r_logits, r_labels, **extra)


def close(value: torch.Tensor | float, expected: float) -> None:
    assert float(value) == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---- forget-only methods -------------------------------------------------------------------------


def test_grad_ascent_is_negative_forget_nll() -> None:
    """A: -NLL = -1.5 ln 2."""
    loss, logs = grad_ascent.grad_ascent_loss(
        make_inputs(retain=None), grad_ascent.GradAscentParams()
    )
    close(loss, -1.5 * LN2)
    close(logs["forget_nll"], 1.5 * LN2)


def test_finetune_is_forget_nll() -> None:
    """A: NLL = 1.5 ln 2 (the loop passes the training data as the forget batch)."""
    loss, _ = finetune.finetune_loss(make_inputs(retain=None), finetune.FinetuneParams())
    close(loss, 1.5 * LN2)


# ---- retain term ---------------------------------------------------------------------------------


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


# ---- GradDiff --------------------------------------------------------------------------------------


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


# ---- NPO -------------------------------------------------------------------------------------------


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


# ---- SimNPO ----------------------------------------------------------------------------------------


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


# ---- IdkNLL ----------------------------------------------------------------------------------------


def test_idk_nll_is_nll_on_refusals_plus_retain() -> None:
    """Forget batch A (already carrying refusal answers), retain B: 1.5 ln 2 + 2 ln 2."""
    loss, logs = objective(idk_nll.METHOD, make_inputs("A", "B"), idk_nll.IdkNLLParams())
    close(loss, 3.5 * LN2)
    close(logs["refusal_nll"], 1.5 * LN2)
    params = idk_nll.IdkNLLParams(gamma=2.0, alpha=0.5)
    close(objective(idk_nll.METHOD, make_inputs("A", "B"), params)[0], 3 * LN2 + LN2)
    assert idk_nll.METHOD.forget_targets is idk_nll.refusal_targets


# ---- gradient direction ----------------------------------------------------------------------------


def _forget_nll_after_step(name: str, **overrides) -> tuple[float, float]:
    """One SGD step on a free logits tensor; returns forget NLL before and after."""
    torch.manual_seed(0)
    logits = torch.nn.Parameter(torch.randn(2, 4, 5))
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 0]])
    retain_logits = torch.nn.Parameter(torch.randn(1, 4, 5))
    retain_labels = torch.tensor([[-100, 0, 1, 2]])
    method = get_method(name)
    inputs = LossInputs(logits, labels, retain_logits, retain_labels)
    if method.needs_reference_logp:
        inputs.ref_forget_logp = losses.sequence_logprob(logits.detach(), labels)[0]
    if "logits" in method.needs(method.params()).reference:  # UNDIAL: the starting model's logits
        inputs.ref_forget = {"logits": logits.detach().clone()}
    if "reinforced_logits" in method.needs(method.params()).reference:  # WHP: a reinforced gain
        gain = torch.zeros_like(logits)
        gain[:, :-1].scatter_(-1, labels[:, 1:].clamp(min=0)[..., None], 5.0)
        inputs.ref_forget["reinforced_logits"] = logits.detach() + gain
    if method.needs(method.params()).second_target:  # DPO: a preferred answer, its own logits
        inputs.second_logits = torch.nn.Parameter(torch.randn(2, 4, 5))
        inputs.second_labels = torch.tensor([[-100, 0, 0, 1], [-100, -100, 3, 3]])
        s_logp = losses.sequence_logprob(inputs.second_logits.detach(), inputs.second_labels)[0]
        inputs.ref_second = {"sequence_logp": s_logp}
    before = losses.nll(logits.detach(), labels).item()
    loss, _ = method.loss(inputs, build_params(method, overrides))
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    return before, losses.nll(logits.detach(), labels).item()


@pytest.mark.parametrize(
    "name",
    ["grad_ascent", "grad_diff", "npo", "simnpo", "undial", "ce_u", "wga", "satimp", "dpo",
     "idk_dpo", "whp", "uno", "uno_s"],
)  # fmt: skip
def test_unlearning_step_increases_forget_nll(name: str) -> None:
    before, after = _forget_nll_after_step(name)
    assert after > before


@pytest.mark.parametrize("name", ["finetune", "idk_nll", "task_vector"])
def test_learning_step_decreases_forget_nll(name: str) -> None:
    before, after = _forget_nll_after_step(name)
    assert after < before


# ---- registry --------------------------------------------------------------------------------------


def test_registry_lists_every_method_once() -> None:
    assert list(METHODS) == [
        "grad_ascent",
        "grad_diff",
        "npo",
        "simnpo",
        "undial",
        "ce_u",
        "wga",
        "satimp",
        "rmu",
        "pdu",
        "uno",
        "uno_s",
        "whp",
        "task_vector",
        "idk_nll",
        "dpo",
        "idk_dpo",
        "finetune",
    ]
    for name, method in METHODS.items():
        assert method.name == name
        assert dataclasses.is_dataclass(method.params)
        assert method.params.__dataclass_params__.frozen
        assert build_params(method, {}) == method.params()
        assert method.citation


def test_every_method_runs_on_full_inputs() -> None:
    """With every optional tensor present, each loss is a finite scalar and its logs are floats."""
    for method in METHODS.values():
        inputs = make_inputs("AB", "B", ref_forget_logp=torch.tensor([-2.0, -1.0]))
        inputs.ref_retain_logits = inputs.retain_logits.clone()
        inputs.second_logits, inputs.second_labels = seqs("C", "A")
        inputs.ref_second = {"sequence_logp": torch.tensor([-3.0, -2.0])}
        inputs.ref_forget = {
            "logits": inputs.forget_logits.detach().clone(),
            "reinforced_logits": inputs.forget_logits.detach().clone(),
        }
        for layer in method.needs(method.params()).hidden_layers:  # RMU: one block's outputs
            inputs.forget_hidden[layer] = torch.randn(*inputs.forget_labels.shape, 8)
            inputs.retain_hidden[layer] = torch.randn(*inputs.retain_labels.shape, 8)
            inputs.ref_retain_hidden[layer] = torch.randn(*inputs.retain_labels.shape, 8)
        loss, logs = method.loss(inputs, method.params())
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert all(isinstance(v, float) for v in logs.values())


def test_needs_retain_and_reference_model() -> None:
    assert not get_method("grad_ascent").needs_retain(build_params("grad_ascent", {}))
    assert not get_method("finetune").needs_retain(build_params("finetune", {}))
    m = get_method("npo")
    assert m.needs_retain(m.params()) and not m.needs_reference_model(m.params())
    assert m.needs_reference_model(build_params(m, {"retain_loss": "kl"}))
    assert not m.needs_retain(build_params(m, {"retain_loss": "none"}))
    assert not m.needs_retain(build_params(m, {"alpha": "0"}))
    assert m.needs_reference_logp
    assert m.needs(m.params()).reference == ("sequence_logp",)
    assert m.needs(build_params(m, {"alpha": "0.5"})).retain == RetainTerm(0.5, "nll")
    assert get_method("grad_diff").needs(build_params("grad_diff", {"alpha": "0"})).retain is None


def test_refusal_targets_are_the_methods_hook() -> None:
    """idk_nll's forget answers come from its own hook: stable per (index, seed), Q/A only."""
    from unlearn.data import Example
    from unlearn.errors import UnlearnError

    qa = [Example(str(i), "h", question=f"Q{i}?", answer=f"A{i}.") for i in range(5)]
    params = idk_nll.IdkNLLParams()
    first = idk_nll.refusal_targets(qa, params, 3)
    assert first == idk_nll.refusal_targets(qa, params, 3) and len(first) == 5
    assert not {e.answer for e in qa} & set(first)
    doc = [Example("d", "h", text="some document")]
    with pytest.raises(UnlearnError, match="question/answer"):
        idk_nll.refusal_targets(doc, params, 0)


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(UnlearnError) as err:
        get_method("nop")
    msg = str(err.value)
    assert "\n" not in msg and "'nop'" in msg and "npo" in msg and "grad_diff" in msg


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
    assert build_params("idk_nll", {"refusals": "my.txt"}).refusals == "my.txt"


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("npo", {"retain_loss": "l2"}, "retain_loss"),
        ("grad_diff", {"retain_loss": "none"}, "retain_loss"),
        ("npo", {"beta": "abc"}, "beta"),
        ("npo", {"beta": "0"}, "beta"),
        ("npo", {"beta": -1.0}, "beta"),
        ("simnpo", {"beta": "-0.5"}, "beta"),
        ("simnpo", {"beta": "nan"}, "beta"),
        ("grad_diff", {"alpha": "-1"}, "alpha"),
    ],
)
def test_invalid_values_are_one_line_errors_naming_the_field(name, overrides, field) -> None:
    with pytest.raises(UnlearnError) as err:
        build_params(name, overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and name in msg


def test_describe_methods_shows_every_default() -> None:
    lines = describe_methods()
    assert len(lines) == len(METHODS)
    npo_line = next(line for line in lines if line.startswith("npo:"))
    assert "beta=0.1" in npo_line and "retain_loss=nll" in npo_line
    assert any(line.startswith("simnpo:") and "delta=0.0" in line for line in lines)
    assert all("\n" not in line for line in lines)


# ---- refusals --------------------------------------------------------------------------------------


def test_builtin_refusals() -> None:
    refusals = load_refusals(None)
    assert len(refusals) >= 60
    assert len(set(refusals)) == len(refusals)
    assert all(r == r.strip() and r for r in refusals)


@pytest.mark.skipif(not TOFU_IDK.exists(), reason="TOFU data not available")
def test_builtin_refusals_are_not_tofus() -> None:
    tofu = set(load_refusals(str(TOFU_IDK)))
    assert not tofu & set(load_refusals(None))


@pytest.mark.skipif(not TOFU_IDK.exists(), reason="TOFU data not available")
def test_tofu_idontknow_jsonl_loads() -> None:
    """TOFU's idontknow.jsonl holds plain lines, not JSON; each becomes one refusal."""
    refusals = load_refusals(str(TOFU_IDK))
    assert len(refusals) == sum(1 for line in TOFU_IDK.read_text().splitlines() if line.strip())
    assert all(not r.startswith('"') for r in refusals)


def test_user_jsonl_txt_and_json(tmp_path: Path) -> None:
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps("No idea.") + "\n\n" + json.dumps({"text": "Can't say."}) + "\n")
    assert load_refusals(str(jsonl)) == ["No idea.", "Can't say."]
    txt = tmp_path / "r.txt"
    txt.write_text("One.\n  Two.  \n\n")
    assert load_refusals(str(txt)) == ["One.", "Two."]
    js = tmp_path / "r.json"
    js.write_text(json.dumps(["A.", "B."]))
    assert load_refusals(str(js)) == ["A.", "B."]


def test_bad_refusal_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "x"}\n')
    for path, words in [
        (empty, "no refusal sentences"),
        (tmp_path / "missing.txt", "not found"),
        (bad, "line 1"),
    ]:
        with pytest.raises(UnlearnError, match=words) as err:
            load_refusals(str(path))
        assert "\n" not in str(err.value)


def test_pick_refusal_is_deterministic() -> None:
    refusals = load_refusals(None)
    picks = [pick_refusal(refusals, i, seed=0) for i in range(50)]
    assert picks == [pick_refusal(refusals, i, seed=0) for i in range(50)]
    assert len(set(picks)) > 10
    assert picks != [pick_refusal(refusals, i, seed=1) for i in range(50)]
    assert all(p in refusals for p in picks)
    with pytest.raises(UnlearnError):
        pick_refusal([], 0, 0)
