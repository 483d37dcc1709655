"""MUSE's six-way evaluation sets (Shi et al. 2024, arXiv:2407.06460), as MUSE's own code asks them.

Followed: github swj0419/muse_bench at fcd6651 (`metrics/verbmem.py`, `knowmem.py`, `privleak.py`,
`constants.py`). Per corpus (news, books):
- verbmem_forget: the data's `prompt` continued verbatim: 128 greedy tokens, ROUGE-L F1 against
  the first 128 tokens of `gt` (tokenized as MUSE does, special tokens counted, then decoded).
- knowmem_forget / knowmem_retain: 10 in-context pairs `Question: q\nAnswer: a\n\n` (the `*_icl`
  file, in order), then `Question: q\nAnswer: `; 32 greedy tokens cut at "\n\n", "\nQuestion",
  "Question:"; ROUGE-L F1 against the answer.
- privleak_forget / privleak_holdout: whole documents, Min-40% AUC of telling
  them apart; PrivLeak relative to the retrained model's AUC (a retain evaluation given as the
  "retain" comparison, else MUSE's published constant on the whole data).
MUSE cuts nothing; every set here is capped at 4,096 tokens (cut sequences are counted in the
results). Numbers are in [0, 1] (MUSE prints x100). ROUGE is unstemmed as in MUSE's code; OpenUnlearning
stems (`rouge_stem=true` to match it). Differences from OpenUnlearning: docs/metrics.md.

Data: the hub (`muse-bench/MUSE-News`, `muse-bench/MUSE-Books`) or a local folder in its layout:
knowmem/{forget_qa,forget_qa_icl,retain_qa,retain_qa_icl}.json (older releases: retain2_*),
verbmem/forget.json, privleak/{forget,holdout}.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearn.data import read_rows
from unlearn.errors import UnlearnError
from unlearn.eval.suites.builders import EvalSet, Suite, _finish

HUB = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
#: MUSE's retrained models' Min-40% AUC on forget vs holdout (`constants.py`, AUC_RETRAIN,
#: key forget_holdout_Min-40%), in MUSE's orientation (forget labelled 0).
PUBLISHED_RETRAIN_AUC = {"news": 0.4772, "books": 0.5393}
KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")
KNOWMEM_TEMPLATE = "Question: {question}\nAnswer: "
VERBMEM_TOKENS = 128
KNOWMEM_TOKENS = 32
DOCUMENT_TOKENS = 4096
HEADLINE = (
    "verbmem_forget_rouge_l_f1",
    "knowmem_forget_rouge_l_f1",
    "knowmem_retain_rouge_l_f1",
    "privleak",
)


def _rows(corpus: str, data_dir: str | None, config: str, split: str) -> tuple[list[Any], str]:
    """One MUSE split, local (`{data_dir}/{config}/{split}.json`) or from the hub."""
    if data_dir is None:
        spec = f"hub:{HUB[corpus]}:{config}:{split}"
        return read_rows(spec), spec
    path = Path(data_dir) / config / f"{split}.json"
    if not path.is_file():
        raise UnlearnError(
            f"MUSE folder {data_dir} has no {config}/{split}.json; --data-dir must be a folder "
            "in the hub's layout (knowmem/, verbmem/, privleak/)"
        )
    return read_rows(str(path)), str(path)


def _knowmem_split(data_dir: str | None, side: str) -> str:
    """`retain_qa` in the current release; a local folder of an older one has `retain2_qa`."""
    older = data_dir is not None and (Path(data_dir) / "knowmem" / "retain2_qa.json").is_file()
    return "retain2_qa" if side == "retain" and older else f"{side}_qa"


def _shots(pairs: list[dict[str, Any]], where: str) -> str:
    for i, p in enumerate(pairs):
        if not isinstance(p, dict) or "question" not in p or "answer" not in p:
            raise UnlearnError(f"{where}: row {i} needs 'question' and 'answer'")
    return "".join(f"Question: {p['question']}\nAnswer: {p['answer']}\n\n" for p in pairs)


def _documents(rows: list[Any], where: str) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rows):
        text = r.get("text") if isinstance(r, dict) else r  # the hub gives {"text"}, files strings
        if not isinstance(text, str):
            raise UnlearnError(f"{where}: row {i} must be a document (a string or {{'text'}})")
        out.append({"id": str(i), "text": text})
    return out


def muse_suite(
    corpus: str = "news",
    data_dir: str | None = None,
    limit: int | None = None,
    stem: bool | None = None,
) -> Suite:
    """MUSE's verbatim, knowledge and privacy sets for a corpus (news | books)."""
    if corpus not in HUB:
        raise UnlearnError(f"MUSE has no split '{corpus}'; choose one of {', '.join(HUB)}")
    stem = False if stem is None else stem
    sets: list[EvalSet] = []

    raw, source = _rows(corpus, data_dir, "verbmem", "forget")
    rows = []
    for i, r in enumerate(raw[:limit] if limit else raw):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or "gt" not in r:
            raise UnlearnError(f"{source}: row {i} needs text columns 'prompt' and 'gt'")
        rows.append({"id": str(i), "question": r["prompt"], "answer": r["gt"]})
    sets.append(
        EvalSet(
            "verbmem_forget", "forget", _finish(rows, source), source, prompt="raw",
            max_new_tokens=VERBMEM_TOKENS, truth_tokens=VERBMEM_TOKENS, metrics=("rouge",),
            rouge_stem=stem, max_length=DOCUMENT_TOKENS, score_end=False, moments=False,
        )
    )  # fmt: skip

    for side, role in (("forget", "forget"), ("retain", "retain")):
        split = _knowmem_split(data_dir, side)
        qa, source = _rows(corpus, data_dir, "knowmem", split)
        icl, icl_source = _rows(corpus, data_dir, "knowmem", f"{split}_icl")
        qa = qa[:limit] if limit else qa
        rows = [{"id": str(i), **r} if isinstance(r, dict) else r for i, r in enumerate(qa)]
        sets.append(
            EvalSet(
                f"knowmem_{side}", role, _finish(rows, source), source, prompt="few_shot",
                shots=_shots(icl, icl_source), template=KNOWMEM_TEMPLATE,
                max_new_tokens=KNOWMEM_TOKENS, stop=KNOWMEM_STOP, metrics=("rouge",),
                rouge_stem=stem, score_end=False, max_length=DOCUMENT_TOKENS, moments=False,
            )
        )  # fmt: skip

    for side, role, mia in (("forget", "forget", "member"), ("holdout", "holdout", "nonmember")):
        docs, source = _rows(corpus, data_dir, "privleak", side)
        docs = docs[:limit] if limit else docs
        sets.append(
            EvalSet(
                f"privleak_{side}", role, _finish(_documents(docs, source), source, "text"),
                source, kind="text", mia=mia, metrics=(), max_length=DOCUMENT_TOKENS,
                moments=False,
            )
        )  # fmt: skip
    published = PUBLISHED_RETRAIN_AUC[corpus]
    return Suite(
        "muse",
        corpus,
        sets,
        metrics=("mia", "privleak"),
        headline=HEADLINE,
        # ours is P(forget scores as member): 1 - MUSE's orientation
        retrain_auc=(
            1.0 - published,
            f"MUSE's published retrained-model AUC ({corpus}: {published})",
        ),
    )
