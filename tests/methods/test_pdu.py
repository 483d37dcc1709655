"""PDU: the margin-flattening loss against a hand computation, the dual rule by hand, the
dual-weighted retain term, real training runs on the tiny Llama (the dual moves as the rule says
and survives --resume), and one-line errors for bad hyperparameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unlearn
from method_inputs import FAST, random_batch
from unlearn import losses
from unlearn.errors import UnlearnError
from unlearn.methods import build_params
from unlearn.methods.base import LossInputs, StepInfo
from unlearn.methods.pdu import METHOD as PDU
from unlearn.methods.pdu import PDUParams, pdu_loss, pdu_update_state
from unlearn.methods.retain import objective
from unlearn.train.checkpoint import read_progress
from unlearn.train.loop import latest_checkpoint


def hand_margin(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over answer tokens of (max - mean of the logits predicting it)^2, in plain floats."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if int(labels[b, t]) == -100:
                continue
            row = [float(v) for v in logits[b, t - 1]]
            total += (max(row) - sum(row) / len(row)) ** 2
            count += 1
    return total / count


# ---------------------------------------------------------------------------- PDU: the loss
@pytest.mark.parametrize("gamma", [1.0, 2.5])
def test_pdu_forget_term_matches_hand_computation(gamma):
    logits, labels = random_batch()
    inputs = LossInputs(logits, labels, state={"dual": 100.0})
    loss, logs = pdu_loss(inputs, PDUParams(gamma=gamma))
    assert logs["forget_loss"] == pytest.approx(hand_margin(logits, labels), rel=1e-5)
    assert float(loss) == pytest.approx(gamma * hand_margin(logits, labels), rel=1e-5)
    assert logs["forget_nll"] == pytest.approx(float(losses.nll(logits, labels)), rel=1e-6)


def test_pdu_forget_term_is_zero_on_flat_logits_and_pulls_the_top_logit_down():
    _, labels = random_batch()
    flat = torch.full((2, 5, 4), 3.0)
    assert float(pdu_loss(LossInputs(flat, labels), PDUParams())[0]) == 0.0
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    with torch.no_grad():
        logits[0, 0, 0] = 3.0  # margin 3 - 1 = 2, loss 4; d/dz_top = 2*2*(1 - 1/3)
    pdu_loss(LossInputs(logits, torch.tensor([[-100, 1]])), PDUParams())[0].backward()
    assert logits.grad[0, 0].tolist() == pytest.approx([8 / 3, -4 / 3, -4 / 3])
    assert logits.grad[0, 1].tolist() == [0.0, 0.0, 0.0]  # predicts no answer token


def test_pdu_retain_term_is_weighted_by_the_dual():
    logits, labels = random_batch()
    r_logits, r_labels = random_batch(2)
    retain_nll = float(losses.nll(r_logits, r_labels))
    forget = hand_margin(logits, labels)
    inputs = LossInputs(logits, labels, r_logits, r_labels, state={"dual": 7.0})
    loss, logs = objective(PDU, inputs, PDUParams())
    assert logs["retain_loss"] == pytest.approx(retain_nll, rel=1e-6)
    assert float(loss) == pytest.approx(forget + 7.0 * retain_nll, rel=1e-5)
    # no state (a call outside the loop): the initial dual
    loss, _ = objective(
        PDU, LossInputs(logits, labels, r_logits, r_labels), PDUParams(dual_init=3.0)
    )
    assert float(loss) == pytest.approx(forget + 3.0 * retain_nll, rel=1e-5)


def test_pdu_declares_a_dual_weighted_nll_retain_term():
    needs = PDU.needs(PDUParams())
    assert needs.retain is not None
    assert (needs.retain.weight, needs.retain.kind, needs.retain.state_weight) == (
        1.0,
        "nll",
        "dual",
    )
    assert PDU.needs_retain(PDUParams(dual_init=0.0))  # a zero dual may grow: retain always needed
    assert PDU.init_state(PDUParams(dual_init=42.0)) == {"dual": 42.0}


# ---------------------------------------------------------------------------- PDU: the dual
def test_pdu_dual_update_by_hand():
    p = PDUParams(dual_step_size=5.0, retain_bound=0.3, dual_warmup=0.5)
    state = {"dual": 100.0}
    logs = {"retain_loss": 0.5}
    # warm-up: steps 1..5 of 10 leave the dual alone
    for step in range(1, 6):
        assert pdu_update_state(state, StepInfo(step, 10, logs), p) == {"dual": 100.0}
    # step 6: 100 + 5 * (0.5 - 0.3) = 101
    assert pdu_update_state(state, StepInfo(6, 10, logs), p)["dual"] == pytest.approx(101.0)
    # under the bound it shrinks: 100 + 5 * (0.1 - 0.3) = 99
    low = {"retain_loss": 0.1}
    assert pdu_update_state(state, StepInfo(10, 10, low), p)["dual"] == pytest.approx(99.0)
    # never below 0: 0.4 + 5 * (0.1 - 0.3) = -0.6 -> 0
    assert pdu_update_state({"dual": 0.4}, StepInfo(7, 10, low), p) == {"dual": 0.0}
    # no warm-up: the first step updates; full warm-up: none does
    assert pdu_update_state(state, StepInfo(1, 10, logs), PDUParams(dual_warmup=0.0))[
        "dual"
    ] == pytest.approx(100.0 + 5 * 0.2)
    assert pdu_update_state(state, StepInfo(10, 10, logs), PDUParams(dual_warmup=1.0)) == state
    assert state == {"dual": 100.0}  # the input state is not modified
    with pytest.raises(ValueError, match="retain_loss"):
        pdu_update_state(state, StepInfo(6, 10, {}), p)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"retain_bound": -0.1}, "retain_bound"),
        ({"retain_bound": "nan"}, "retain_bound"),
        ({"dual_step_size": -1}, "dual_step_size"),
        ({"dual_init": -5}, "dual_init"),
        ({"dual_init": "inf"}, "dual_init"),
        ({"dual_warmup": 1.5}, "dual_warmup"),
        ({"dual_warmup": -0.1}, "dual_warmup"),
        ({"gamma": -1}, "gamma"),
        ({"alpha": 1}, "alpha"),  # not a PDU hyperparameter: the dual is dual_init
    ],
)
def test_invalid_hyperparameters_are_one_line(overrides, field):
    with pytest.raises(UnlearnError) as err:
        build_params(PDU, overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "pdu" in msg


def test_pdu_without_retain_data_is_refused(target_dir, qa_files, tmp_path):
    forget, _ = qa_files
    with pytest.raises(UnlearnError) as err:
        unlearn.forget(str(target_dir), str(forget), None, "pdu", str(tmp_path / "o"))
    msg = str(err.value)
    assert "\n" not in msg and "'pdu'" in msg and "--retain" in msg


# ---------------------------------------------------------------------------- training
def _log(out: Path) -> list[dict]:
    lines = (out / "logs" / "train.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step" in r]


@pytest.mark.parametrize("bound", [0.05, 10.0])  # above / below the retain NLL: dual up / to 0
def test_pdu_training_moves_the_dual_by_the_rule(bound, target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    out = tmp_path / "pdu"
    res = unlearn.forget(
        str(target_dir), str(forget), str(retain), "pdu", str(out),
        overrides=[*FAST, "train.lr=1e-3", "train.max_steps=4", "method.dual_init=1",
                   "method.dual_step_size=5", f"method.retain_bound={bound}",
                   "method.dual_warmup=0.5"],
    )  # fmt: skip
    rows = _log(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    dual = 1.0
    for r in rows:
        if r["step"] > 2:  # warm-up: half of the 4 steps
            dual = max(0.0, dual + 5 * (r["retain_loss"] - bound))
        assert r["state.dual"] == pytest.approx(dual, rel=1e-6), r["step"]
    assert rows[1]["state.dual"] == 1.0
    if bound > 1:  # the retain NLL is under the bound: the dual is clipped at 0 and stays there
        assert rows[2]["state.dual"] == rows[3]["state.dual"] == 0.0
    else:  # the constraint is violated: the dual grows
        assert rows[3]["state.dual"] > rows[2]["state.dual"] > 1.0
    # with the retain weight small during warm-up, the margin shrinks and the forget NLL rises
    assert rows[-1]["forget_loss"] < rows[0]["forget_loss"]
    assert res.metrics["nll_after"]["forget_nll"] > res.metrics["nll_before"]["forget_nll"]


def test_pdu_resume_restores_the_dual(target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    common = [*FAST, "train.lr=1e-3", "train.max_steps=3", "train.save_every=1",
              "method.dual_warmup=0", "method.retain_bound=0.05"]  # fmt: skip
    args = (str(target_dir), str(forget), str(retain), "pdu")

    def boom(step, logs):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(UnlearnError, match="--resume"):
        unlearn.forget(*args, str(tmp_path / "a"), overrides=common, callbacks=[boom])
    ckpt, step = latest_checkpoint(tmp_path / "a")
    assert step == 2
    logged = _log(tmp_path / "a")[-1]["state.dual"]
    assert logged != 100.0  # it moved, so restoring it is not the same as starting over
    assert read_progress(ckpt)["method_state"] == {"dual": pytest.approx(logged)}
    res = unlearn.forget(*args, str(tmp_path / "a"), overrides=common, resume=True)
    assert res.manifest["resumed_from_step"] == 2
    unlearn.forget(*args, str(tmp_path / "b"), overrides=common)
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["state.dual"] for r in a] == pytest.approx([r["state.dual"] for r in b], rel=1e-6)
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
