"""UNO (Mandal & Gottwald 2025, the authors' pinakm9/forget): the method's terms against hand
computations, what it declares, one-line errors, and a real run from the command line. Its
gradient combination against hand autograd: tests/train/test_gradients.py."""

from __future__ import annotations

import pytest
import torch

import unlearn
from method_inputs import random_batch, weighted_ascent_hand_loss
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, get_method
from unlearn.methods.base import LossInputs
from unlearn.methods.uno import UNOParams, forget_probe, substitute_loss

FAST = ["train.progress=false", "train.batch_size=2"]


def hand_nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log p(y_t | y_<t) over answer tokens, in plain floats."""
    return -weighted_ascent_hand_loss(logits, labels, lambda p: 1.0)


def test_loss_is_the_substitute_nll_and_the_probe_the_forget_nll():
    """No ascent: the loss descends the substitute answers; the forget answers' NLL is the probe,
    whose gradient only enters the cosine."""
    f_logits, f_labels = random_batch(0)
    s_logits, s_labels = random_batch(1)
    inputs = LossInputs(f_logits, f_labels, second_logits=s_logits, second_labels=s_labels)
    loss, logs = substitute_loss(inputs, UNOParams(gamma=0.5))
    assert float(loss) == pytest.approx(0.5 * hand_nll(s_logits, s_labels), rel=1e-5)
    assert logs["forget_nll"] == pytest.approx(hand_nll(f_logits, f_labels), rel=1e-5)
    assert float(forget_probe(inputs, UNOParams())) == pytest.approx(
        hand_nll(f_logits, f_labels), rel=1e-5
    )
    none, _ = substitute_loss(
        LossInputs(f_logits.requires_grad_(), f_labels), UNOParams(substitute="none")
    )
    assert float(none) == 0.0 and none.requires_grad


def test_needs_declare_uno_gradients_a_probe_and_substitute_answers():
    method = get_method("uno")
    needs = method.needs(UNOParams(lam=0.25, alpha=3.0, retain_loss="kl"))
    assert (needs.gradients, needs.orthogonal_weight, needs.second_target) == ("uno", 0.25, True)
    assert needs.retain is not None and (needs.retain.weight, needs.retain.kind) == (3.0, "kl")
    assert method.probe is forget_probe
    assert not method.needs(UNOParams(substitute="none")).second_target
    assert UNOParams().lam == 0.02  # the authors' ImageNet DiT setting (mean-reduced losses)


def test_substitutes_are_refusals_one_per_example():
    from unlearn.data import Example

    examples = [Example(str(i), "h", question=f"Q{i}?", answer="A.") for i in range(3)]
    answers = get_method("uno").second_targets(examples, UNOParams(), 0)
    assert len(answers) == 3 and all(isinstance(a, str) and a for a in answers)
    assert answers == get_method("uno").second_targets(examples, UNOParams(), 0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lam": -1}, "lam"),
        ({"lam": "nan"}, "lam"),
        ({"lam": "inf"}, "lam"),
        ({"gamma": -1}, "gamma"),
        ({"alpha": 0, "substitute": "none"}, "alpha"),
        ({"retain_loss": "none"}, "retain_loss"),
        ({"substitute": "ascent"}, "substitute"),
    ],
)
def test_invalid_hyperparameters_are_one_line(overrides, field):
    with pytest.raises(UnlearnError) as err:
        build_params("uno", overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "uno" in msg


def test_no_retain_set_is_one_line(target_dir, qa_files, tmp_path):
    forget, _ = qa_files
    with pytest.raises(UnlearnError) as err:
        unlearn.forget(str(target_dir), str(forget), None, "uno", str(tmp_path / "out"))
    msg = str(err.value)
    assert "\n" not in msg and "retain" in msg and "uno" in msg


def test_steps_on_one_batch_learn_the_refusals(target_dir, qa_files, tmp_path, one_torch_thread):
    forget, retain = qa_files
    res = unlearn.forget(
        str(target_dir), str(forget), str(retain), "uno", str(tmp_path / "out"),
        overrides=["train.progress=false", "train.batch_size=16", "train.lr=1e-3",
                   "train.max_steps=3"],
    )  # fmt: skip
    history = [
        __import__("json").loads(line)
        for line in (tmp_path / "out" / "logs" / "train.jsonl").read_text().splitlines()
    ]
    assert res.metrics["steps"] == 3
    final = res.metrics["final_losses"]
    assert -1.0 <= final["grad_cos"] <= 1.0 and final["grad_cos"] != 0.0
    assert final["orthogonal_penalty"] == pytest.approx(final["grad_cos"] ** 2, rel=1e-4)
    assert {"retain_loss", "forget_nll", "substitute_nll", "probe_loss"} <= set(final)
    assert history[-1]["substitute_nll"] < history[0]["substitute_nll"]
