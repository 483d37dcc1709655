"""README's table of methods, generated from the registry: each method's `summary` and a short
source taken from its `citation`.

`python -m unlearn.methods.catalog README.md` rewrites the part of README.md between the markers
below; tests/methods/test_catalog.py fails when that part differs from `markdown()`.
"""

from __future__ import annotations

import re
import sys

from unlearn import generated
from unlearn.methods import METHODS

BEGIN = generated.begin_marker("unlearn.methods.catalog", "README.md")

# The authors and title end where the citation goes on to an identifier or the origin of defaults.
_SOURCE_END = re.compile(r":|;|,? \(?arXiv")


def short_source(citation: str) -> str:
    """Authors, year and short title of a citation, plus "OpenUnlearning" where the defaults or the
    formula come from it: "Zhang et al. 2024, Negative Preference Optimization; OpenUnlearning"."""
    match = _SOURCE_END.search(citation)
    source = (citation[: match.start()] if match else citation).strip().rstrip(",")
    if "OpenUnlearning" in citation and "OpenUnlearning" not in source:
        source += "; OpenUnlearning"
    return source


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell: no column breaks, no emphasis from `**`."""
    return text.replace("|", "\\|").replace("*", "\\*")


def markdown() -> str:
    """One table row per method, in registry order."""
    lines = ["| name | what it does | source |", "|---|---|---|"]
    for method in METHODS.values():
        summary, source = _cell(method.summary), _cell(short_source(method.citation))
        lines.append(f"| `{method.name}` | {summary} | {source} |")
    return "\n".join(lines) + "\n"


def update_readme(text: str) -> str:
    """`text` (README.md) with the part between the markers regenerated."""
    return generated.replace_section(text, BEGIN, markdown(), "README.md")


if __name__ == "__main__":
    sys.exit(generated.main(sys.argv[1:], markdown, update_readme))
