"""WGA and SatImp: the loss against a token-by-token hand computation, detached weights, one real
training run on the tiny Llama, one-line errors for bad hyperparameters, and the registry listing."""

from __future__ import annotations

import math

import pytest
import torch

import unlearn
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, describe_methods
from unlearn.methods.base import LossInputs
from unlearn.methods.retain import objective
from unlearn.methods.satimp import METHOD as SATIMP
from unlearn.methods.satimp import SatImpParams, satimp_loss
from unlearn.methods.wga import METHOD as WGA
from unlearn.methods.wga import WGAParams, wga_loss

FAST = ["train.progress=false", "train.batch_size=2"]


def random_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 4, generator=gen) * 2
    labels = torch.tensor([[-100, -100, 1, 3, 0], [-100, 2, 2, 1, -100]])
    return logits, labels


def hand_loss(logits: torch.Tensor, labels: torch.Tensor, weight) -> float:
    """(1/N) sum over answer tokens of weight(p) * log p, one token at a time in plain floats."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            row = [float(v) for v in logits[b, t - 1]]
            logp = row[y] - math.log(sum(math.exp(v) for v in row))
            total += weight(math.exp(logp)) * logp
            count += 1
    return total / count


CASES = [
    ("wga", WGAParams(beta=1.0), lambda p: p),
    ("wga", WGAParams(beta=2.5), lambda p: p**2.5),
    ("wga", WGAParams(beta=0.0), lambda p: 1.0),  # gradient ascent
    ("satimp", SatImpParams(), lambda p: p**5 * (1 - p)),
    ("satimp", SatImpParams(beta1=0.5, beta2=2.0), lambda p: p**0.5 * (1 - p) ** 2),
]
LOSSES = {"wga": wga_loss, "satimp": satimp_loss}


@pytest.mark.parametrize(("name", "params", "weight"), CASES)
def test_loss_matches_hand_computation(name, params, weight):
    logits, labels = random_batch()
    params = type(params)(**{**params.__dict__, "retain_loss": "none"})
    loss, logs = LOSSES[name](LossInputs(logits, labels), params)
    expected = params.gamma * hand_loss(logits, labels, weight)
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert logs["forget_loss"] == pytest.approx(hand_loss(logits, labels, weight), rel=1e-5)


@pytest.mark.parametrize(("name", "params", "weight"), CASES)
def test_weights_are_detached(name, params, weight):
    """The gradient is the weighted gradient-ascent one: sum_t w_t grad log p_t / N, w constant."""
    logits, labels = random_batch(1)
    params = type(params)(**{**params.__dict__, "retain_loss": "none"})
    x = logits.clone().requires_grad_(True)
    LOSSES[name](LossInputs(x, labels), params)[0].backward()

    y = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(y[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[
        ..., 0
    ]
    mask = labels[:, 1:] != -100
    w = torch.tensor([[weight(math.exp(float(v))) for v in row] for row in logp.detach()])
    (params.gamma * (w * logp * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


def test_retain_term_is_added():
    logits, labels = random_batch()
    r_logits, r_labels = random_batch(2)
    inputs = LossInputs(logits, labels, r_logits, r_labels)
    loss, logs = objective(SATIMP, inputs, SatImpParams())
    assert float(loss) == pytest.approx(logs["forget_loss"] + 0.1 * logs["retain_loss"], rel=1e-5)
    loss, logs = objective(WGA, inputs, WGAParams(gamma=2.0))
    assert float(loss) == pytest.approx(2 * logs["forget_loss"] + logs["retain_loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("wga", {"beta": "-1"}, "beta"),
        ("wga", {"beta": "inf"}, "beta"),
        ("wga", {"gamma": -1}, "gamma"),
        ("satimp", {"beta1": -0.5}, "beta1"),
        ("satimp", {"beta2": "nan"}, "beta2"),
        ("satimp", {"alpha": -1}, "alpha"),
        ("satimp", {"retain_loss": "mse"}, "retain_loss"),
        ("satimp", {"beta": 1.0}, "beta"),
    ],
)
def test_invalid_hyperparameters_are_one_line(name, overrides, field):
    with pytest.raises(UnlearnError) as err:
        build_params(name, overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and name in msg


def test_describe_methods_lists_both():
    lines = describe_methods()
    wga = next(line for line in lines if line.startswith("wga:"))
    sat = next(line for line in lines if line.startswith("satimp:"))
    assert "beta=1.0" in wga and "alpha=1.0" in wga
    assert "beta1=5.0" in sat and "beta2=1.0" in sat and "alpha=0.1" in sat


@pytest.mark.parametrize("name", ["wga", "satimp"])
def test_training_raises_forget_nll(name, target_dir, qa_files, tmp_path, one_torch_thread):
    forget, retain = qa_files
    res = unlearn.forget(
        str(target_dir), str(forget), str(retain), name, str(tmp_path / "out"),
        overrides=[*FAST, "train.lr=1e-3", "train.max_steps=2", "method.alpha=0"],
    )  # fmt: skip
    assert res.metrics["steps"] == 2
    before = res.metrics["nll_before"]["forget_nll"]
    after = res.metrics["nll_after"]["forget_nll"]
    assert after > before, f"{name}: forget NLL {before:.4f} -> {after:.4f}"
    final = res.metrics["final_losses"]
    assert 0 < final["token_weight"] < 1 and "retain_loss" not in final
