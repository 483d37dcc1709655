"""RESTOR as a suite of the evaluation engine: facts asked few-shot, answers judged, logits probed.

Two sets of `probe` rows: the target entities' facts (role forget: the ones corruption aimed at)
and the untouched entities' facts (role retain). A fact is asked with RESTOR's few-shot prompt as a
raw completion (no chat template: a base-model completion, as RESTOR asks); greedy decoding stops at
the newline that ends RESTOR's answer lines, so the first line is the answer. Its probes (correct,
corrupted and random same-relation answers) are scored off the same prompt pass. The facts of one
relation share their in-context examples (`prompt_group`), so those run once per relation and set.
Scoring: the per-set metrics and `restoration` of `unlearn.metrics.restor`, with the clean and the
corrupted models' evaluations as the named comparisons "clean" and "corrupted".
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import Any

from unlearn.data import content_hash
from unlearn.errors import UnlearnError
from unlearn.eval.suites.builders import EvalSet, Suite
from unlearn.metrics.restor import judge_of
from unlearn.restor.facts import SHOTS, Fact, Facts, few_shot_prompt, shots_for

#: What a RESTOR evaluation reports first.
HEADLINE = (
    "target_accuracy",
    "target_known_restoration",
    "target_probe_restoration",
    "target_probe_corrupted",
    "untouched_accuracy_change",
)


@dataclass(frozen=True)
class EvalSettings:
    """How facts are asked and probed. Defaults: RESTOR's 5 shots; the rest sized for a CPU.

    max_new_tokens: enough for the longest answers (names of awards, institutions) before the
        newline that ends the answer. max_answers / random_answers: answers scored per fact and
        probe kind (facts with long alias lists would otherwise dominate the cost).
    """

    shots: int = SHOTS
    max_new_tokens: int = 24
    max_answers: int = 5
    random_answers: int = 3
    seed: int = 0
    batch_size: int = 32
    max_length: int = 512
    judge: str = "contains"

    def check(self) -> None:
        judge_of(self.judge)  # an unknown name: one line listing the judges
        for name in ("shots", "max_new_tokens", "max_answers", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise UnlearnError(f"restor eval setting {name} must be at least 1")
        if self.random_answers < 0:
            raise UnlearnError("restor eval setting random_answers must be at least 0")

    def record_key(self) -> dict[str, Any]:
        """What the records depend on (the judge is applied afterwards, so it is not in here)."""
        d = asdict(self)
        for k in ("judge", "batch_size"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class Groups:
    """Which entities are evaluated, and in which role."""

    target: list[str]
    untouched: list[str]

    @property
    def all(self) -> list[str]:
        return [*self.target, *self.untouched]


def _random_answers(facts: Facts, fact: Fact, avoid: set[str], k: int, seed: int) -> list[str]:
    """k same-relation answers of other entities, the same for every model (seeded per fact)."""
    pool = [a for a in facts.pool(fact.relation) if a.casefold() not in avoid]
    return random.Random(f"{seed}:{fact.id}").sample(pool, min(k, len(pool)))


def probe_answers(
    facts: Facts, fact: Fact, corrupted: list[str], s: EvalSettings
) -> dict[str, list[str]]:
    correct = list(fact.answers[: s.max_answers])
    wrong = [a for a in corrupted if a.casefold() not in {c.casefold() for c in fact.answers}]
    avoid = {a.casefold() for a in (*fact.answers, *wrong)}
    out = {"correct": correct, "corrupted": wrong[: s.max_answers]}
    out["random"] = _random_answers(facts, fact, avoid, s.random_answers, s.seed)
    return {k: v for k, v in out.items() if v}


def fact_rows(
    facts: Facts, entities: list[str], corrupted: dict[str, dict[str, list[str]]], s: EvalSettings
) -> list[dict[str, Any]]:
    """The probe rows of the entities' facts: the prompt, acceptable answers and probe answers;
    the hash covers all three, so two evaluations compare only if they asked the same."""
    rows = []
    for f in facts.facts_of(entities):
        prompt = few_shot_prompt(facts, f, s.shots)
        probes = probe_answers(facts, f, corrupted.get(f.entity, {}).get(f.relation, []), s)
        rows.append(
            {
                "id": f.id,
                "sha256": content_hash(prompt, json.dumps(list(f.answers)), json.dumps(probes)),
                "question": prompt,
                "answers": list(f.answers),
                "probes": probes,
                "prompt_group": "\n".join(x.question for x in shots_for(facts, f, s.shots)),
                "entity": f.entity,
                "relation": f.relation,
            }
        )
    return rows


def restor_suite(
    facts: Facts,
    groups: Groups,
    corrupted: dict[str, dict[str, list[str]]],
    s: EvalSettings,
    judge: Any = None,
) -> Suite:
    """The RESTOR suite of these entities (a group with no entities has no set). `judge`
    replaces the settings' named judge with the user's function (Python API)."""
    asked = {
        "kind": "probe", "prompt": "raw", "max_new_tokens": s.max_new_tokens, "stop": ("\n",),
        "score_end": False, "max_length": s.max_length, "judge": judge or s.judge,
    }  # fmt: skip
    sets = [
        EvalSet(name, role, fact_rows(facts, entities, corrupted, s), facts.source, **asked)
        for name, role, entities in (
            ("target", "forget", groups.target),
            ("untouched", "retain", groups.untouched),
        )
        if entities
    ]
    return Suite("restor", None, sets, metrics=("restoration",), headline=HEADLINE)


def records_key(facts: Facts, groups: Groups, corrupted: dict, s: EvalSettings) -> dict[str, Any]:
    """What makes two record sets comparable (and a saved one reusable)."""
    return {
        "facts_sha256": facts.sha256,
        "target": groups.target,
        "untouched": groups.untouched,
        "corrupted_answers": _digest(corrupted),
        "settings": s.record_key(),
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
