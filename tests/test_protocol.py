"""MUSE's scalability and sustainability protocols on the tiny model: stages, resuming, the chain
of requests each model keeps, and the curves."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED
from unlearn.api import protocol
from unlearn.errors import UnlearnError

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not (SHARED / "muse" / "news").is_dir(), reason="needs ../shared/data/muse"),
]
NEWS = SHARED / "muse" / "news"
EVAL = {"benchmark": "muse", "data_dir": str(NEWS), "limit": 2, "retrain_auc": 0.4772}
TRAIN = ["train.max_steps=1", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    corpus = json.loads((NEWS / "raw" / "forget.json").read_text())
    (root / "forget.json").write_text(json.dumps([d[:600] for d in corpus[:6]]))
    (root / "retain.json").write_text(json.dumps([d[:600] for d in corpus[6:9]]))
    return root


def _requests(folder):
    return json.loads((folder / "unlearn.json").read_text())["requests"]


@pytest.mark.slow
def test_sustainability_chains_requests_and_resumes(tiny_model_dir, docs, tmp_path):
    out = tmp_path / "sust"
    args = ("sustainability", str(tiny_model_dir), str(docs / "forget.json"),
            str(docs / "retain.json"), "npo", str(out))  # fmt: skip
    state = protocol(*args, stages=3, overrides=TRAIN, progress=False, **EVAL)
    assert [s["stage"] for s in state["stages"]] == [0, 1, 2, 3]
    assert [s["forget_n"] for s in state["stages"]] == [0, 2, 2, 2]
    assert all("privleak" in s["metrics"] for s in state["stages"])
    # each stage starts from the previous one: the chain grows, naming rows by their ids in the file
    chains = [_requests(out / f"stage_{k}" / "model") for k in (1, 2, 3)]
    assert [len(c) for c in chains] == [1, 2, 3]
    assert chains[2][:2] == chains[1]
    ids = [[e["id"] for e in c[-1]["forget"]["examples"]] for c in chains]
    assert ids == [["0", "1"], ["2", "3"], ["4", "5"]]
    forget_entry = chains[2][-1]["forget"]
    assert set(forget_entry) == {"kind", "n", "sha256", "examples"}  # names, never text
    assert all(set(e) == {"id", "sha256"} for e in forget_entry["examples"])
    assert not (out / "stage_1" / "forget.json").exists()  # the data copy is gone
    assert (out / "protocol.png").is_file() and "| 3 | 2 |" in (out / "protocol.md").read_text()
    # resuming: a lost stage evaluation is redone, nothing else is
    model_time = (out / "stage_2" / "model" / "unlearn.json").stat().st_mtime_ns
    state_file = json.loads((out / "protocol.json").read_text())
    state_file["stages"] = state_file["stages"][:3]
    (out / "protocol.json").write_text(json.dumps(state_file))
    (out / "stage_3" / "eval" / "results.json").unlink()
    again = protocol(*args, stages=3, overrides=TRAIN, progress=False, **EVAL)
    assert [s["stage"] for s in again["stages"]] == [0, 1, 2, 3]
    assert again["stages"][3]["metrics"] == state["stages"][3]["metrics"]  # same model, same eval
    assert (out / "stage_2" / "model" / "unlearn.json").stat().st_mtime_ns == model_time
    # other settings in the same folder: refused
    with pytest.raises(UnlearnError, match="other settings"):
        protocol(*args, stages=2, overrides=TRAIN, progress=False, **EVAL)


@pytest.mark.slow
def test_scalability_unlearns_growing_sets_from_the_target(tiny_model_dir, docs, tmp_path):
    out = tmp_path / "scal"
    state = protocol(
        "scalability", str(tiny_model_dir), str(docs / "forget.json"), str(docs / "retain.json"),
        "grad_diff", str(out), stages=2, overrides=TRAIN, progress=False, **EVAL,
    )  # fmt: skip
    assert [s["forget_n"] for s in state["stages"]] == [0, 3, 6]
    for k in (1, 2):
        assert len(_requests(out / f"stage_{k}" / "model")) == 1  # each from the target


def test_protocol_settings_are_checked(tiny_model_dir, docs, tmp_path):
    with pytest.raises(UnlearnError, match="unknown protocol"):
        protocol(
            "speed",
            str(tiny_model_dir),
            str(docs / "forget.json"),
            None,
            "npo",
            str(tmp_path),
            stages=2,
        )
    with pytest.raises(UnlearnError, match="2 or more stages"):
        protocol(
            "scalability",
            str(tiny_model_dir),
            str(docs / "forget.json"),
            None,
            "npo",
            str(tmp_path),
        )
