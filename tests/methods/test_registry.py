"""The registry and what holds for every method in it: one module per method, frozen
hyperparameters with defaults, a finite loss on full inputs, and which way one step moves the
forget NLL. Method lists come from `METHODS`; a table keyed by method name must name every method,
so a new method fails here until it is added, rather than being skipped."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import unlearn.methods
from method_inputs import forget_nll_after_step, full_inputs
from unlearn.errors import UnlearnError
from unlearn.methods import METHODS, build_params, describe_methods, get_method

METHODS_DIR = Path(unlearn.methods.__file__).parent
NOT_METHODS = {"__init__", "base", "retain", "catalog"}  # shared modules of the package

# Which way one descent step on a method's loss moves the forget NLL, on logits that favour the
# answers: +1 unlearning (up), -1 learning (down: plain fine-tuning; refusal targets, which are the
# forget batch's labels; a task vector's fine-tune, negated only after training), or the reason the
# step says nothing about the method.
STEP_DIRECTION: dict[str, int | str] = {
    "grad_ascent": +1,
    "grad_diff": +1,
    "npo": +1,
    "simnpo": +1,
    "undial": +1,
    "ce_u": +1,
    "wga": +1,
    "satimp": +1,
    "rmu": "the loss reads one block's hidden states, no logits (tests/methods/test_rmu.py)",
    "pdu": +1,
    "uno": "the loss descends on substitute answers; the forget term is the loop's probe",
    "uno_s": "the loss descends on substitute answers; the forget term is the loop's probe",
    "whp": +1,
    "task_vector": -1,
    "idk_nll": -1,
    "dpo": +1,
    "idk_dpo": +1,
    "finetune": -1,
}


def test_every_method_module_is_registered_once_under_its_module_name() -> None:
    modules = {p.stem for p in METHODS_DIR.glob("*.py")} - NOT_METHODS
    assert set(METHODS) == modules
    assert len(METHODS) == len({m.name for m in METHODS.values()})
    for name, method in METHODS.items():
        assert method.name == name
        assert dataclasses.is_dataclass(method.params)
        assert method.params.__dataclass_params__.frozen
        assert build_params(method, {}) == method.params()
        assert method.citation and method.summary and "\n" not in method.summary


def test_tables_keyed_by_method_name_name_every_method() -> None:
    assert set(STEP_DIRECTION) == set(METHODS)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_full_inputs(name: str) -> None:
    """With every optional tensor present, each loss is a finite scalar and its logs are floats."""
    method = METHODS[name]
    loss, logs = method.loss(full_inputs(method), method.params())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in logs.values())


@pytest.mark.parametrize("name", list(METHODS))
def test_one_step_moves_the_forget_nll_the_declared_way(name: str) -> None:
    direction = STEP_DIRECTION[name]  # a KeyError here: add the new method to STEP_DIRECTION
    if isinstance(direction, str):
        pytest.skip(direction)
    before, after = forget_nll_after_step(METHODS[name])
    assert (after - before) * direction > 0, f"{name}: forget NLL {before:.4f} -> {after:.4f}"


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(UnlearnError) as err:
        get_method("nop")
    msg = str(err.value)
    assert "\n" not in msg and "'nop'" in msg
    assert all(name in msg for name in METHODS)


def test_describe_methods_shows_every_default() -> None:
    lines = describe_methods()
    assert [line.split(":")[0] for line in lines] == list(METHODS)
    assert all("\n" not in line for line in lines)
    for line, method in zip(lines, METHODS.values(), strict=True):
        for field in dataclasses.fields(method.params):
            assert f"{field.name}={field.default}" in line
