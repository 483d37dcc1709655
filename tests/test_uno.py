"""UNO and UNO-S: the loss terms against plain-float hand computations, what they declare to the
loop, one-line errors, and a real 2-step run of each on the tiny Llama.

Whether the loop differentiates the penalty / projects correctly is tested with the loop."""

from __future__ import annotations

import math

import pytest
import torch

import unlearn
from unlearn.errors import UnlearnError
from unlearn.methods import build_params
from unlearn.methods import uno as uno_module
from unlearn.methods import uno_s as uno_s_module
from unlearn.methods.base import LossInputs
from unlearn.methods.uno import UNOParams, uno_loss
from unlearn.methods.uno_s import UNOSParams, uno_s_loss

FAST = ["train.progress=false", "train.batch_size=2"]
MODULES = {"uno": uno_module, "uno_s": uno_s_module}


@pytest.fixture
def registered(monkeypatch):
    for name, module in MODULES.items():
        monkeypatch.setitem(unlearn.methods.METHODS, name, module.METHOD)


def random_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 4, generator=gen) * 2
    labels = torch.tensor([[-100, -100, 1, 3, 0], [-100, 2, 2, 1, -100]])
    return logits, labels


def hand_nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log p(y_t | y_<t) over answer tokens, one token at a time in plain floats."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            row = [float(v) for v in logits[b, t - 1]]
            total -= row[y] - math.log(sum(math.exp(v) for v in row))
            count += 1
    return total / count


@pytest.mark.parametrize(
    ("loss_fn", "params"),
    [
        (uno_loss, UNOParams(gamma=0.5, alpha=2.0, lam=3.0)),
        (uno_s_loss, UNOSParams(gamma=0.5, alpha=2.0)),
    ],
)
def test_loss_terms_match_hand_computation(loss_fn, params):
    f_logits, f_labels = random_batch(0)
    r_logits, r_labels = random_batch(1)
    loss, logs = loss_fn(LossInputs(f_logits, f_labels, r_logits, r_labels), params)
    f_nll = hand_nll(f_logits, f_labels)
    assert float(loss) == pytest.approx(-0.5 * f_nll, rel=1e-5)
    assert logs["forget_nll"] == pytest.approx(f_nll, rel=1e-5)


def test_needs_declare_the_gradient_combination():
    needs = uno_module.METHOD.needs(UNOParams(lam=0.25, alpha=3.0, retain_loss="kl"))
    assert (needs.gradients, needs.orthogonal_weight) == ("orthogonal", 0.25)
    assert needs.retain is not None and (needs.retain.weight, needs.retain.kind) == (3.0, "kl")
    needs = uno_s_module.METHOD.needs(UNOSParams())
    assert (needs.gradients, needs.project_always) == ("project", False)
    assert needs.retain is not None and needs.retain.weight == 1.0
    assert uno_s_module.METHOD.needs(UNOSParams(project_always=True)).project_always


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("uno", {"lam": -1}, "lam"),
        ("uno", {"lam": "nan"}, "lam"),
        ("uno", {"lam": "inf"}, "lam"),
        ("uno", {"alpha": 0}, "alpha"),
        ("uno", {"gamma": 0}, "gamma"),
        ("uno", {"retain_loss": "none"}, "retain_loss"),
        ("uno_s", {"alpha": 0}, "alpha"),
        ("uno_s", {"gamma": -1}, "gamma"),
        ("uno_s", {"lam": 1.0}, "lam"),
    ],
)
def test_invalid_hyperparameters_are_one_line(registered, name, overrides, field):
    with pytest.raises(UnlearnError) as err:
        build_params(name, overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and name in msg


@pytest.mark.parametrize("name", ["uno", "uno_s"])
def test_no_retain_set_is_one_line(registered, name, target_dir, qa_files, tmp_path):
    forget, _ = qa_files
    with pytest.raises(UnlearnError) as err:
        unlearn.forget(str(target_dir), str(forget), None, name, str(tmp_path / "out"))
    msg = str(err.value)
    assert "\n" not in msg and "retain" in msg and name in msg


@pytest.mark.parametrize("name", ["uno", "uno_s"])
def test_training_raises_forget_nll(
    registered, name, target_dir, qa_files, tmp_path, one_torch_thread
):
    forget, retain = qa_files
    res = unlearn.forget(
        str(target_dir), str(forget), str(retain), name, str(tmp_path / "out"),
        overrides=[*FAST, "train.lr=1e-3", "train.max_steps=2"],
    )  # fmt: skip
    assert res.metrics["steps"] == 2
    before = res.metrics["nll_before"]["forget_nll"]
    after = res.metrics["nll_after"]["forget_nll"]
    assert after > before, f"{name}: forget NLL {before:.4f} -> {after:.4f}"
    final = res.metrics["final_losses"]
    assert -1.0 <= final["grad_cos"] <= 1.0 and final["grad_cos"] != 0.0
    assert "retain_loss" in final and "forget_nll" in final
    if name == "uno":
        assert final["orthogonal_penalty"] == pytest.approx(final["grad_cos"] ** 2, rel=1e-4)
