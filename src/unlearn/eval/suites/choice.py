"""Multiple-choice knowledge sets (WMDP, MMLU, the user's own), asked as lm-evaluation-harness asks.

The harness's task files (v0.4.12, tasks/mmlu/default, tasks/wmdp): the prompt is the subject line
"The following are multiple choice questions (with answers) about {subject}.\n\n", then k solved
examples "{question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer: {letter}\n\n" (MMLU's first k dev rows;
zero-shot by default), then "{question.strip()}\nA. {c0}\nB. {c1}\nC. {c2}\nD. {c3}\nAnswer:"; the
options " A" .. " D" are scored as continuations (`unlearn.metrics.choice`).

Data: the hub (`cais/wmdp` configs wmdp-bio / wmdp-chem / wmdp-cyber; `cais/mmlu` per subject, dev
split for the shots) or local files: WMDP `{bio,chem,cyber}_questions.json`; MMLU
`{subject}_test.jsonl` and `dev/{subject}_dev.csv`; `mcq`: any JSON/JSON-lines file (or folder of
them) of {"question", "choices": [4 texts], "answer": 0-3 or "A"-"D"}, one set per file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearn.data import read_rows
from unlearn.errors import UnlearnError
from unlearn.eval.suites.builders import EvalSet, Suite, _finish

LETTERS = ("A", "B", "C", "D")
WMDP = {"bio": "biology", "chem": "chemistry", "cyber": "cybersecurity"}
#: MMLU subjects reported next to WMDP as general-knowledge utility (RMU, WMDP paper).
MMLU_DEFAULT = (
    "college_biology",
    "virology",
    "college_computer_science",
    "computer_security",
    "high_school_biology",
    "high_school_computer_science",
)
#: The token cap of a question with its options: the harness uses the model's context length;
#: WMDP's longest (cyber, ~2,900 characters) fit well inside this.
CONTEXT_TOKENS = 4096
DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def question_text(row: dict[str, Any]) -> str:
    """The harness's `doc_to_text`."""
    options = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, row["choices"], strict=True))
    return f"{row['question'].strip()}{options}\nAnswer:"


def check_row(row: Any, i: int, where: str) -> dict[str, Any]:
    """A question with exactly four text options and an answer index (0-3 or A-D)."""
    if not isinstance(row, dict) or not isinstance(row.get("question"), str):
        raise UnlearnError(f"{where}: row {i} needs a text column 'question'")
    choices = row.get("choices")
    if choices is None and all(f"choice{k}" in row for k in range(4)):
        choices = [row[f"choice{k}"] for k in range(4)]
    if not isinstance(choices, list) or len(choices) != 4:
        n = len(choices) if isinstance(choices, list) else "no"
        raise UnlearnError(f"{where}: row {i} has {n} choices; multiple choice needs exactly 4")
    answer = row.get("answer")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        raise UnlearnError(
            f"{where}: row {i} answer {row.get('answer')!r} is out of range; give 0-3 or A-D"
        )
    return {
        "id": str(row.get("id", i)),
        "question": row["question"],
        "choices": [str(c) for c in choices],
        "answer": answer,
    }


def _prompted(rows: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [
        {**r, "question": prefix + question_text(r), "labels": list(LETTERS), "target": r["answer"]}
        for r in rows
    ]


def _shots(dev: list[dict[str, Any]], k: int) -> str:
    return "".join(f"{question_text(r)} {LETTERS[r['answer']]}\n\n" for r in dev[:k])


def _set(name: str, role: str, rows: list[dict[str, Any]], source: str, prefix: str) -> EvalSet:
    return EvalSet(
        name, role, _finish(_prompted(rows, prefix), source, "choice"), source, kind="choice",
        prompt="raw", max_new_tokens=0, score_end=False, max_length=CONTEXT_TOKENS,
    )  # fmt: skip


def _read(spec_or_path: str, where: str, limit: int | None) -> list[dict[str, Any]]:
    raw = read_rows(spec_or_path)
    raw = raw[:limit] if limit else raw
    if not raw:
        raise UnlearnError(f"{where} is empty")
    return [check_row(r, i, where) for i, r in enumerate(raw)]


def _subsets(split: str | None, known: tuple[str, ...], what: str) -> list[str]:
    chosen = list(known) if not split or split == "all" else split.split(",")
    bad = [s for s in chosen if s not in known and what == "WMDP"]
    if bad:
        raise UnlearnError(f"{what} has no subset '{bad[0]}'; choose from {', '.join(known)}, all")
    return chosen


def _wmdp(split: str | None, data_dir: str | None, limit: int | None, shots: int) -> Suite:
    if shots:
        raise UnlearnError("WMDP has no few-shot split; evaluate it zero-shot (shots=0)")
    sets = []
    for sub in _subsets(split, tuple(WMDP), "WMDP"):
        src = f"hub:cais/wmdp:wmdp-{sub}:test" if data_dir is None else None
        if src is None:
            path = Path(data_dir) / f"{sub}_questions.json"  # type: ignore[arg-type]
            if not path.is_file():
                raise UnlearnError(f"WMDP folder {data_dir} has no {path.name}")
            src = str(path)
        rows = _read(src, src, limit)
        sets.append(_set(f"wmdp_{sub}", "forget", rows, src, DESCRIPTION.format(subject=WMDP[sub])))
    return Suite("wmdp", split or "all", sets, metrics=("accuracy",), headline=_headline(sets))


def _mmlu(split: str | None, data_dir: str | None, limit: int | None, shots: int) -> Suite:
    sets = []
    for subject in _subsets(split, MMLU_DEFAULT, "MMLU"):
        if data_dir is None:
            src, dev_src = f"hub:cais/mmlu:{subject}:test", f"hub:cais/mmlu:{subject}:dev"
        else:
            src = str(Path(data_dir) / f"{subject}_test.jsonl")
            dev_src = str(Path(data_dir) / "dev" / f"{subject}_dev.csv")
            if not Path(src).is_file():
                raise UnlearnError(f"MMLU folder {data_dir} has no {subject}_test.jsonl")
            if shots and not Path(dev_src).is_file():
                raise UnlearnError(f"MMLU folder {data_dir} has no dev/{subject}_dev.csv for shots")
        rows = _read(src, src, limit)
        prefix = DESCRIPTION.format(subject=subject.replace("_", " "))
        if shots:
            prefix += _shots(_read(dev_src, dev_src, None), shots)
        sets.append(_set(f"mmlu_{subject}", "utility", rows, src, prefix))
    return Suite("mmlu", split or "default", sets, metrics=("accuracy",), headline=_headline(sets))


def _mcq(data_dir: str | None, limit: int | None, shots: int) -> Suite:
    if not data_dir:
        raise UnlearnError("benchmark 'mcq' needs --data-dir FILE (or a folder of .json/.jsonl)")
    if shots:
        raise UnlearnError("benchmark 'mcq' is zero-shot (shots=0)")
    root = Path(data_dir)
    files = (
        sorted(p for p in root.iterdir() if p.suffix in (".json", ".jsonl"))
        if root.is_dir()
        else [root]
    )
    if not files:
        raise UnlearnError(f"{data_dir} holds no .json or .jsonl files")
    sets = [_set(f.stem, "forget", _read(str(f), str(f), limit), str(f), "") for f in files]
    return Suite("mcq", None, sets, metrics=("accuracy",), headline=_headline(sets))


def _headline(sets: list[EvalSet]) -> tuple[str, ...]:
    return ("accuracy", "accuracy_stderr", *(f"{s.name}_accuracy" for s in sets))


def choice_suite(
    benchmark: str,
    split: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    shots: int = 0,
    forget: Any = None,
) -> Suite:
    """WMDP (split: bio,chem,cyber or all), MMLU (split: subjects, comma-separated; default the
    six WMDP-adjacent ones), or the user's own multiple-choice files (`mcq`)."""
    if benchmark == "wmdp":
        return _wmdp(split, data_dir, limit, shots)
    if benchmark == "mmlu":
        return _mmlu(split, data_dir, limit, shots)
    return _mcq(data_dir or (str(forget) if forget else None), limit, shots)
