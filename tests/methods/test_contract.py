"""The four-file contract: every registered method has its module (src/unlearn/methods/<name>.py,
checked in test_registry.py), its registry entry, a documentation page docs/methods/<name>.md and
a test file tests/methods/test_<name>.py that names it. A new method that misses one fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlearn.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_a_doc_page(name: str) -> None:
    page = ROOT / "docs" / "methods" / f"{name}.md"
    assert page.is_file(), f"method {name!r} has no documentation page {page.relative_to(ROOT)}"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_a_test_file_that_names_it(name: str) -> None:
    tests = ROOT / "tests" / "methods" / f"test_{name}.py"
    assert tests.is_file(), f"method {name!r} has no test file {tests.relative_to(ROOT)}"
    text = tests.read_text(encoding="utf-8")
    assert f'"{name}"' in text or f"methods.{name}" in text or f"methods import {name}" in text, (
        f"{tests.relative_to(ROOT)} never names method {name!r} (by its registry name or module)"
    )
