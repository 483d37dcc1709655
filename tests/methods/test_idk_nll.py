"""idk_nll (TOFU's preference optimisation, GRIN's "PO"): NLL toward refusals plus a retain term,
by hand; its refusal targets come from the method's hook; a real run lowers the refusal NLL."""

from __future__ import annotations

import json

import pytest

import unlearn
from method_inputs import FAST, LN2, close, make_inputs
from unlearn.methods import build_params, idk_nll
from unlearn.methods.retain import objective


def test_idk_nll_is_nll_on_refusals_plus_retain() -> None:
    """Forget batch A (already carrying refusal answers), retain B: 1.5 ln 2 + 2 ln 2."""
    loss, logs = objective(idk_nll.METHOD, make_inputs("A", "B"), idk_nll.IdkNLLParams())
    close(loss, 3.5 * LN2)
    close(logs["refusal_nll"], 1.5 * LN2)
    params = idk_nll.IdkNLLParams(gamma=2.0, alpha=0.5)
    close(objective(idk_nll.METHOD, make_inputs("A", "B"), params)[0], 3 * LN2 + LN2)
    assert idk_nll.METHOD.forget_targets is idk_nll.refusal_targets


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


def test_refusals_file_is_a_string_hyperparameter() -> None:
    assert build_params("idk_nll", {"refusals": "my.txt"}).refusals == "my.txt"


def test_idk_nll_lowers_refusal_loss(target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    res = unlearn.forget(
        str(target_dir),
        str(forget),
        str(retain),
        "idk_nll",
        str(tmp_path / "o"),
        overrides=[*FAST, "train.lr=3e-3", "train.epochs=4"],
    )
    log = [
        json.loads(x) for x in (tmp_path / "o" / "logs" / "train.jsonl").read_text().splitlines()
    ]
    first, last = log[:3], log[-3:]  # one epoch (3 steps of 2) each: every refusal target once
    mean = lambda rows: sum(r["refusal_nll"] for r in rows) / len(rows)  # noqa: E731
    assert mean(last) < mean(first) - 0.5
    assert res.metrics["steps"] == 12
