"""Evaluation: the one-pass records, scoring from records alone, `evaluate` end to end, errors, CLI.

The model tests run the tiny random Llama of conftest. `records.score` is checked against a plain
loop over one unbatched sequence at a time, so length bucketing and padding cannot change a number;
`records.generate` against one-question-at-a-time generation, so left padding cannot either.
`score_suite` is checked on hand-made records with hand-computed expectations (no model).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import hmean, ks_2samp

from conftest import TOFU, requires_tofu, write_jsonl
from unlearn import metrics as M
from unlearn.api import evaluate, resolve_eval_config
from unlearn.cli import main
from unlearn.config import PromptConfig
from unlearn.data import content_hash
from unlearn.errors import UnlearnError
from unlearn.eval.run import score_suite
from unlearn.eval.suites.builders import (
    TOFU_UTILITY,
    Suite,
    custom_suite,
    people_suite,
    tofu_set,
)
from unlearn.report.build import build_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_REF = "--reference"
FAST = {"overrides": ["generation.max_new_tokens=4"], "progress": False}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def people_evals(tiny_model_dir, tmp_path_factory):
    """The tiny model on `people`: once as the reference, once compared with that reference."""
    root = tmp_path_factory.mktemp("people-evals")
    ref_dir, tgt_dir = root / "retain", root / "target"
    ref = evaluate(str(tiny_model_dir), str(ref_dir), benchmark="people", **FAST)
    tgt = evaluate(
        str(tiny_model_dir), str(tgt_dir), benchmark="people", reference=str(ref_dir), **FAST
    )
    return ref_dir, tgt_dir, ref, tgt


def test_evaluate_gradient_norm_attack_on_request(people_evals, tiny_model_dir, tmp_path):
    _, _, _, without = people_evals
    assert "--mia-gradnorm" in without["skipped"]["mia_gradnorm_auc"]
    res = evaluate(
        str(tiny_model_dir), str(tmp_path / "ev"), benchmark="people", mia_gradnorm=True, **FAST
    )
    assert 0.0 <= res["metrics"]["mia_gradnorm_auc"] <= 1.0
    assert "mia_gradnorm_auc" not in res["skipped"]
    rec = json.loads((tmp_path / "ev" / "records" / "forget.jsonl").read_text().splitlines()[0])
    assert rec["grad_norm"] > 0
    retain = json.loads((tmp_path / "ev" / "records" / "retain.jsonl").read_text().splitlines()[0])
    assert "grad_norm" not in retain  # only forget and holdout feed the attack
    # the other metrics do not depend on it
    for k, v in without["metrics"].items():
        if k in res["metrics"] and "forget_quality" not in k and "privleak" not in k:
            assert res["metrics"][k] == pytest.approx(v, abs=1e-6), k


# ---------------------------------------------------------------------------- score_suite (no model)
def _rows(prefix: str, n: int, perturbed: bool = True, paraphrase: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = f"{prefix} question {i}?", f"{prefix} answer {i} is Paris."
        row = {"id": f"{prefix}-{i}", "question": q, "answer": a, "sha256": content_hash(q, a)}
        if paraphrase:
            row["paraphrased_answer"] = f"Paraphrase {i} of {prefix}: Paris."
        if perturbed:
            row["perturbed_answer"] = [f"{prefix} answer {i} is Rome.", f"It is Lyon {i}."]
        rows.append(row)
    return rows


def _score(mean_lp: float, n: int, detail: bool = False, shift: float = 0.0) -> dict:
    d = {"logprob_sum": mean_lp * n, "n_tokens": n}
    if detail:
        toks = [mean_lp + shift + 0.1 * (k - (n - 1) / 2) for k in range(n)]
        d.update(
            logprob_sum=sum(toks),
            token_logprobs=toks,
            top1=[k % 2 == 0 for k in range(n)],
            vocab_mu=[-3.0] * n,
            vocab_sigma=[1.0] * n,
            tokens=["the", *(["Ġthe"] * (n - 3)), "ĠParis", "ĠLyon"],  # key words: the last 2
        )
    return d


def _recs(rows, answer, paraphrased=None, perturbed=None, gens=None, shift=0.0) -> list[dict]:
    """Records as `run_records` writes them, from per-row mean log-probs."""
    out = []
    for i, row in enumerate(rows):
        rec = {"id": row["id"], "sha256": row["sha256"]}
        rec["answer"] = _score(answer[i], 4 + i, detail=True, shift=shift)
        if paraphrased is not None:
            rec["paraphrased"] = _score(paraphrased[i], 3 + i)
        if perturbed is not None:
            rec["perturbed"] = [_score(lp, 2 + i + k) for k, lp in enumerate(perturbed[i])]
        rec["generation"] = gens[i] if gens else "I do not know."
        out.append(rec)
    return out


FORGET_PARA = [-1.0, -2.0, -0.5]
FORGET_PERT = [[-2.0, -3.0], [-1.0, -1.5], [-0.5, -0.5]]


def _suite_and_records(holdout: bool = True, utility: bool = True):
    forget, retain = _rows("forget", 3), _rows("retain", 2)
    real, world = _rows("real", 2), _rows("world", 3)
    sets = [
        tofu_set("forget", "forget", forget, "mem"),
        tofu_set("retain", "retain", retain, "mem"),
    ]
    recs = {
        "forget": _recs(forget, [-1.5, -1.0, -2.5], FORGET_PARA, FORGET_PERT),
        "retain": _recs(
            retain,
            [-0.5, -0.7],
            [-0.4, -0.6],
            [[-2.0, -2.5], [-1.5, -3.0]],
            gens=[r["answer"] for r in retain],
        ),
    }
    if utility:
        sets += [
            tofu_set("real_authors", "utility", real, "mem"),
            tofu_set("world_facts", "utility", world, "mem"),
        ]
        recs["real_authors"] = _recs(
            real,
            [-1.0, -0.8],
            [-9.0, -9.0],  # paraphrases exist but utility sets use the answer as "true"
            [[-2.0, -3.0], [-1.2, -2.2]],
            gens=[r["answer"] for r in real],
        )
        recs["world_facts"] = _recs(
            world,
            [-0.3, -0.9, -0.4],
            None,
            [[-1.0, -2.0], [-2.0, -2.0], [-0.9, -3.0]],
            gens=["answer Paris", "world", "nothing"],
        )
    if holdout:
        hold = _rows("holdout", 3, perturbed=False, paraphrase=False)
        sets.append(tofu_set("holdout", "holdout", hold, "mem"))
        recs["holdout"] = _recs(hold, [-1.2, -2.0, -1.8])
    return Suite("synthetic", None, sets, utility=TOFU_UTILITY if utility else ()), recs


def _assert_no_none(metrics: dict) -> None:
    for key, value in metrics.items():
        assert value is not None, key
        assert isinstance(value, float), (key, value)


def test_score_suite_truth_ratios_and_utility_by_hand():
    suite, recs = _suite_and_records()
    metrics, skipped, per = score_suite(suite, recs)
    _assert_no_none(metrics)
    # forget truth ratio: paraphrased answer is "true", perturbed are "false", length-normalised
    tr = [math.exp(np.mean(f) - t) for t, f in zip(FORGET_PARA, FORGET_PERT, strict=True)]
    np.testing.assert_allclose(per["forget"]["truth_ratio"], tr)
    assert metrics["forget_truth_ratio"] == pytest.approx(np.mean([min(x, 1 / x) for x in tr]))
    # retain: paraphrased is "true" too; aggregate mean(max(0, 1 - tr))
    retain_tr = [math.exp(-2.25 + 0.4), math.exp(-2.25 + 0.6)]
    assert metrics["retain_truth_ratio"] == pytest.approx(np.mean([1 - x for x in retain_tr]))
    # real authors: the answer itself is "true" (not the paraphrase)
    real_tr = [math.exp(-2.5 + 1.0), math.exp(-1.7 + 0.8)]
    np.testing.assert_allclose(per["real_authors"]["truth_ratio"], real_tr)
    # utility probability is normalised over the true and perturbed answers
    p0 = math.exp(-1.0) / (math.exp(-1.0) + math.exp(-2.0) + math.exp(-3.0))
    assert per["real_authors"]["probability"][0] == pytest.approx(p0)
    # ... and reported raw too (OpenUnlearning's ra_Q_A_Prob), on utility sets only
    assert metrics["real_authors_raw_probability"] == pytest.approx(np.mean(np.exp([-1.0, -0.8])))
    assert metrics["world_facts_raw_probability"] == pytest.approx(
        np.mean(np.exp([-0.3, -0.9, -0.4]))
    )
    assert "forget_raw_probability" not in metrics and "retain_raw_probability" not in metrics
    assert metrics["retain_probability"] == pytest.approx(np.mean(np.exp([-0.5, -0.7])))
    assert metrics["retain_rouge_l_recall"] == pytest.approx(1.0)
    # model utility: harmonic mean of the 9 values
    assert all(k in metrics for k in M.MODEL_UTILITY_KEYS)
    nine = [metrics[k] for k in M.MODEL_UTILITY_KEYS]
    assert min(nine) > 0
    assert metrics["model_utility"] == pytest.approx(hmean(nine))
    assert "model_utility" not in skipped
    # without a reference, the reference metrics are skipped with a reason naming --reference
    for key in ("forget_quality", "privleak", "mia_reference_auc"):
        assert key not in metrics
        assert NO_REF in skipped[key], key
    assert "mia_gradnorm_auc" in skipped
    assert {"mia_loss_auc", "mia_zlib_auc", "mia_min_k_auc", "mia_min_k_plus_plus_auc"} <= set(
        metrics
    )
    # memorization from the top-1 flags
    assert metrics["forget_exact_memorization"] == pytest.approx(np.mean([2 / 4, 3 / 5, 3 / 6]))


def test_score_suite_with_reference_records():
    suite, recs = _suite_and_records()
    # A reference model that prefers the truth less on the forget set.
    ref = json.loads(json.dumps(recs))
    for rec, shift in zip(ref["forget"], (0.3, -0.4, 1.0), strict=True):
        rec["paraphrased"]["logprob_sum"] -= shift * rec["paraphrased"]["n_tokens"]
    for rec in ref["holdout"]:
        rec["answer"]["token_logprobs"] = [x - 0.05 for x in rec["answer"]["token_logprobs"]]
    metrics, skipped, per = score_suite(suite, recs, {"retain": ref})
    _assert_no_none(metrics)
    ref_metrics, _, ref_per = score_suite(suite, ref)
    expected = ks_2samp(per["forget"]["truth_ratio"], ref_per["forget"]["truth_ratio"]).pvalue
    assert metrics["forget_quality"] == pytest.approx(expected)
    assert metrics["reference_mia_min_k_auc"] == pytest.approx(ref_metrics["mia_min_k_auc"])
    assert metrics["privleak"] == pytest.approx(
        M.privleak(metrics["mia_min_k_auc"], ref_metrics["mia_min_k_auc"])
    )
    assert 0 <= metrics["mia_reference_auc"] <= 1
    for key in ("forget_quality", "privleak", "mia_reference_auc"):
        assert key not in skipped
    # the model as its own reference: indistinguishable, no leak
    same, _, _ = score_suite(suite, recs, {"retain": recs})
    assert same["forget_quality"] == pytest.approx(1.0)
    assert same["mia_reference_auc"] == pytest.approx(0.5)
    assert same["privleak"] == pytest.approx(0.0)


def test_score_suite_reference_with_perfect_auc_skips_privleak():
    suite, recs = _suite_and_records()
    ref = json.loads(json.dumps(recs))
    for rec in ref["forget"]:  # the reference separates forget from holdout perfectly
        rec["answer"]["token_logprobs"] = [-0.1] * rec["answer"]["n_tokens"]
    metrics, skipped, _ = score_suite(suite, recs, {"retain": ref})
    assert "privleak" in skipped and "privleak" not in metrics
    assert "forget_quality" in metrics


def test_score_suite_skips_what_the_sets_cannot_support():
    suite, recs = _suite_and_records(holdout=False, utility=False)
    metrics, skipped, _ = score_suite(suite, recs)
    _assert_no_none(metrics)
    assert "model_utility" not in metrics
    assert "real_authors" in skipped["model_utility"]
    assert "holdout" in skipped["mia"]
    assert not any(k.startswith("mia_") for k in metrics)
    assert NO_REF in skipped["forget_quality"]
    # forget data without perturbed answers: no truth ratio, so no forget quality either
    bare = _rows("forget", 2, perturbed=False)
    bare_suite = Suite("custom", None, [tofu_set("forget", "forget", bare, "mem")])
    metrics, skipped, _ = score_suite(bare_suite, {"forget": _recs(bare, [-1.0, -2.0])})
    _assert_no_none(metrics)
    assert "perturbed_answer" in skipped["forget_truth_ratio"]
    assert "perturbed_answer" in skipped["forget_quality"]
    assert metrics["forget_probability"] == pytest.approx(np.mean(np.exp([-1.0, -2.0])))


# ---------------------------------------------------------------------------- evaluate end to end
def test_evaluate_people_with_reference(people_evals):
    ref_dir, tgt_dir, ref, tgt = people_evals
    for key in ("forget_quality", "model_utility", "privleak", "mia_reference_auc"):
        assert key in tgt["metrics"], key
    for key in ("forget_quality", "privleak", "mia_reference_auc"):
        assert NO_REF in ref["skipped"][key]
    assert "model_utility" in ref["metrics"]
    _assert_no_none(tgt["metrics"])
    _assert_no_none(ref["metrics"])
    # the same model as its own reference
    assert tgt["metrics"]["forget_quality"] == pytest.approx(1.0)
    assert tgt["metrics"]["privleak"] == pytest.approx(0.0)
    assert 0 < tgt["pass"]["padding_efficiency"] <= 1
    on_disk = json.loads((tgt_dir / "results.json").read_text())
    assert on_disk["metrics"] == tgt["metrics"]
    assert on_disk["reference"] == str(ref_dir)
    assert on_disk["benchmark"] == "people"
    suite = people_suite()
    for s in suite.sets:
        lines = (tgt_dir / "records" / f"{s.name}.jsonl").read_text().splitlines()
        recs = [json.loads(line) for line in lines]
        assert [(r["id"], r["sha256"]) for r in recs] == list(zip(s.ids, s.hashes, strict=True))
        if s.role == "holdout":  # holdout only feeds membership inference: nothing generated
            assert not any("generation" in r for r in recs)
        else:
            assert all(isinstance(r["generation"], str) for r in recs)
        assert on_disk["datasets"][s.name]["n"] == len(s.rows)


def test_evaluate_keeps_question_and_answer_text_out_of_results(people_evals):
    _, tgt_dir, _, _ = people_evals
    results = (tgt_dir / "results.json").read_text()
    records = "".join(p.read_text() for p in (tgt_dir / "records").glob("*.jsonl"))
    forget = people_suite().get("forget")
    assert forget is not None
    for row in forget.rows:
        assert row["question"] not in results
        assert row["answer"] not in results
        assert row["question"] not in records
        for p in row["perturbed_answer"]:
            assert p not in results


def test_evaluate_is_reproducible(people_evals):
    ref_dir, tgt_dir, ref, tgt = people_evals
    # the same model twice: identical metrics, per-example values and records
    assert {k: tgt["metrics"][k] for k in ref["metrics"]} == ref["metrics"]
    assert tgt["per_example"] == ref["per_example"]
    for f in (ref_dir / "records").glob("*.jsonl"):
        assert (tgt_dir / "records" / f.name).read_text() == f.read_text()


def test_evaluate_tokenizer_without_pad_token(tiny_model_dir, qa_files, tmp_path):
    from transformers import AutoTokenizer

    copy = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, copy)
    tok = AutoTokenizer.from_pretrained(copy)
    tok.pad_token = None
    tok.save_pretrained(copy)
    assert AutoTokenizer.from_pretrained(copy).pad_token_id is None
    forget, retain = qa_files
    res = evaluate(str(copy), str(tmp_path / "ev"), forget=str(forget), retain=str(retain), **FAST)
    _assert_no_none(res["metrics"])
    assert "forget_mean_nll" in res["metrics"]
    # the original tokenizer pads with its EOS, so the numbers are the same
    orig = evaluate(
        str(tiny_model_dir), str(tmp_path / "ev0"), forget=str(forget), retain=str(retain), **FAST
    )
    assert res["metrics"] == orig["metrics"]


def test_evaluate_custom_documents_and_holdout(tiny_model_dir, tmp_path):
    docs = [{"text": f"Alice writes books about rivers number {i}."} for i in range(3)]
    other = [{"text": f"Bob plays the cello in city {i} every year."} for i in range(3)]
    forget = write_jsonl(tmp_path / "docs.jsonl", docs)
    holdout = write_jsonl(tmp_path / "hold.jsonl", other)
    res = evaluate(
        str(tiny_model_dir), str(tmp_path / "ev"), forget=str(forget), holdout=str(holdout), **FAST
    )
    _assert_no_none(res["metrics"])
    assert "mia_min_k_auc" in res["metrics"]
    assert "perturbed_answer" in res["skipped"]["forget_quality"]
    assert NO_REF in res["skipped"]["privleak"]
    assert res["datasets"]["forget"]["kind"] == "text"


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def test_results_json_is_strict_json(people_evals):
    _, tgt_dir, _, _ = people_evals
    _strict_json((tgt_dir / "results.json").read_text())


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_set_without_key_words_skips_keyword_metrics(tiny_model_dir, tmp_path):
    rows = [{"question": f"Is {i} a number?", "answer": "Yes."} for i in range(3)]
    forget = write_jsonl(tmp_path / "yes.jsonl", rows)
    res = evaluate(str(tiny_model_dir), str(tmp_path / "ev"), forget=str(forget), **FAST)
    for key in ("forget_keyword_accuracy", "forget_keyword_confidence"):
        assert key not in res["metrics"] and key in res["skipped"], key
    _strict_json((tmp_path / "ev" / "results.json").read_text())


# ---------------------------------------------------------------------------- errors
def test_unknown_benchmark(tiny_model_dir, tmp_path):
    with pytest.raises(UnlearnError, match="unknown benchmark 'nope'") as err:
        evaluate(str(tiny_model_dir), str(tmp_path / "ev"), benchmark="nope", **FAST)
    assert "\n" not in str(err.value) and "people" in str(err.value)
    with pytest.raises(UnlearnError, match="--forget"):
        evaluate(str(tiny_model_dir), str(tmp_path / "ev"), benchmark="custom", **FAST)
    assert not (tmp_path / "ev").exists()


@requires_tofu
def test_tofu_split_that_does_not_exist(tiny_model_dir, tmp_path):
    for split in ("forget02", "forget20"):
        with pytest.raises(UnlearnError, match=f"no evaluation split '{split}'") as err:
            evaluate(
                str(tiny_model_dir),
                str(tmp_path / "ev"),
                benchmark="tofu",
                split=split,
                data_dir=str(TOFU),
                **FAST,
            )
        assert "forget01" in str(err.value) and "\n" not in str(err.value)


def test_tofu_data_dir_without_files(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnlearnError, match=r"forget01_perturbed\.json not found"):
        evaluate(
            str(tiny_model_dir), str(tmp_path / "ev"), benchmark="tofu", data_dir=str(empty), **FAST
        )


def test_reference_evaluated_on_different_data(tiny_model_dir, qa_files, tmp_path):
    forget, retain = qa_files
    ref_dir = tmp_path / "custom-ref"
    evaluate(str(tiny_model_dir), str(ref_dir), forget=str(forget), retain=str(retain), **FAST)
    with pytest.raises(UnlearnError, match="different 'forget' data") as err:
        evaluate(
            str(tiny_model_dir),
            str(tmp_path / "ev"),
            benchmark="people",
            reference=str(ref_dir),
            **FAST,
        )
    assert "ids/hashes differ" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ev").exists()


def test_reference_without_holdout_records(tiny_model_dir, tmp_path):
    # same forget rows (same ids and hashes) but no holdout set in the reference
    rows = people_suite().get("forget").rows
    forget = write_jsonl(
        tmp_path / "forget.jsonl",
        [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in rows],
    )
    ref_dir = tmp_path / "ref"
    evaluate(str(tiny_model_dir), str(ref_dir), forget=str(forget), **FAST)
    with pytest.raises(UnlearnError, match="no 'holdout' records"):
        evaluate(
            str(tiny_model_dir),
            str(tmp_path / "ev"),
            benchmark="people",
            reference=str(ref_dir),
            **FAST,
        )


def test_reference_folder_without_results(tiny_model_dir, tmp_path):
    empty = tmp_path / "not-an-eval"
    empty.mkdir()
    with pytest.raises(UnlearnError, match=r"has no results\.json") as err:
        evaluate(
            str(tiny_model_dir),
            str(tmp_path / "ev"),
            benchmark="people",
            reference=str(empty),
            **FAST,
        )
    assert "unlearn eval" in str(err.value)


def test_output_must_not_be_the_model_folder(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    with pytest.raises(UnlearnError, match="must not be the model folder"):
        evaluate(str(copy), str(copy), benchmark="people", **FAST)
    assert not (copy / "results.json").exists()


def test_no_overwrite_refuses_existing_evaluation(people_evals, tiny_model_dir):
    ref_dir = people_evals[0]
    with pytest.raises(UnlearnError, match="--overwrite"):
        evaluate(str(tiny_model_dir), str(ref_dir), benchmark="people", overwrite=False, **FAST)


# ---------------------------------------------------------------------------- CLI
def test_cli_eval_prints_key_metrics_table_and_truncation(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_model_dir), "--benchmark", "people", "--output", str(out)]
    # a prompt cap that cuts sequences: counted and reported, never silent
    code = main([*args, "generation.max_new_tokens=4", "prompt.max_length=80"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    lines = stdout.splitlines()
    table = {line.split()[0]: line.split()[1] for line in lines if line and line[0].isalpha()}
    for key in ("model_utility", "forget_probability", "forget_extraction_strength"):
        assert key in table and float(table[key]) >= 0, key
    assert any(line.startswith("skipped forget_quality: ") and NO_REF in line for line in lines)
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["generation"]["max_new_tokens"] == 4
    assert res["settings"]["prompt"]["max_length"] == 80
    cut = res["pass"]["truncated"]
    assert cut > 0
    assert any(line.startswith(f"warning: {cut} sequences were cut") for line in lines)
    assert lines[-1] == f"saved: {out}"
    # the same folder again: refused without --overwrite, one line
    code = main([*args, "generation.max_new_tokens=4"])
    _, err = capsys.readouterr()
    assert code != 0 and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_cli_eval_rejects_unknown_setting_with_valid_keys(capsys, tiny_model_dir, tmp_path):
    args = ["eval", "--model", str(tiny_model_dir), "--output", str(tmp_path / "ev")]
    code = main([*args, "generation.max_new_token=4"])
    _, err = capsys.readouterr()
    assert code != 0
    assert "generation.max_new_token" in err and "max_new_tokens" in err
    assert not (tmp_path / "ev").exists()


def test_cli_eval_unknown_benchmark_is_one_error_line(capsys, tiny_model_dir, tmp_path):
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--benchmark",
            "nope",
            "--output",
            str(tmp_path / "ev"),
        ]
    )
    stdout, err = capsys.readouterr()
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("unlearn: error: ") and "nope" in lines[0]
    assert "Traceback" not in err + stdout


def test_cli_report_over_two_evaluations(capsys, people_evals, tmp_path):
    ref_dir, tgt_dir, _, _ = people_evals
    out = tmp_path / "report"
    code = main(["report", str(ref_dir), str(tgt_dir), "--output", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    for name in ("report.html", "report.md", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"retain", "target"}
    assert summary["models"]["target"]["reference"] == "retain"
    assert summary["models"]["target"]["metrics"]["forget_quality"] == pytest.approx(1.0)
    forget = people_suite().get("forget")
    text = (out / "report.md").read_text() + (out / "report.html").read_text()
    for row in forget.rows:
        assert row["question"] not in text


# ---------------------------------------------------------------------------- TOFU
@requires_tofu
def test_tofu_forget01_small(tiny_model_dir, tmp_path):
    res = evaluate(
        str(tiny_model_dir),
        str(tmp_path / "ev"),
        benchmark="tofu",
        split="forget01",
        data_dir=str(TOFU),
        limit=4,
        overrides=["generation.max_new_tokens=2"],
        progress=False,
    )
    for key in (
        "forget_truth_ratio",
        "retain_truth_ratio",
        "real_authors_probability",
        "world_facts_probability",
        "mia_min_k_auc",
        "model_utility",
    ):
        assert key in res["metrics"], key
    _assert_no_none(res["metrics"])
    assert res["benchmark"] == "tofu" and res["split"] == "forget01"
    assert all(d["n"] == 4 for d in res["datasets"].values())
    assert NO_REF in res["skipped"]["forget_quality"]


# ---------------------------------------------------------------------------- eval settings
EXAMPLE_EVAL = Path(__file__).resolve().parents[2] / "examples" / "eval_openunlearning_tofu.yaml"


def test_eval_defaults_follow_tofu_and_the_models_training_prompt():
    cfg = resolve_eval_config(model="m", output="o")
    assert cfg.generation.max_new_tokens == 200
    assert cfg.prompt.max_length == 512
    assert cfg.score.end_of_turn is True
    assert cfg.overwrite is False
    trained = PromptConfig(template="plain", system_prompt="Be brief.", max_length=256)
    # the model's training template and system prompt, but eval's own length cap
    assert cfg.prompt.resolve(trained) == PromptConfig("plain", "Be brief.", 512)
    assert cfg.prompt.resolve(None) == PromptConfig(max_length=512)
    cfg = resolve_eval_config(
        model="m", output="o", overrides=["prompt.system_prompt=none", "prompt.max_length=300"]
    )
    assert cfg.prompt.resolve(trained) == PromptConfig("plain", "none", 300)


def test_openunlearning_example_config_resolves_to_its_protocol():
    cfg = resolve_eval_config(EXAMPLE_EVAL, model="m", output="o", split="forget05")
    assert cfg.prompt.system_prompt == "You are a helpful assistant."
    assert cfg.prompt.template == "chat"
    assert cfg.prompt.max_length == 512
    assert cfg.generation.max_new_tokens == 200
    assert cfg.score.end_of_turn is True
    assert (cfg.benchmark, cfg.split) == ("tofu", "forget05")  # arguments beat the file


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generation.max_new_token=4", "valid keys in 'generation': max_new_tokens"),
        ("train.lr=1e-5", "valid sections: model, prompt, generation, score"),
        ("score.end_of_turn=maybe", "score.end_of_turn"),
        ("generation.max_new_tokens=0", "at least 1"),
        ("speed=3", "top-level keys"),
    ],
)
def test_eval_settings_are_checked(override, message):
    with pytest.raises(UnlearnError, match=message):
        resolve_eval_config(model="m", output="o", overrides=[override])


def test_overwrite_replaces_the_evaluation_and_drops_stale_records(tiny_model_dir, tmp_path):
    rows = [
        {"question": f"Where was person {i} born?", "answer": f"In town {i}."} for i in range(3)
    ]
    forget = write_jsonl(tmp_path / "f.jsonl", rows)
    holdout = write_jsonl(tmp_path / "h.jsonl", rows[::-1])
    out = tmp_path / "ev"
    evaluate(str(tiny_model_dir), str(out), forget=str(forget), holdout=str(holdout), **FAST)
    assert (out / "records" / "holdout.jsonl").is_file()
    with pytest.raises(UnlearnError, match="--overwrite"):
        evaluate(str(tiny_model_dir), str(out), forget=str(forget), **FAST)
    res = evaluate(str(tiny_model_dir), str(out), forget=str(forget), overwrite=True, **FAST)
    assert sorted(p.name for p in (out / "records").iterdir()) == ["forget.jsonl"]
    assert "mia" in res["skipped"]
    # any non-empty folder is refused, not only an evaluation
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    with pytest.raises(UnlearnError, match="already holds files; pass --overwrite"):
        evaluate(str(tiny_model_dir), str(other), forget=str(forget), **FAST)


def test_examples_text_saved_only_when_asked_and_shown_by_report(
    people_evals, tiny_model_dir, tmp_path
):
    _, _, ref, tgt = people_evals
    assert "examples" not in ref and "examples" not in tgt  # default: no data text in results
    out = tmp_path / "ev"
    res = evaluate(str(tiny_model_dir), str(out), benchmark="people", examples=2, **FAST)
    forget = people_suite().get("forget")
    shown = res["examples"]["forget"]
    assert [e["question"] for e in shown] == [r["question"] for r in forget.rows[:2]]
    assert all(set(e) == {"id", "question", "answer", "generation"} for e in shown)
    assert "holdout" not in res["examples"]  # nothing generated there
    build_report([str(out)], str(tmp_path / "rep"), show_examples=True)
    assert forget.rows[0]["question"] in (tmp_path / "rep" / "report.md").read_text()
    build_report([str(out)], str(tmp_path / "hidden"))
    assert forget.rows[0]["question"] not in (tmp_path / "hidden" / "report.md").read_text()


# ---------------------------------------------------------------------------- perturbed answers
def _csv(path: Path, rows: list[dict]) -> str:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_csv_perturbed_answers_as_json_lists(tmp_path):
    rows = [
        {"question": "Q1?", "answer": "A1.", "perturbed_answer": json.dumps(["B1.", "C1."])},
        {"question": "Q2?", "answer": "A2.", "perturbed_answer": json.dumps(["B2.", "C2."])},
    ]
    s = custom_suite(_csv(tmp_path / "f.csv", rows)).get("forget")
    assert [r["perturbed_answer"] for r in s.rows] == [["B1.", "C1."], ["B2.", "C2."]]
    assert s.has_truth_ratio and not s.has_paraphrase  # empty CSV cells are absent, not NaN


def test_plain_string_perturbed_answer_is_refused(tmp_path):
    rows = [{"question": "Q1?", "answer": "A1.", "perturbed_answer": "B1. C1."}]
    with pytest.raises(UnlearnError, match=r"row 0 perturbed_answer is a plain string.*JSON list"):
        custom_suite(_csv(tmp_path / "f.csv", rows))


def test_ragged_perturbed_answers_are_one_error(tmp_path):
    rows = [
        {"question": "Q1?", "answer": "A1.", "perturbed_answer": ["B1.", "C1."]},
        {"question": "Q2?", "answer": "A2.", "perturbed_answer": ["B2."]},
    ]
    with pytest.raises(UnlearnError, match="row 1 has 1 perturbed answers but row 0 has 2"):
        custom_suite(str(write_jsonl(tmp_path / "f.jsonl", rows)))
