"""GRIN's "PO" is TOFU's preference optimization (NLL toward refusals + retain NLL) = `idk_nll`,
not `idk_dpo` (OpenUnlearning's IdkDPO, a DPO variant). Guards the docs and the benchmark."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GRIN_DOC = ROOT / "docs" / "methods" / "grin.md"
GRIN_BENCH = ROOT / "benchmarks" / "grin.py"


def _sentences(text: str) -> list[str]:
    """Sentences of a markdown page, each joined onto one line (a sentence may wrap)."""
    flat = re.sub(r"\s+", " ", text)
    return [s for s in re.split(r"(?<=[.;])\s+(?=[A-Z`(*#-])", flat) if s]


def _mentions_po(sentence: str) -> bool:
    return re.search(r"\bPO\b", sentence) is not None


def test_grin_doc_maps_po_to_idk_nll():
    sentences = _sentences(GRIN_DOC.read_text())
    assert any(_mentions_po(s) and "idk_nll" in s for s in sentences), "grin.md: PO is idk_nll"
    for s in sentences:
        if _mentions_po(s) and "idk_dpo" in s:
            assert re.search(r"\bnot\b", s), f"grin.md presents idk_dpo as PO: {s!r}"


def test_grin_doc_examples_do_not_use_idk_dpo():
    # the page's commands show GRIN's setup, whose losses are NPO, GradDiff and PO (idk_nll)
    blocks = re.findall(r"```.*?```", GRIN_DOC.read_text(), flags=re.S)
    assert blocks
    assert not any("--method idk_dpo" in block for block in blocks)


def test_grin_benchmark_default_methods_include_idk_nll():
    text = GRIN_BENCH.read_text()
    match = re.search(
        r"""add_argument\(\s*["']--methods["']\s*,\s*default=["']([^"']*)["']""", text
    )
    assert match, "benchmarks/grin.py: --methods default not found"
    methods = match.group(1).split(",")
    assert "idk_nll" in methods
    assert "idk_dpo" not in methods  # IdkDPO is not GRIN's PO; name it explicitly if wanted
