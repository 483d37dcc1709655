"""IdkDPO: DPO preferring a refusal over the forget answer. Its refusals come from its own hook
(question/answer data only), its defaults are DPO's, and a real run trains on data without a
`preferred` column. The DPO loss itself: tests/methods/test_dpo.py."""

from __future__ import annotations

import math

import pytest

import unlearn
from method_inputs import LN2, close, dpo_inputs
from unlearn.cli import main
from unlearn.data import Example
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, get_method
from unlearn.methods.idk_dpo import IdkDPOParams
from unlearn.methods.retain import objective

FAST = ["train.progress=false", "train.batch_size=2", "train.max_steps=2", "train.nll_check=false"]


def test_idk_dpo_at_the_start_is_two_over_beta_log_two_plus_retain() -> None:
    inputs = dpo_inputs("A", "B", [0.0], [0.0], retain="B")
    loss, _ = objective(get_method("idk_dpo"), inputs, IdkDPOParams())
    close(loss, 20 * LN2 + 2 * LN2)  # defaults beta 0.1, gamma = alpha = 1, NLL retain on B


def test_defaults_and_validation() -> None:
    assert IdkDPOParams().refusals is None and IdkDPOParams().beta == 0.1
    assert build_params("idk_dpo", {"refusals": "r.txt", "beta": "0.2"}).beta == 0.2
    with pytest.raises(UnlearnError, match="beta"):
        build_params("idk_dpo", {"beta": "0"})
    with pytest.raises(UnlearnError, match="gamma"):
        build_params("idk_dpo", {"gamma": "-1"})


def test_no_reference_model_and_both_answers_cached_by_declaration() -> None:
    method = get_method("idk_dpo")
    needs = method.needs(method.params())
    assert needs.second_target and needs.reference == ("sequence_logp",)
    assert not method.needs_reference_model(method.params())
    assert method.needs_reference_model(build_params(method, {"retain_loss": "kl"}))
    assert not method.needs_retain(build_params(method, {"alpha": "0"}))
    assert method.forget_targets is None  # the data's answer is the rejected one
    assert method.second_targets is not None


def test_second_targets_are_refusals() -> None:
    qa = [
        Example(str(i), "h", question=f"Q{i}?", answer=f"A{i}.", preferred=f"P{i}.") for i in (0, 1)
    ]
    idk = get_method("idk_dpo")
    refusals = idk.second_targets(qa, idk.params(), 0)
    assert refusals == idk.second_targets(qa, idk.params(), 0) and len(refusals) == 2
    assert not {"A0.", "A1.", "P0.", "P1."} & set(refusals)  # refusals, not the data's answers
    doc = [Example("d", "h", text="a document")]
    with pytest.raises(UnlearnError, match=r"'idk_dpo'.*question/answer"):
        idk.second_targets(doc, idk.params(), 0)


def test_forget_end_to_end_without_a_preferred_column(tiny_model_dir, qa_files, tmp_path):
    forget, retain = qa_files
    res = unlearn.forget(
        str(tiny_model_dir), str(forget), str(retain), "idk_dpo", str(tmp_path / "out"),
        overrides=[*FAST, "train.lr=1e-3"],
    )  # fmt: skip
    assert res.metrics["steps"] == 2
    final = res.metrics["final_losses"]
    for key in ("forget_loss", "win_log_ratio", "lose_log_ratio", "preferred_nll"):
        assert math.isfinite(final[key])
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_cli_lists_the_defaults(capsys) -> None:
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    idk = next(line for line in lines if line.startswith("idk_dpo:"))
    assert "refusals=None" in idk and "beta=0.1" in idk
