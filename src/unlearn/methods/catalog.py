"""README's table of methods, generated from the registry: each method's `summary` and a short
source taken from its `citation`.

`python -m unlearn.methods.catalog README.md` rewrites the part of README.md between the markers
below; tests/methods/test_catalog.py fails when that part differs from `markdown()`.
"""

from __future__ import annotations

import re
import sys

from unlearn.errors import UnlearnError
from unlearn.methods import METHODS

BEGIN = "<!-- BEGIN GENERATED: python -m unlearn.methods.catalog README.md -->"
END = "<!-- END GENERATED -->"

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
    if BEGIN not in text or END not in text:
        raise UnlearnError(f"README.md lacks the markers {BEGIN!r} and {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{markdown()}{END}{tail}"


def main(argv: list[str]) -> int:
    """`python -m unlearn.methods.catalog README.md` rewrites the generated table."""
    from pathlib import Path

    if len(argv) != 1:
        print(markdown(), end="")
        return 0
    path = Path(argv[0])
    path.write_text(update_readme(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
