"""Loading forget/retain data: question/answer records or plain documents, local or from the hub.

Every example gets a stable id (the file's own id column if it has one, else its row number) and a
sha256 of its content. Manifests, logs and reports name examples by those two values, never by
their text, so a run's outputs do not leak the data it was asked to forget.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn.config import DataConfig
from unlearn.errors import UnlearnError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Example:
    """One question/answer pair (`question`, `answer`) or one document (`text`).

    preferred: an answer to prefer over `answer` (DPO's winning response), when the data gives one;
    not part of `sha256`, which names the example to forget, not what replaces it.
    """

    id: str
    sha256: str
    question: str | None = None
    answer: str | None = None
    text: str | None = None
    preferred: str | None = None

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "qa"


def content_hash(*parts: str) -> str:
    """sha256 over the parts joined by a separator that cannot occur in text."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _read_json(path: Path) -> list[dict[str, Any]]:
    """A `.json` file may be one JSON array or JSON lines (TOFU's files are the latter)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UnlearnError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
        if not all(isinstance(r, dict) for r in data):
            strings = [r for r in data if isinstance(r, str)]
            if len(strings) == len(data):  # a list of documents, as MUSE's privleak files are
                return [{"text": s} for s in strings]
            raise UnlearnError(f"{path} must hold a list of objects (records) or strings")
        return data
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UnlearnError(f"{path}:{lineno} is not valid JSON: {exc.msg}") from None
        if isinstance(row, str):
            row = {"text": row}
        if not isinstance(row, dict):
            raise UnlearnError(f"{path}:{lineno} must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_local(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise UnlearnError(f"data file not found: {path}")
    if path.is_dir():
        raise UnlearnError(f"{path} is a folder; pass a data file ({', '.join(LOCAL_SUFFIXES)})")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _read_json(path)
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        except Exception as exc:  # pandas raises many types; the user needs only the message
            raise UnlearnError(f"could not read {path}: {str(exc).splitlines()[0]}") from None
        return frame.to_dict(orient="records")
    raise UnlearnError(
        f"unsupported data file type '{suffix}' for {path}; use one of {', '.join(LOCAL_SUFFIXES)}"
    )


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """`hub:OWNER/NAME[:CONFIG][:SPLIT]` -> (repo, config, split); the split defaults to train."""
    parts = spec[len("hub:") :].split(":")
    if not parts[0] or "/" not in parts[0] or len(parts) > 3:
        raise UnlearnError(
            f"bad hub data spec '{spec}'; use hub:OWNER/NAME[:CONFIG][:SPLIT], "
            "e.g. hub:locuslab/TOFU:forget01"
        )
    repo = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return repo, config, split


def _read_hub(spec: str) -> list[dict[str, Any]]:
    repo, config, split = parse_hub_spec(spec)
    import datasets

    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # offline, missing repo, missing config: all one line for the user
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnlearnError(
            f"could not load hub dataset '{spec}' ({first[:200]}); check the name and your "
            "connection, or download it and pass a local file"
        ) from None
    return [dict(r) for r in ds]


def read_rows(path: str) -> list[dict[str, Any]]:
    """Raw rows from a local file or a hub spec."""
    if path.startswith("hub:"):
        return _read_hub(path)
    return _read_local(Path(path))


def _detect_kind(rows: list[dict[str, Any]], cfg: DataConfig, where: str) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    cols = set(rows[0])
    if cfg.question_key in cols and cfg.answer_key in cols:
        return "qa"
    if cfg.text_key in cols:
        return "text"
    raise UnlearnError(
        f"{where} has columns {sorted(cols)}, but neither '{cfg.question_key}'+'{cfg.answer_key}' "
        f"(question/answer) nor '{cfg.text_key}' (documents); map yours with e.g. "
        "forget.question_key=prompt forget.answer_key=response"
    )


_KEY_FIELD = [{"qa": "question_key", "text": "text_key"}, {"qa": "answer_key", "text": "text_key"}]


def load_examples(cfg: DataConfig, role: str = "data") -> list[Example]:
    """Load and validate one data set; `role` ("forget", "retain") makes errors say which."""
    if not cfg.path:
        raise UnlearnError(f"no {role} data given; pass --{role} FILE or {role}.path in the config")
    try:
        rows = read_rows(cfg.path)
    except UnlearnError as exc:
        if str(exc).startswith(role):
            raise
        raise UnlearnError(f"{role} data: {exc}") from None
    where = f"{role} data {cfg.path}"
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        raise UnlearnError(f"{where} is empty; it must hold at least one example")
    kind = _detect_kind(rows, cfg, where)
    needed = [cfg.question_key, cfg.answer_key] if kind == "qa" else [cfg.text_key]
    examples = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        missing = [k for k in needed if k not in row]
        if missing:
            raise UnlearnError(
                f"{where}: row {i} has no column '{missing[0]}' (columns: {sorted(row)}); "
                f"map yours with {role}.{_KEY_FIELD[needed.index(missing[0])][kind]}=NAME"
            )
        values = [row[k] for k in needed]
        if not all(isinstance(v, str) and v.strip() for v in values):
            raise UnlearnError(f"{where}: row {i} has an empty or non-text value in {needed}")
        ex_id = str(row[cfg.id_key]) if cfg.id_key and cfg.id_key in row else str(i)
        if ex_id in seen:
            raise UnlearnError(f"{where}: id '{ex_id}' occurs twice; ids must be unique")
        seen.add(ex_id)
        if kind == "qa":
            preferred = _optional_text(row, cfg.preferred_key, f"{where}: row {i}")
            examples.append(
                Example(
                    ex_id,
                    content_hash(*values),
                    question=values[0],
                    answer=values[1],
                    preferred=preferred,
                )
            )
        else:
            examples.append(Example(ex_id, content_hash(values[0]), text=values[0]))
    return examples


def _optional_text(row: dict[str, Any], key: str, where: str) -> str | None:
    """An optional text column: absent, null, NaN (a blank csv cell) or blank all mean none."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return None
    if not isinstance(value, str):
        raise UnlearnError(
            f"{where} has a non-text value in '{key}' ({type(value).__name__}); give text or leave "
            "it empty"
        )
    return value if value.strip() else None


def manifest_entries(examples: list[Example]) -> list[dict[str, str]]:
    """What a manifest records about a data set: ids and hashes only."""
    return [{"id": e.id, "sha256": e.sha256} for e in examples]


def dataset_hash(examples: list[Example]) -> str:
    """One hash for a whole data set, order included."""
    return content_hash(*(f"{e.id}:{e.sha256}" for e in examples))
