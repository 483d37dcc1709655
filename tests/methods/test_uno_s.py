"""UNO-S (UNO alternating with the authors' "Gradient Surgery #2"): what it declares, one-line
errors and a run from the command line. Its surgery step against hand autograd:
tests/train/test_gradients.py."""

from __future__ import annotations

import json

import pytest

import unlearn
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, get_method
from unlearn.methods.uno import forget_probe, substitute_loss
from unlearn.methods.uno_s import UNOSParams


def test_needs_declare_alternating_gradients_with_uno_terms():
    method = get_method("uno_s")
    needs = method.needs(UNOSParams(lam=0.5))
    assert (needs.gradients, needs.orthogonal_weight, needs.second_target) == ("uno_s", 0.5, True)
    assert method.probe is forget_probe and method.loss is substitute_loss
    assert needs.retain is not None and needs.retain.weight == 1.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"lam": -1}, "lam"), ({"gamma": -1}, "gamma"), ({"alpha": 0, "substitute": "none"}, "alpha")],
)
def test_invalid_hyperparameters_are_one_line(overrides, field):
    with pytest.raises(UnlearnError) as err:
        build_params("uno_s", overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "uno_s" in msg


def test_uno_s_refuses_several_processes_in_one_line():
    from types import SimpleNamespace

    from unlearn.train.setup import check_needs

    method = get_method("uno_s")
    with pytest.raises(UnlearnError, match="one process only") as err:
        check_needs(method, method.needs(UNOSParams()), None, SimpleNamespace(num_processes=2))
    assert "\n" not in str(err.value)


def test_runs_from_the_command_line_and_logs_its_step_kinds(
    target_dir, qa_files, tmp_path, one_torch_thread
):
    forget, retain = qa_files
    res = unlearn.forget(
        str(target_dir), str(forget), str(retain), "uno_s", str(tmp_path / "out"),
        overrides=["train.progress=false", "train.batch_size=2", "train.lr=1e-3",
                   "train.max_steps=3"],
    )  # fmt: skip
    log = [
        json.loads(x) for x in (tmp_path / "out" / "logs" / "train.jsonl").read_text().splitlines()
    ]
    assert [r["surgery"] for r in log] == [0.0, 1.0, 0.0]
    assert res.metrics["steps"] == 3 and "grad_cos" in res.metrics["final_losses"]
