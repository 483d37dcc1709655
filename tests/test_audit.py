"""Deletion requests (`unlearn forget --request ID`) and `unlearn audit`: the chain links each
request's weights to the previous one's, a modified model or a broken link is caught, a data file
is answered "requested" or "not requested", certificates name data by hash, never by text."""

from __future__ import annotations

import itertools
import json

import pytest

import unlearn
from conftest import write_jsonl
from unlearn.cli import main
from unlearn.errors import UnlearnError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["train.max_steps=1", "train.progress=false", "train.nll_check=false", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def three_requests(target_dir, tmp_path_factory):
    """Three requests in sequence, each on the previous request's output."""
    root = tmp_path_factory.mktemp("requests")
    sets = []
    for k in range(3):
        rows = [{"question": f"Where does person {k}{i} live?", "answer": f"In town {k}{i}."}
                for i in range(3)]  # fmt: skip
        sets.append(write_jsonl(root / f"forget{k}.jsonl", rows))
    retain = write_jsonl(
        root / "retain.jsonl",
        [{"question": f"What is {i}?", "answer": f"{i} is a number."} for i in range(4)],
    )
    model = str(target_dir)
    for k in range(3):
        out = root / f"after{k}"
        unlearn.forget(model, str(sets[k]), str(retain), "npo", str(out), overrides=FAST,
                       request=f"REQ-{k}")  # fmt: skip
        model = str(out)
    return root, sets


def test_three_requests_form_a_verified_chain(three_requests, capsys, tmp_path):
    root, sets = three_requests
    final = root / "after2"
    chain = json.loads((final / "unlearn.json").read_text())["requests"]
    assert [e["request"] for e in chain] == ["REQ-0", "REQ-1", "REQ-2"]
    assert [e["index"] for e in chain] == [1, 2, 3]
    for prev, entry in itertools.pairwise(chain):
        assert entry["weights_before"] == prev["weights_after"] != ""
    assert chain[0]["method"] == "npo" and chain[0]["hyperparameters"]["beta"] == 0.1
    code = main(["audit", str(final), "--data", str(sets[1]), "--output", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "chain verified" in printed and "REQ-1" in printed
    assert f"{sets[1]}: requested as a whole" in printed
    cert = (tmp_path / "a" / "certificate-2.md").read_text()
    assert "REQ-1" in cert and chain[1]["forget"]["sha256"] in cert
    assert "person 1" not in cert and "town" not in cert  # ids and hashes, never the text
    assert (tmp_path / "a" / "certificate-3.html").read_text().startswith("<!doctype html>")
    result = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert result["ok"] and [r["link"] for r in result["requests"]] == [
        "first request", "ok", "ok"
    ]  # fmt: skip


def test_data_that_was_not_requested_gets_a_clear_answer(three_requests, tmp_path):
    root, sets = three_requests
    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "q?", "answer": "never seen."}])
    assert unlearn.audit(str(root / "after2"), str(other))["data"]["answer"] == "not requested"
    # two rows of request 0 and one new row: which of them were requested
    rows = [json.loads(x) for x in sets[0].read_text().splitlines()][:2]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*rows, {"question": "q?", "answer": "new."}])
    data = unlearn.audit(str(root / "after2"), str(mixed))["data"]
    assert data["requested_examples"] == 2 and data["examples"] == 3
    assert data["answer"] == "2 of 3 examples requested"


def test_a_modified_model_or_a_folder_without_a_chain_is_caught(three_requests, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    root, _ = three_requests
    copy = tmp_path / "tampered"
    shutil.copytree(root / "after2", copy)
    weights = load_file(str(copy / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(copy / "model.safetensors"))
    result = unlearn.audit(str(copy))
    assert not result["ok"] and result["requests"][-1]["weights_now"].startswith("MODIFIED")
    assert main(["audit", str(copy)]) == 1
    with pytest.raises(UnlearnError, match="no deletion-request chain") as err:
        unlearn.audit(str(tmp_path))
    assert "\n" not in str(err.value)
