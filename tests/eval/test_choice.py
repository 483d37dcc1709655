"""Multiple choice (WMDP, MMLU, own files): lm-evaluation-harness's prompt and log-likelihoods,
accuracy and standard errors by hand, and the one-line errors.

The log-likelihood check re-implements the harness's `HFLM._encode_pair` + `_loglikelihood_tokens`
(v0.4.12) on the tiny random Llama: whole = encode(context + continuation), the continuation's
tokens are those after encode(context), summed log-softmax at those positions, one sequence at a
time. Data: ../shared/data/wmdp and ../shared/data/mmlu.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import SHARED
from unlearn.api import evaluate
from unlearn.cli import main
from unlearn.errors import UnlearnError
from unlearn.eval.suites.choice import choice_suite
from unlearn.metrics.choice import accuracy, choice_stderr, pooled_stderr

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not (SHARED / "wmdp").is_dir(), reason="needs ../shared/data/wmdp"),
]
WMDP, MMLU = SHARED / "wmdp", SHARED / "mmlu"


def _records(out, name):
    return [json.loads(x) for x in (out / "records" / f"{name}.jsonl").read_text().splitlines()]


def test_prompt_is_the_harness_doc_to_text_with_the_subject_line():
    suite = choice_suite("wmdp", "bio", str(WMDP), limit=2)
    row = json.loads((WMDP / "bio_questions.json").read_text())[1]
    options = "".join(f"\n{c}. {t}" for c, t in zip("ABCD", row["choices"], strict=True))
    expected = (
        "The following are multiple choice questions (with answers) about biology.\n\n"
        f"{row['question'].strip()}{options}\nAnswer:"
    )
    s = suite.sets[0]
    assert s.name == "wmdp_bio" and s.rows[1]["question"] == expected
    assert s.rows[1]["labels"] == ["A", "B", "C", "D"] and s.rows[1]["target"] == row["answer"]


def test_mmlu_shots_are_the_first_dev_rows_answered():
    suite = choice_suite("mmlu", "virology", str(MMLU), limit=1, shots=2)
    prompt = suite.sets[0].rows[0]["question"]
    head = "The following are multiple choice questions (with answers) about virology.\n\n"
    assert prompt.startswith(head)
    dev = (MMLU / "dev" / "virology_dev.csv").read_text().splitlines()[1]
    assert prompt[len(head) :].startswith(dev.split(",")[0].strip())
    assert prompt.count("\nAnswer:") == 3 and "\nAnswer: A\n\n" in prompt  # dev answers are A


def test_log_likelihoods_match_the_harness_and_accuracy_is_by_hand(tiny, tiny_model_dir, tmp_path):
    model, fmt = tiny
    tok = fmt.tokenizer
    out = tmp_path / "wmdp"
    res = evaluate(
        str(tiny_model_dir), str(out), benchmark="wmdp", split="bio,chem", data_dir=str(WMDP),
        limit=4, progress=False,
    )  # fmt: skip
    suite = choice_suite("wmdp", "bio,chem", str(WMDP), limit=4)
    per_set = {}
    for s in suite.sets:
        recs = _records(out, s.name)
        for row, rec in zip(s.rows, recs, strict=True):
            ctx = row["question"]
            for label, ours in zip("ABCD", rec["choice_logprobs"], strict=True):
                whole = tok(ctx + " " + label)["input_ids"]
                n_ctx = len(tok(ctx)["input_ids"])
                with torch.no_grad():
                    logits = model(torch.tensor([whole])).logits[0].double()
                lp = torch.log_softmax(logits, -1)
                theirs = sum(float(lp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))
                assert ours == pytest.approx(theirs, abs=1e-4)
        per_set[s.name] = accuracy(
            [r["choice_logprobs"] for r in recs], [r["target"] for r in recs]
        )
        hand = np.mean([int(np.argmax(r["choice_logprobs"])) == r["target"] for r in recs])
        assert res["metrics"][f"{s.name}_accuracy"] == pytest.approx(hand)
        sd = np.std(per_set[s.name], ddof=1) / math.sqrt(len(recs))
        assert res["metrics"][f"{s.name}_accuracy_stderr"] == pytest.approx(sd)
    allv = np.concatenate(list(per_set.values()))
    assert res["metrics"]["accuracy"] == pytest.approx(allv.mean())
    sizes = [len(v) for v in per_set.values()]
    pooled = math.sqrt(
        sum(
            (n - 1) * n * choice_stderr(v) ** 2
            for n, v in zip(sizes, per_set.values(), strict=True)
        )
        / (sum(sizes) - len(sizes))
        / sum(sizes)
    )
    assert res["metrics"]["accuracy_stderr"] == pytest.approx(pooled)
    assert pooled_stderr(sizes, [choice_stderr(v) for v in per_set.values()]) == pytest.approx(
        pooled
    )
    assert res["headline"][:2] == ["accuracy", "accuracy_stderr"]


def test_accuracy_ties_go_to_the_first_option():
    assert accuracy([[-1.0, -1.0, -2.0, -3.0]], [0]).tolist() == [1.0]
    assert accuracy([[-1.0, -1.0, -2.0, -3.0]], [1]).tolist() == [0.0]


def test_own_file_and_errors(tiny_model_dir, tmp_path, capsys):
    good = tmp_path / "mine.jsonl"
    rows = [
        {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"},
        {"question": "Sky?", "choices": ["red", "blue", "green", "black"], "answer": 1},
    ]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate(
        str(tiny_model_dir),
        str(tmp_path / "o"),
        benchmark="mcq",
        data_dir=str(good),
        progress=False,
    )
    assert set(res["datasets"]) == {"mine"} and "mine_accuracy" in res["metrics"]
    three = tmp_path / "three.json"
    three.write_text(json.dumps([{"question": "q", "choices": ["a", "b", "c"], "answer": 0}]))
    with pytest.raises(UnlearnError, match="has 3 choices; multiple choice needs exactly 4"):
        choice_suite("mcq", None, str(three))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}]))
    capsys.readouterr()
    code = main(
        ["eval", "--model", str(tiny_model_dir), "--benchmark", "mcq", "--data-dir", str(bad),
         "--output", str(tmp_path / "x")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "answer 4 is out of range" in err[0]
    with pytest.raises(UnlearnError, match="WMDP has no subset 'physics'"):
        choice_suite("wmdp", "physics", str(WMDP))
    code = main(["eval", "--model", str(tiny_model_dir), "--benchmark", "nope", "--output", "y"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "unknown benchmark 'nope'" in err[0]


def test_a_set_declaration_is_checked():
    from unlearn.eval.suites.builders import EvalSet

    with pytest.raises(UnlearnError, match="set 'x': unknown role 'nope'; choose one of forget"):
        EvalSet("x", "nope", [], "mem")
    with pytest.raises(UnlearnError, match="unknown prompt 'fancy'"):
        EvalSet("x", "forget", [], "mem", prompt="fancy")
