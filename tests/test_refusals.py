"""Refusal sentences (`unlearn.refusals`): the built-in list, TOFU's file, user files in three
formats, one-line errors, and the deterministic pick per example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unlearn.errors import UnlearnError
from unlearn.refusals import load_refusals, pick_refusal

TOFU_IDK = Path("/work/shared/data/tofu/idontknow.jsonl")


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
