"""README's method table is generated from the registry (`unlearn.methods.catalog`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlearn.errors import UnlearnError
from unlearn.methods import METHODS, catalog

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_method_table_is_generated_from_the_registry() -> None:
    text = README.read_text(encoding="utf-8")
    assert catalog.update_readme(text) == text, (
        "README.md's method table is out of date: run `python -m unlearn.methods.catalog README.md`"
    )


def test_one_row_per_method_in_registry_order() -> None:
    rows = catalog.markdown().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == [f"`{name}`" for name in METHODS]
    for row, method in zip(rows, METHODS.values(), strict=True):
        assert row.count(" | ") == 2  # three cells: nothing in a summary breaks the table
        assert catalog.short_source(method.citation) in row.replace("\\", "")


@pytest.mark.parametrize(
    ("citation", "source"),
    [
        ("Maini et al. 2024, TOFU: A Task of Fictitious Unlearning for LLMs, arXiv:2401.06121",
         "Maini et al. 2024, TOFU"),
        ("Zhang et al. 2024, NPO, arXiv:2404.05868; defaults from OpenUnlearning NPO.yaml",
         "Zhang et al. 2024, NPO; OpenUnlearning"),
        ("standard fine-tuning, as in TOFU (arXiv:2401.06121)", "standard fine-tuning, as in TOFU"),
        ("Someone 2020, A Title", "Someone 2020, A Title"),
    ],
)  # fmt: skip
def test_short_source(citation: str, source: str) -> None:
    assert catalog.short_source(citation) == source


def test_missing_markers_are_one_line() -> None:
    with pytest.raises(UnlearnError) as err:
        catalog.update_readme("# no table here\n")
    assert "\n" not in str(err.value) and "BEGIN GENERATED" in str(err.value)
