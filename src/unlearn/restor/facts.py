"""RESTOR's facts file, and the few-shot prompt each fact is asked with.

The format is RESTOR's (Rezaei et al., 2024, github k1rezaei/restor):

    {"dset":    {entity: {relation_id: {"question": str, "answers": [str, ...]}}},
     "context": {relation_id: [{"question": str, "answer": str, "entity": str}, ...]}}

`dset` holds the facts that are evaluated (every acceptable answer, aliases included); `context`
holds, per relation, in-context examples about other entities. A fact is asked as RESTOR asks it:
`shots` lines `"{question} {answer}"` of the same relation about entities other than the one asked
about, then the question; the model's first generated line is its answer.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.errors import UnlearnError

SHOTS = 5  # RESTOR's prompt


@dataclass(frozen=True)
class Fact:
    """One (entity, relation) question with every acceptable answer."""

    entity: str
    relation: str
    question: str
    answers: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.entity}/{self.relation}"


@dataclass(frozen=True)
class Shot:
    question: str
    answer: str
    entity: str


@dataclass
class Facts:
    """A loaded facts file: facts by entity then relation, and in-context shots by relation."""

    by_entity: dict[str, dict[str, Fact]]
    context: dict[str, list[Shot]]
    source: str = ""
    sha256: str = ""
    _pools: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @property
    def entities(self) -> list[str]:
        return list(self.by_entity)

    def facts_of(self, entities: list[str]) -> list[Fact]:
        return [f for e in entities for f in self.by_entity[e].values()]

    def pool(self, relation: str) -> list[str]:
        """Every answer any entity has for `relation`, first-seen order (the random-answer pool)."""
        if relation not in self._pools:
            seen: dict[str, None] = {}
            for rels in self.by_entity.values():
                if relation in rels:
                    seen.update(dict.fromkeys(rels[relation].answers))
            for shot in self.context.get(relation, []):
                seen.setdefault(shot.answer, None)
            self._pools[relation] = list(seen)
        return self._pools[relation]

    def check_entities(self, names: list[str], where: str) -> None:
        """One line naming the first entity the facts file does not have."""
        missing = [n for n in names if n not in self.by_entity]
        if missing:
            close = [e for e in self.by_entity if e.casefold() == missing[0].casefold()]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UnlearnError(
                f"{where}: entity '{missing[0]}' is not in the facts file {self.source}{hint}"
                f"{f' ({len(missing)} missing in all)' if len(missing) > 1 else ''}; "
                "use names exactly as the facts file's 'dset' keys spell them"
            )


def _fail(path: str, what: str) -> UnlearnError:
    return UnlearnError(
        f"facts file {path}: {what}; expected RESTOR's format "
        '{"dset": {entity: {relation: {"question", "answers"}}}, "context": {relation: '
        '[{"question", "answer", "entity"}]}}'
    )


def load_facts(path: str | Path) -> Facts:
    """Read and check a facts file; every problem is one line naming the entry and the fix."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UnlearnError(f"facts file {p} does not exist; pass --facts FILE (RESTOR's format)")
    raw_bytes = p.read_bytes()
    try:
        raw = json.loads(raw_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnlearnError(f"facts file {p} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("dset"), dict):
        raise _fail(str(p), "no 'dset' object")
    if not isinstance(raw.get("context"), dict):
        raise _fail(str(p), "no 'context' object (the in-context examples per relation)")
    by_entity: dict[str, dict[str, Fact]] = {}
    for entity, rels in raw["dset"].items():
        if not isinstance(rels, dict):
            raise _fail(str(p), f"dset['{entity}'] is not an object of relations")
        if not rels:
            continue  # RESTOR's file lists a few entities with no facts: nothing to ask about them
        facts = {}
        for rel, entry in rels.items():
            where = f"dset['{entity}']['{rel}']"
            if not isinstance(entry, dict):
                raise _fail(str(p), f"{where} is not an object")
            q, answers = entry.get("question"), entry.get("answers")
            if not isinstance(q, str) or not q.strip():
                raise _fail(str(p), f"{where} has no 'question' text")
            if (
                not isinstance(answers, list)
                or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)
            ):
                raise _fail(str(p), f"{where} has no 'answers' list of non-empty strings")
            facts[rel] = Fact(entity, rel, q.strip(), tuple(a.strip() for a in answers))
        by_entity[entity] = facts
    context: dict[str, list[Shot]] = {}
    for rel, shots in raw["context"].items():
        if not isinstance(shots, list):
            raise _fail(str(p), f"context['{rel}'] is not a list")
        out = []
        for i, s in enumerate(shots):
            if not isinstance(s, dict) or not all(
                isinstance(s.get(k), str) and s[k].strip() for k in ("question", "answer", "entity")
            ):
                raise _fail(str(p), f"context['{rel}'][{i}] needs 'question', 'answer', 'entity'")
            out.append(Shot(s["question"].strip(), s["answer"].strip(), s["entity"]))
        context[rel] = out
    return Facts(by_entity, context, str(p), hashlib.sha256(raw_bytes).hexdigest())


def shots_for(facts: Facts, fact: Fact, shots: int = SHOTS) -> list[Shot]:
    """The first `shots` in-context examples of the fact's relation about other entities.

    Fixed (not sampled) so every fact of a relation shares one prompt prefix, which the evaluation
    runs once per relation. Too few examples in `context` is an error: a prompt with fewer shots
    than asked would silently change what is measured.
    """
    chosen = [s for s in facts.context.get(fact.relation, []) if s.entity != fact.entity][:shots]
    if len(chosen) < shots:
        raise UnlearnError(
            f"facts file {facts.source}: relation {fact.relation} has {len(chosen)} in-context "
            f"examples about entities other than '{fact.entity}', fewer than shots={shots}; add "
            "examples to its 'context' or lower shots"
        )
    return chosen


def few_shot_prompt(facts: Facts, fact: Fact, shots: int = SHOTS) -> str:
    """RESTOR's prompt: `shots` "question answer" lines, then the question (no trailing space)."""
    lines = [f"{s.question} {s.answer}\n" for s in shots_for(facts, fact, shots)]
    return "".join(lines) + fact.question


def sample_entities(candidates: list[str], n: int | None, seed: int) -> list[str]:
    """`n` of `candidates` (all when n is None or larger), seeded, in the candidates' order."""
    if n is None or n >= len(candidates):
        return list(candidates)
    keep = set(random.Random(seed).sample(candidates, n))
    return [c for c in candidates if c in keep]
