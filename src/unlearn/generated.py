"""Sections of a document generated from code (the README's method table, docs/metrics.md's
metric keys): rewritten between two markers by `python -m MODULE FILE`, and checked for drift by
a test that compares the file with what the code generates now."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from unlearn.errors import UnlearnError

END = "<!-- END GENERATED -->"


def begin_marker(module: str, target: str) -> str:
    return f"<!-- BEGIN GENERATED: python -m {module} {target} -->"


def replace_section(text: str, begin: str, body: str, where: str) -> str:
    """`text` with the part between `begin` and `END` replaced by `body`."""
    if begin not in text or END not in text:
        raise UnlearnError(f"{where} lacks the markers {begin!r} and {END!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{begin}\n{body}{END}{tail}"


def main(argv: list[str], markdown: Callable[[], str], update: Callable[[str], str]) -> int:
    """With one FILE argument, rewrite its generated section; without, print the section."""
    if len(argv) != 1:
        print(markdown(), end="")
        return 0
    path = Path(argv[0])
    path.write_text(update(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0
