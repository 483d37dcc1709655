"""The comparison report, on three fake evaluation folders (target, retain as reference, npo).

Numbers look like a TOFU forget01 run on a small model; the npo model has a training log. The
privacy test puts marker strings in `examples` and checks they reach no output file unless
`show_examples=True`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from unlearn.errors import UnlearnError
from unlearn.report.build import build_report, format_value

MARKER = "FORGET-SET-MARKER-7f3a"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SKIP_REASON = "needs the reference model's records; pass --reference"


def _truth_ratios(seed: int, centre: float, n: int = 40) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.lognormvariate(0, 0.5) * centre, 4) for _ in range(n)]


def _examples(tag: str) -> dict:
    return {
        "forget": [
            {
                "id": "3",
                "question": f"Where was the author born? {MARKER}-q-{tag}",
                "answer": f"In Port Selwyn. {MARKER}-a-{tag}",
                "generation": f"<b>Port Selwyn</b> {MARKER}-g-{tag}",
            }
        ]
    }


def _write_eval(folder: Path, results: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def _train_log(model_path: Path) -> None:
    lines = []
    for step in range(1, 21):
        forget = 2.3 - 0.08 * step
        retain = 1.1 + 0.01 * step
        row = {
            "step": step,
            "epoch": step / 20,
            "lr": 1e-5,
            "loss": forget + retain,
            "forget_loss": forget,
            "retain_loss": retain,
            "log_ratio": -0.05 * step,
            "grad_norm": 3.0,
            "seconds": 0.5 * step,
        }
        lines.append(json.dumps(row))
    lines.append('{"step": 21, "loss": 1.')  # torn last line of a killed run
    (model_path / "logs").mkdir(parents=True)
    (model_path / "logs" / "train.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def evals(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evals")
    retain = _write_eval(
        root / "ev" / "retain",
        {
            "name": "retain",
            "model": {"spec": "out/retain", "kind": "local", "sha256": "ab" * 32},
            "model_path": None,
            "benchmark": "tofu",
            "split": "forget01",
            "reference": None,
            "is_reference": True,
            "metrics": {"model_utility": 0.6012, "forget_rouge_l_recall": 0.3871,
                        "forget_truth_ratio": 0.6312, "privleak": 0.0},
            "skipped": {"forget_quality": "this model is the reference"},
            "per_example": {"forget": {"truth_ratio": _truth_ratios(1, 0.7)}},
            "examples": _examples("retain"),
            "seconds": 10.2,
        },
    )  # fmt: skip
    target = _write_eval(
        root / "ev" / "target",
        {
            "name": "target",
            "model": {"spec": "hub:open-unlearning/tofu_Llama-3.2-1B_full", "kind": "hub"},
            "benchmark": "tofu",
            "split": "forget01",
            "reference": str(retain),
            "metrics": {"forget_quality": 1.234e-05, "model_utility": 0.6241,
                        "forget_rouge_l_recall": 0.9512, "forget_truth_ratio": 0.4987,
                        "privleak": -99.81},
            "per_example": {"forget": {"truth_ratio": _truth_ratios(2, 0.3)}},
            "examples": _examples("target"),
            "seconds": 11.7,
        },
    )  # fmt: skip
    model_path = root / "out" / "npo"
    _train_log(model_path)
    npo = _write_eval(
        root / "ev" / "npo",
        {
            "name": "npo",
            "model": {"spec": str(model_path), "kind": "local", "sha256": "cd" * 32},
            "model_path": str(model_path),
            "benchmark": "tofu",
            "split": "forget01",
            "reference": "ev/retain",  # relative to the eval's working directory
            "metrics": {"forget_quality": 0.0123, "model_utility": 0.5134,
                        "forget_rouge_l_recall": 0.4021, "forget_truth_ratio": 0.6098,
                        "privleak": float("nan"), "mia_min_k_auc": 0.5472},
            "skipped": {"extraction_strength": SKIP_REASON},
            "per_example": {"forget": {"truth_ratio": _truth_ratios(3, 0.65),
                                       "rouge_l_recall": [0.4, 0.5, 0.3]}},
            "examples": _examples("npo"),
            "seconds": 12.3,
        },
    )  # fmt: skip
    return {"target": target, "retain": retain, "npo": npo}


@pytest.fixture(scope="module")
def report(evals, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report")
    summary = build_report(list(evals.values()), out)
    return out, summary


def _all_output_text(out: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file())


def test_files_exist_and_plots_are_png(report):
    out, summary = report
    for name in ("report.md", "report.html", "summary.json"):
        assert (out / name).is_file()
    plots = sorted((out / "plots").glob("*.png"))
    assert len(plots) == 3
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in plots)
    assert all(summary["plots"][k] for k in summary["plots"])


def test_summary_has_every_model_and_its_metrics(report):
    out, summary = report
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert list(on_disk["models"]) == ["target", "retain", "npo"]
    npo = on_disk["models"]["npo"]
    assert npo["metrics"]["forget_quality"] == pytest.approx(0.0123)
    assert npo["metrics"]["privleak"] is None  # NaN is not a number a JSON reader can trust
    assert npo["skipped"] == {"extraction_strength": SKIP_REASON}
    assert npo["reference"] == "retain"  # "ev/retain" matched by its trailing path
    assert on_disk["models"]["target"]["reference"] == "retain"
    assert npo["train_log"].endswith("train.jsonl")
    assert on_disk["metric_order"][:2] == ["forget_quality", "model_utility"]


def test_markdown_table(report):
    out, _ = report
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model | forget_quality"))
    assert header.startswith("| model | forget_quality | model_utility |")
    for name in ("target", "retain", "npo"):
        assert f"| {name} |" in md
    assert "1.2e-05" in md and "1.2e-02" in md  # p-values in scientific notation
    assert "0.5134" in md and "n/a" in md
    assert "![Forget quality vs model utility](plots/" in md
    # the full list has a row per metric and a column per model, in metric order
    lines = md.splitlines()
    full = lines.index("| metric | target | retain | npo |")
    table = lines[full + 2 :]
    table = table[: next(i for i, ln in enumerate(table) if not ln.startswith("|"))]
    body = [ln.split(" | ")[0].lstrip("| ") for ln in table]
    assert body[:2] == ["forget_quality", "model_utility"]
    assert len(body) == len(set(body)) > 2


def test_html_is_self_contained(report):
    out, _ = report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "<style>" in page
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page


def test_skipped_reasons_appear(report):
    out, _ = report
    for name in ("report.md", "report.html"):
        text = (out / name).read_text()
        assert "extraction_strength" in text
        assert "this model is the reference" in text
    assert "--reference" in (out / "report.md").read_text()


def test_truth_ratio_overlays_the_reference(report):
    _, summary = report
    note = summary["notes"]["truth_ratio"]
    assert "alone" not in note


def test_privacy_examples_hidden_unless_asked(report, evals, tmp_path):
    out, _ = report
    assert MARKER not in _all_output_text(out)
    assert "--show-examples" in (out / "report.md").read_text()

    shown = tmp_path / "shown"
    build_report(list(evals.values()), shown, show_examples=True)
    md, page = (shown / "report.md").read_text(), (shown / "report.html").read_text()
    for tag in ("target", "retain", "npo"):
        assert f"{MARKER}-g-{tag}" in md and f"{MARKER}-q-{tag}" in page
    assert "&lt;b&gt;Port Selwyn&lt;/b&gt;" in page and "<b>Port Selwyn" not in page
    assert MARKER not in (shown / "summary.json").read_text()


def test_without_reference_or_forget_quality(evals, tmp_path):
    summary = build_report([evals["npo"]], tmp_path / "r")
    assert "alone" in summary["notes"]["truth_ratio"]
    only_target = tmp_path / "ev2" / "x"
    _write_eval(only_target, {"metrics": {"model_utility": 0.5}})
    summary = build_report([only_target], tmp_path / "r")
    assert summary["plots"]["forget_quality_vs_model_utility"] is None
    assert not (tmp_path / "r" / "plots" / "forget_quality_vs_model_utility.png").exists()
    assert list(summary["models"]) == ["x"]  # name defaults to the folder name
    assert "No model has both" in (tmp_path / "r" / "report.md").read_text()


def test_missing_results_json(tmp_path):
    (tmp_path / "not_an_eval").mkdir()
    with pytest.raises(UnlearnError, match=r"not_an_eval.*unlearn eval"):
        build_report([tmp_path / "not_an_eval"], tmp_path / "out")


def test_no_folders(tmp_path):
    with pytest.raises(UnlearnError, match="no evaluation folders"):
        build_report([], tmp_path / "out")


def test_format_value():
    assert format_value("forget_quality", 1.234e-05) == "1.2e-05"
    assert format_value("model_utility", 0.512345) == "0.5123"
    assert format_value("privleak", -99.81) == "-99.81"
    assert format_value("count", 12.0) == "12"
    assert format_value("model_utility", None) == "n/a"


def test_localized_run_gets_its_heatmap_and_counts(evals, tmp_path) -> None:
    """A model trained with a localize section: the report shows what was selected, and where."""
    from unlearn.localization.mask import summarize
    from unlearn.localization.plot import heatmap

    results = json.loads((evals["npo"] / "results.json").read_text())
    loc = Path(results["model_path"]) / "localization"
    loc.mkdir(exist_ok=True)
    import torch

    mask = {
        "model.layers.0.mlp.down_proj.weight": torch.tensor([[True, False], [False, False]]),
        "model.layers.1.self_attn.q_proj.weight": torch.tensor([[True, True], [False, False]]),
    }
    summary = summarize(mask)
    info = {"method": "grin", "selected": 3, "scored": 8, "fraction": 3 / 8,
            "settings": {"noise_std": 0.5, "train_all": False}}  # fmt: skip
    (loc / "localization.json").write_text(json.dumps({**info, "summary": summary}))
    heatmap(summary, loc / "heatmap.png", "grin")
    try:
        out = tmp_path / "report"
        build_report(list(evals.values()), out)
        md = (out / "report.md").read_text()
        assert "## Localization" in md and "grin: 3 of 8 scored weights selected (37.5%)" in md
        assert md.count("plots/localization_") == 1  # only the localized model
        image = next((out / "plots").glob("localization_*.png"))
        assert image.read_bytes() == (loc / "heatmap.png").read_bytes()
        assert "data:image/png;base64" in (out / "report.html").read_text()
    finally:
        import shutil

        shutil.rmtree(loc)


def test_report_without_localization_has_no_such_section(report) -> None:
    out, _ = report
    assert "Localization" not in (out / "report.md").read_text()
