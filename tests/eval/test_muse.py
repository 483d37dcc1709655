"""MUSE on the engine: prompts as MUSE's code builds them, metrics recomputed the way MUSE's code
computes them from the saved records, privleak's reference, and the one-line errors.

Data: ../shared/data/muse/news (the hub's News layout); model: the tiny random Llama of conftest.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from rouge_score import rouge_scorer
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_curve

from conftest import SHARED
from unlearn.api import evaluate
from unlearn.cli import main
from unlearn.config import PromptConfig
from unlearn.errors import UnlearnError
from unlearn.eval.run import set_formatter
from unlearn.eval.suites.muse import KNOWMEM_STOP, PUBLISHED_RETRAIN_AUC, muse_suite
from unlearn.prompts import PromptFormatter

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not (SHARED / "muse" / "news").is_dir(), reason="needs ../shared/data/muse"),
]
NEWS = SHARED / "muse" / "news"
LIMIT = 3


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def news_eval(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("muse") / "eval"
    res = evaluate(
        str(tiny_model_dir), str(out), benchmark="muse", split="news", data_dir=str(NEWS),
        limit=LIMIT, retrain_auc=0.4772, progress=False,
    )  # fmt: skip
    records = {f.stem: [json.loads(x) for x in f.read_text().splitlines()] for f in (out / "records").glob("*.jsonl")}  # fmt: skip
    return res, records, out


def test_sets_are_declared_as_muse_asks_them(tiny):
    suite = muse_suite("news", str(NEWS), limit=LIMIT)
    by = {s.name: s for s in suite.sets}
    assert list(by) == [
        "verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak_forget", "privleak_holdout",
    ]  # fmt: skip
    assert by["verbmem_forget"].max_new_tokens == 128 and by["verbmem_forget"].prompt == "raw"
    assert by["knowmem_forget"].max_new_tokens == 32 and by["knowmem_forget"].stop == KNOWMEM_STOP
    assert (by["privleak_forget"].mia, by["privleak_holdout"].mia) == ("member", "nonmember")
    assert not by["verbmem_forget"].rouge_stem  # MUSE's code does not stem
    # knowmem's prompt is MUSE's: every in-context pair, then the question, "Answer: " last
    _, fmt = tiny
    icl = _json(NEWS / "knowmem" / "forget_qa_icl.json")
    general = "".join(f"Question: {p['question']}\nAnswer: {p['answer']}\n\n" for p in icl)
    q = _json(NEWS / "knowmem" / "forget_qa.json")[0]["question"]
    mine = set_formatter(fmt, by["knowmem_forget"]).prompt_text(q)
    assert mine == general + f"Question: {q}\nAnswer: "
    # verbmem's prompt is the data's, verbatim
    prompt = _json(NEWS / "verbmem" / "forget.json")[0]["prompt"]
    assert set_formatter(fmt, by["verbmem_forget"]).prompt_text(prompt) == prompt


def test_rouge_is_muse_rouge_l_f1_unstemmed_against_the_first_128_gt_tokens(news_eval, tiny):
    res, records, _ = news_eval
    _, fmt = tiny
    tok = fmt.tokenizer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    gts = _json(NEWS / "verbmem" / "forget.json")[:LIMIT]
    expected = []
    for row, rec in zip(gts, records["verbmem_forget"], strict=True):
        ids = tok(row["gt"], add_special_tokens=True)["input_ids"][:128]
        gt = tok.decode(ids, skip_special_tokens=True)
        assert row["gt"][: rec["truth_chars"]] == gt
        expected.append(scorer.score(gt, rec["generation"])["rougeL"].fmeasure)
    assert res["metrics"]["verbmem_forget_rouge_l_f1"] == pytest.approx(np.mean(expected))
    qa = _json(NEWS / "knowmem" / "forget_qa.json")[:LIMIT]
    f1 = [
        scorer.score(r["answer"], rec["generation"])["rougeL"].fmeasure
        for r, rec in zip(qa, records["knowmem_forget"], strict=True)
    ]
    assert res["metrics"]["knowmem_forget_rouge_l_f1"] == pytest.approx(np.mean(f1))
    for rec in records["knowmem_forget"] + records["knowmem_retain"]:
        assert not any(s in rec["generation"] for s in KNOWMEM_STOP)
    # only what MUSE reports: no truth ratio, no TOFU model utility
    assert not any(k.startswith(("model_utility", "forget_quality")) for k in res["metrics"])
    assert set(res["headline"]) <= set(res["metrics"])


def test_privleak_is_muse_formula_from_the_saved_token_logprobs(news_eval):
    res, records, _ = news_eval

    def min_k(rec, ratio=0.4):
        lp = np.sort(np.asarray(rec["answer"]["token_logprobs"]))
        return -float(np.mean(lp[: int(len(lp) * ratio)]))

    ppl = [min_k(r) for r in records["privleak_forget"]] + [
        min_k(r) for r in records["privleak_holdout"]
    ]
    y = [0] * len(records["privleak_forget"]) + [1] * len(records["privleak_holdout"])
    fpr, tpr, _ = roc_curve(y, -np.asarray(ppl))
    muse_auc = sk_auc(fpr, tpr)
    expected = (muse_auc - 0.4772) / 0.4772 * 100
    assert res["metrics"]["privleak"] == pytest.approx(expected, abs=1e-6)
    assert "retrain_auc" in res["notes"]["privleak_reference"]
    # MUSE needs Min-K% only: no vocabulary moments are recorded, and Min-K%++ says why it is absent
    assert all("vocab_mu" not in r["answer"] for r in records["privleak_forget"])
    assert "vocabulary moments" in res["skipped"]["mia_min_k_plus_plus_auc"]


def test_privleak_from_a_retain_comparison(news_eval, tiny_model_dir, tmp_path):
    _, _, target = news_eval
    # the same model as its own retrained reference: nothing leaks
    res = evaluate(
        str(tiny_model_dir), str(tmp_path / "e"), benchmark="muse", data_dir=str(NEWS),
        limit=LIMIT, reference=str(target), progress=False,
    )  # fmt: skip
    assert res["metrics"]["privleak"] == pytest.approx(0.0, abs=1e-9)
    assert res["comparisons"] == {"retain": str(target)}
    assert "retain comparison" in res["notes"]["privleak_reference"]


def test_published_auc_only_on_the_whole_data():
    suite = muse_suite("news", str(NEWS))
    assert suite.retrain_auc == pytest.approx(
        (1 - PUBLISHED_RETRAIN_AUC["news"], suite.retrain_auc[1])
    )


def test_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    # a folder missing a split
    partial = tmp_path / "muse"
    shutil.copytree(NEWS / "knowmem", partial / "knowmem")
    with pytest.raises(UnlearnError, match=r"has no verbmem/forget.json"):
        muse_suite("news", str(partial))
    with pytest.raises(UnlearnError, match="MUSE has no split 'poems'"):
        muse_suite("poems", str(NEWS))
    # privleak without a retrained AUC: refused before the model loads
    code = main(
        ["eval", "--model", str(tiny_model_dir), "--benchmark", "muse", "--data-dir", str(NEWS),
         "--limit", "2", "--output", str(tmp_path / "o")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "retrain_auc" in err[0]
    assert not (tmp_path / "o").exists()
    # ... unless privleak is left out (the retrained model's own evaluation)
    res = evaluate(
        str(tiny_model_dir), str(tmp_path / "r"), benchmark="muse", data_dir=str(NEWS), limit=1,
        privleak=False, progress=False,
    )  # fmt: skip
    assert "privleak" not in res["metrics"] and "privleak" not in res["skipped"]
    assert "mia_min_k_auc" in res["metrics"]


def test_stop_strings_cut_generations(tiny):
    _, fmt = tiny
    f = PromptFormatter(fmt.tokenizer, PromptConfig(), "few_shot", "", KNOWMEM_STOP)
    assert f.cut(" Paris.\n\nQuestion: next") == "Paris."
    assert f.cut("Rome\nQuestion: x") == "Rome"
    assert f.cut("no stop here") == "no stop here"


def test_unlearning_muse_documents_and_qa_only_methods_refuse_them(
    tiny_model_dir, tmp_path, capsys
):
    """MUSE's raw corpus (a JSON list of articles) is unlearned as documents, cut into windows of
    prompt.max_length; a method that needs question/answer pairs says so in one line."""
    import unlearn

    corpus = _json(NEWS / "raw" / "forget.json")[:3]
    forget = tmp_path / "forget.json"
    forget.write_text(json.dumps([d[:400] for d in corpus]))
    run = unlearn.forget(
        str(tiny_model_dir), str(forget), None, "grad_ascent", str(tmp_path / "ga"),
        overrides=["train.max_steps=1", "prompt.max_length=64", "train.progress=false"],
    )  # fmt: skip
    data = run.manifest["data"]
    assert data["forget"]["kind"] == "text" and data["forget"]["n"] == 3
    assert data["forget_sequences"] > 3  # each article is cut into 64-token windows
    capsys.readouterr()
    code = main(
        ["forget", "--model", str(tiny_model_dir), "--forget", str(forget), "--method", "idk_nll",
         "--output", str(tmp_path / "idk"), "method.alpha=0"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "not documents" in err[0]
