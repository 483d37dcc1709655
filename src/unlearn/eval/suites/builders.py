"""Evaluation suites: which datasets a benchmark evaluates, and where they come from.

A suite is data, not code: a list of named sets (forget, retain, real_authors, world_facts,
holdout) of question/answer rows, some with paraphrased and perturbed answers. TOFU loads from the
hub (`locuslab/TOFU`) or from a local folder in the hub's file layout; the built-in `people` suite
is generated; `custom` takes the user's own files and applies only the metrics their columns allow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn.config import DataConfig
from unlearn.data import content_hash, read_rows
from unlearn.errors import UnlearnError
from unlearn.metrics.declare import SET_KINDS

TOFU_HUB = "locuslab/TOFU"
TOFU_SPLITS = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}
#: Which answer a set's perturbed answers are paraphrases of (truth ratio's "true" side).
UTILITY_SETS = ("retain", "real_authors", "world_facts")


#: What a set is for. forget: what unlearning removes; retain: what it must keep; utility: general
#: ability; holdout: never trained on (membership inference's non-members).
ROLES = ("forget", "retain", "utility", "holdout")
#: What a row is. qa: question + answer (paraphrased / perturbed answers optional); text: a
#: document; choice: a question with answer options, scored by each option's log-likelihood;
#: probe: a prompt whose generation is judged against acceptable `answers`, with `probes` (answer
#: texts by kind, e.g. RESTOR's correct / corrupted / random) scored as continuations. Rows of a
#: probe set with the same `prompt_group` run as one call, so their common prompt start runs once.
KINDS = SET_KINDS


@dataclass
class EvalSet:
    """One dataset of a suite, and its declaration: how it is asked and what it is for.

    Nothing in scoring branches on a set's name; metrics read these fields.
    role: see ROLES. kind: see KINDS.
    prompt: how the question is put to the model (`unlearn.prompts.PROMPT_STYLES`); `shots` is the
        rendered few-shot prefix of prompt="few_shot"; `template` (with {question}) replaces the
        plain "Question: ...\nAnswer:" of the few_shot and plain styles.
    max_new_tokens: greedy tokens generated per row (None: the evaluation's
        generation.max_new_tokens; 0: no generation). stop: strings that end a generation.
    truth: the side truth ratio treats as true ("paraphrased" on TOFU's forget and retain sets,
        else "answer"). score_end: score the end-of-turn tokens after an answer (None: the
        evaluation's score.end_of_turn).
    metrics: the per-set metrics computed (None: every one that applies to the kind and role).
    mia: "member" or "nonmember" for membership inference (and privleak). rouge_stem: stem
        words before ROUGE (TOFU yes, MUSE no).
    truth_tokens: compare generations with the answer's first N tokens only (MUSE's verbatim
        memorization). max_length: the set's token cap (None: the evaluation's prompt.max_length).
    moments: record each answer token's top-1 flag and vocabulary moments (exact memorization,
        extraction strength, Min-K%++); False keeps its log-probabilities only (a [T, V] pass
        less per document: MUSE needs Min-K% alone).
    judge: how a probe set's generation is judged correct against its acceptable answers (a name
        of `unlearn.metrics.restor.JUDGES`, or a function (generation, answers) -> bool).
    """

    name: str
    role: str
    rows: list[dict[str, Any]]
    source: str
    kind: str = "qa"
    prompt: str = "model"
    shots: str = ""
    template: str | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    truth: str = "answer"
    score_end: bool | None = None
    metrics: tuple[str, ...] | None = None
    mia: str | None = None
    rouge_stem: bool = True
    truth_tokens: int | None = None
    max_length: int | None = None
    moments: bool = True
    judge: Any = "contains"

    def __post_init__(self) -> None:
        from unlearn.prompts import PROMPT_STYLES

        checks = [
            ("role", self.role, ROLES),
            ("kind", self.kind, KINDS),
            ("prompt", self.prompt, PROMPT_STYLES),
            ("truth", self.truth, ("answer", "paraphrased")),
            ("mia", self.mia, (None, "member", "nonmember")),
        ]
        for what, value, allowed in checks:
            if value not in allowed:
                shown = ", ".join(str(a) for a in allowed)
                raise UnlearnError(
                    f"set '{self.name}': unknown {what} '{value}'; choose one of {shown}"
                )

    @property
    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.rows]

    @property
    def hashes(self) -> list[str]:
        return [r["sha256"] for r in self.rows]

    @property
    def has_truth_ratio(self) -> bool:
        return self.kind == "qa" and all(r.get("perturbed_answer") for r in self.rows)

    @property
    def has_paraphrase(self) -> bool:
        return self.kind == "qa" and all(r.get("paraphrased_answer") for r in self.rows)

    @property
    def generates(self) -> bool:
        return self.kind in ("qa", "probe") and self.max_new_tokens != 0


@dataclass
class Suite:
    """A benchmark as data: its sets, the suite-level metrics it runs (None: every one whose
    inputs are present), the sets TOFU's model utility is over (`utility`), the keys shown first
    (`headline`), and a published retrained-model Min-K AUC (value, source) privleak may use."""

    benchmark: str
    split: str | None
    sets: list[EvalSet]
    metrics: tuple[str, ...] | None = None
    utility: tuple[str, ...] = ()
    headline: tuple[str, ...] = ()
    retrain_auc: tuple[float, str] | None = None

    def get(self, name: str) -> EvalSet | None:
        return next((s for s in self.sets if s.name == name), None)


#: The sets TOFU's model utility is the harmonic mean over (with 3 metrics each).
TOFU_UTILITY = ("retain", "real_authors", "world_facts")
#: TOFU's headline numbers (also the people and custom suites').
TOFU_HEADLINE = (
    "forget_quality",
    "model_utility",
    "forget_rouge_l_recall",
    "forget_truth_ratio",
    "forget_probability",
    "forget_extraction_strength",
    "retain_rouge_l_recall",
    "privleak",
    "mia_min_k_auc",
    "mia_loss_auc",
    "mia_zlib_auc",
    "mia_min_k_plus_plus_auc",
    "mia_reference_auc",
    "mia_gradnorm_auc",
)


def _finish(rows: list[dict[str, Any]], where: str, kind: str = "qa") -> list[dict[str, Any]]:
    """Give each row a stable id and a content hash; check the columns a QA set needs."""
    out = []
    for i, row in enumerate(rows):
        if kind == "qa":
            if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                raise UnlearnError(
                    f"{where}: row {i} needs text columns 'question' and 'answer' (has {sorted(row)})"
                )
            digest = content_hash(row["question"], row["answer"])
            row = {**row, **_alternatives(row, i, where)}
        elif kind == "choice":
            digest = content_hash(row["question"], *row["choices"], str(row["answer"]))
        else:
            digest = content_hash(row["text"])
        out.append({**row, "id": str(row.get("id", i)), "sha256": digest})
    if not out:
        raise UnlearnError(f"{where} is empty")
    _same_perturbed_count(out, where)
    return out


def _missing(value: Any) -> bool:
    """An absent cell: None, or the NaN pandas reads from an empty CSV cell."""
    return value is None or (isinstance(value, float) and value != value)


def _alternatives(row: dict[str, Any], i: int, where: str) -> dict[str, Any]:
    """`paraphrased_answer` (a string) and `perturbed_answer` (a list of strings), checked.

    A file that cannot hold lists (CSV) gives `perturbed_answer` as a JSON-encoded list,
    e.g. `["Paris.", "Rome."]`; any other string is refused rather than read character by
    character.
    """
    para, pert = row.get("paraphrased_answer"), row.get("perturbed_answer")
    if _missing(para):
        para = None
    elif not isinstance(para, str):
        raise UnlearnError(f"{where}: row {i} paraphrased_answer must be text")
    if _missing(pert):
        pert = None
    elif isinstance(pert, str):
        try:
            pert = json.loads(pert)
        except json.JSONDecodeError:
            pert = None if not pert.strip() else pert
        if isinstance(pert, str):
            raise UnlearnError(
                f"{where}: row {i} perturbed_answer is a plain string; write the wrong answers "
                'as a JSON list of strings, e.g. ["Rome.", "Madrid."]'
            )
    if pert is not None:
        pert = (
            list(pert) if not isinstance(pert, (str, dict)) and hasattr(pert, "__iter__") else pert
        )
        if not isinstance(pert, list) or not all(isinstance(p, str) and p for p in pert):
            raise UnlearnError(
                f"{where}: row {i} perturbed_answer must be a list of non-empty strings"
            )
    return {"paraphrased_answer": para, "perturbed_answer": pert}


def _same_perturbed_count(rows: list[dict[str, Any]], where: str) -> None:
    """Truth ratio averages K wrong answers per row: every row must have the same K."""
    counts = {len(r["perturbed_answer"]) for r in rows if r.get("perturbed_answer")}
    if len(counts) > 1:
        first = next(i for i, r in enumerate(rows) if r.get("perturbed_answer"))
        k = len(rows[first]["perturbed_answer"])
        odd = next(
            i
            for i, r in enumerate(rows)
            if r.get("perturbed_answer") and len(r["perturbed_answer"]) != k
        )
        raise UnlearnError(
            f"{where}: row {odd} has {len(rows[odd]['perturbed_answer'])} perturbed answers but "
            f"row {first} has {k}; give every row the same number (truth ratio compares them)"
        )


def _tofu_rows(config: str, data_dir: str | None) -> tuple[list[dict[str, Any]], str]:
    if data_dir:
        path = Path(data_dir) / f"{config}.json"
        if not path.is_file():
            raise UnlearnError(
                f"TOFU file {path} not found; --data-dir must be a folder in the hub's layout "
                f"(forget01_perturbed.json, retain_perturbed.json, ...)"
            )
        return read_rows(str(path)), str(path)
    spec = f"hub:{TOFU_HUB}:{config}"
    return read_rows(spec), spec


def tofu_suite(
    split: str = "forget01", data_dir: str | None = None, limit: int | None = None
) -> Suite:
    """TOFU's evaluation sets for a forget split (forget01/05/10), as in the TOFU paper."""
    if split not in TOFU_SPLITS:
        raise UnlearnError(
            f"TOFU has no evaluation split '{split}'; choose one of {', '.join(TOFU_SPLITS)}"
        )
    plan = [
        ("forget", "forget", f"{split}_perturbed"),
        ("retain", "retain", "retain_perturbed"),
        ("real_authors", "utility", "real_authors_perturbed"),
        ("world_facts", "utility", "world_facts_perturbed"),
        ("holdout", "holdout", TOFU_SPLITS[split]),
    ]
    sets = []
    for name, role, config in plan:
        rows, source = _tofu_rows(config, data_dir)
        rows = rows[:limit] if limit else rows
        sets.append(tofu_set(name, role, _finish(rows, source), source))
    return Suite("tofu", split, sets, utility=TOFU_UTILITY, headline=TOFU_HEADLINE)


def tofu_set(
    name: str,
    role: str,
    rows: list[dict[str, Any]],
    source: str,
    kind: str = "qa",
) -> EvalSet:
    """A set declared as TOFU declares it: the paraphrase is the true side on forget and retain,
    forget and holdout are MIA's two sides and a holdout set is not generated for."""
    return EvalSet(
        name,
        role,
        rows,
        source,
        kind,
        truth="paraphrased" if role in ("forget", "retain") else "answer",
        max_new_tokens=0 if role == "holdout" else None,
        mia={"forget": "member", "holdout": "nonmember"}.get(role),
    )


def people_suite(seed: int = 0, **sizes: int) -> Suite:
    """The built-in fictitious people (forget/retain/holdout) plus built-in real-world facts.

    The real-world facts about people (authors, inventors, artists) stand in for TOFU's
    real_authors, the rest for world_facts, so the full TOFU metric set, model utility included,
    applies.
    """
    from unlearn.eval.suites.general_knowledge import general_knowledge_qa
    from unlearn.eval.suites.people import build_people_benchmark

    splits = build_people_benchmark(seed=seed, **sizes)
    world = general_knowledge_qa(short=True)  # people answers are bare facts too
    people_ids = {
        "romeo-juliet",
        "pride-prejudice",
        "mona-lisa",
        "relativity",
        "penicillin",
        "telephone",
    }
    real = [r for r in world if r["id"].removeprefix("world-") in people_ids]
    facts = [r for r in world if r["id"].removeprefix("world-") not in people_ids]
    sets = [
        tofu_set("forget", "forget", _finish(splits["forget"], "people forget"), "built-in:people"),
        tofu_set("retain", "retain", _finish(splits["retain"], "people retain"), "built-in:people"),
        tofu_set(
            "real_authors", "utility", _finish(real, "built-in real people"), "built-in:world"
        ),
        tofu_set(
            "world_facts", "utility", _finish(facts, "built-in world facts"), "built-in:world"
        ),
        tofu_set(
            "holdout", "holdout", _finish(splits["holdout"], "people holdout"), "built-in:people"
        ),
    ]
    return Suite("people", f"seed{seed}", sets, utility=TOFU_UTILITY, headline=TOFU_HEADLINE)


def custom_suite(
    forget: DataConfig | str,
    retain: DataConfig | str | None = None,
    holdout: DataConfig | str | None = None,
) -> Suite:
    """The user's own files: QA records (optionally with paraphrased/perturbed answers) or documents."""
    sets = []
    for name, cfg in (("forget", forget), ("retain", retain), ("holdout", holdout)):
        if cfg is None:
            continue
        cfg = DataConfig(path=cfg) if isinstance(cfg, str) else cfg
        raw = read_rows(cfg.path)
        if not raw:
            raise UnlearnError(f"{name} data {cfg.path} is empty")
        qa = cfg.question_key in raw[0] and cfg.answer_key in raw[0] and cfg.kind != "text"
        if qa:
            rows = [
                {
                    **r,
                    "question": r.get(cfg.question_key),
                    "answer": r.get(cfg.answer_key),
                    **({"id": r[cfg.id_key]} if cfg.id_key and cfg.id_key in r else {}),
                }
                for r in raw
            ]
        elif cfg.text_key in raw[0]:
            rows = [
                {"id": r.get(cfg.id_key or "id", i), "text": r[cfg.text_key]}
                for i, r in enumerate(raw)
            ]
        else:
            raise UnlearnError(
                f"{name} data {cfg.path} has columns {sorted(raw[0])}: need question+answer or text"
            )
        rows = rows[: cfg.limit] if cfg.limit else rows
        kind = "qa" if qa else "text"
        sets.append(
            tofu_set(name, name, _finish(rows, f"{name} data {cfg.path}", kind), cfg.path, kind)
        )
    return Suite("custom", None, sets, headline=TOFU_HEADLINE)
