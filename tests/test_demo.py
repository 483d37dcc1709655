"""The demo pipeline end to end on the tiny model: models cached, report written, reruns reuse."""

from __future__ import annotations

import json

import pytest

from unlearn.demo import DemoSettings, run_demo

pytestmark = pytest.mark.slow  # the whole demo: fine-tune, unlearn, evaluate, report


def test_demo_runs_end_to_end_and_caches_models(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    settings = DemoSettings(
        model=str(tiny_model_dir),
        n_forget=1,
        n_retain=2,
        n_holdout=1,
        qa_per_person=2,
        finetune_epochs=1,
        unlearn_epochs=1,
        max_new_tokens=4,
        finetune_lr=1e-3,
    )
    out = tmp_path / "demo"
    summary = run_demo(str(out), settings)
    for f in (
        "report/report.html",
        "report/report.md",
        "report/summary.json",
        "settings.json",
        "unlearned/model.safetensors",
        "eval/unlearned/results.json",
    ):
        assert (out / f).is_file(), f
    res = json.loads((out / "eval" / "unlearned" / "results.json").read_text())
    assert {"forget_quality", "model_utility", "forget_rouge_l_recall"} <= set(res["metrics"])
    assert summary  # the report's machine-readable summary
    # every fact is trained as its bare answer and as a statement under the paraphrased question
    train = [json.loads(x) for x in (out / "data" / "target_train.jsonl").read_text().splitlines()]
    assert len(train) == 2 * (1 + 2) * 2
    statements = [r for r in train if r["id"].endswith("-statement")]
    assert len(statements) == len(train) // 2
    assert all(r["answer"].count(" ") >= 2 for r in statements)  # sentences, not bare facts
    cached = sorted((tmp_path / "cache" / "demo").rglob("unlearn.json"))
    assert len(cached) == 2  # target and retain models
    stamps = [p.stat().st_mtime_ns for p in cached]
    run_demo(str(out), settings)  # warm: fine-tuned models and their evaluations are reused
    assert [p.stat().st_mtime_ns for p in cached] == stamps
