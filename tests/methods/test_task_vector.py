"""Task-vector negation: the negation on small dicts, real training runs on the tiny Llama (the
saved model is exactly the negated fine-tune, also after --resume), and one-line errors for bad
hyperparameters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import unlearn
from method_inputs import FAST
from unlearn.errors import UnlearnError
from unlearn.methods import build_params
from unlearn.methods.task_vector import METHOD as TASK_VECTOR
from unlearn.methods.task_vector import TaskVectorParams, negate_task_vector


# ---------------------------------------------------------------------------- task vector
def test_negate_task_vector_on_small_dicts():
    start = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]]), "c": torch.tensor([9.0])}
    trained = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([[1.5]])}
    kept = {k: v.clone() for k, v in trained.items()}
    new = negate_task_vector(start, trained, TaskVectorParams(alpha=0.5))
    assert set(new) == {"a", "b"}  # only trained tensors
    assert new["a"].tolist() == [0.5, 3.0]  # 1 - 0.5*(2-1), 2 - 0.5*(0-2)
    assert new["b"].tolist() == [[0.0]]  # 0.5 - 0.5*(1.5-0.5)
    assert all(torch.equal(trained[k], kept[k]) for k in trained)  # trained weights untouched
    start = {"a": torch.tensor([1.0, 2.0])}
    new = negate_task_vector(start, {"a": torch.tensor([4.0, 2.0])}, TaskVectorParams())
    assert new["a"].tolist() == [-2.0, 2.0]  # alpha=1: 2*start - trained
    with pytest.raises(ValueError, match="'z'"):
        negate_task_vector({"a": torch.zeros(1)}, {"z": torch.zeros(1)}, TaskVectorParams())


def test_negate_task_vector_keeps_the_start_dtype():
    start = {"w": torch.tensor([1.0, -3.0], dtype=torch.bfloat16)}
    new = negate_task_vector(start, {"w": torch.tensor([1.5, -3.0])}, TaskVectorParams(alpha=2.0))
    assert new["w"].dtype == torch.bfloat16 and new["w"].tolist() == [0.0, -3.0]


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"alpha": "-1"}, "alpha"), ({"alpha": "inf"}, "alpha"), ({"alpha": "nan"}, "alpha")],
)
def test_invalid_hyperparameters_are_one_line(overrides, field):
    with pytest.raises(UnlearnError) as err:
        build_params(TASK_VECTOR, overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "task_vector" in msg


def test_zero_alpha_names_the_fix():
    with pytest.raises(UnlearnError) as err:
        build_params("task_vector", {"alpha": "0"})
    msg = str(err.value)
    assert "\n" not in msg and "starting model" in msg and "alpha > 0" in msg


# ---------------------------------------------------------------------------- training
def test_task_vector_is_the_negated_finetune(target_dir, qa_files, tmp_path):
    forget, _ = qa_files
    common = [*FAST, "train.lr=1e-3", "train.max_steps=2"]
    unlearn.finetune(str(target_dir), str(forget), str(tmp_path / "ft"), overrides=common)
    res = unlearn.forget(
        str(target_dir), str(forget), None, "task_vector", str(tmp_path / "tv"),
        overrides=[*common, "method.alpha=0.5"],
    )  # fmt: skip
    start = load_file(str(target_dir / "model.safetensors"))
    tuned = load_file(str(tmp_path / "ft" / "model.safetensors"))
    negated = load_file(str(tmp_path / "tv" / "model.safetensors"))
    assert set(negated) == set(start)
    moved = 0
    for k, w in start.items():
        moved += not torch.equal(tuned[k], w)
        torch.testing.assert_close(negated[k], w - 0.5 * (tuned[k] - w), atol=1e-6, rtol=0)
    assert moved == len(start)  # every tensor fine-tuned, so every tensor was negated
    before = res.metrics["nll_before"]["forget_nll"]
    after = res.metrics["nll_after"]["forget_nll"]
    assert after > before, f"forget NLL {before:.4f} -> {after:.4f}"


def test_task_vector_resume_negates_from_the_original_start(target_dir, qa_files, tmp_path):
    """The start snapshot is the input model, not the checkpoint a resumed run continues from."""
    forget, _ = qa_files
    common = [*FAST, "train.lr=1e-3", "train.max_steps=3", "train.save_every=1"]
    args = (str(target_dir), str(forget), None, "task_vector")

    def boom(step, logs):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(UnlearnError, match="--resume"):
        unlearn.forget(*args, str(tmp_path / "a"), overrides=common, callbacks=[boom])
    unlearn.forget(*args, str(tmp_path / "a"), overrides=common, resume=True)
    unlearn.forget(*args, str(tmp_path / "b"), overrides=common)
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
