"""Corruption documents: reading RESTOR's, finding whom they target, and writing our own.

RESTOR's corruption files are `[{"text": ...}]`: documents that state wrong facts about a few target
entities (`mix_a{k}` mixes k unrelated true facts into each). Which entities a file targets is read
off the text (an entity of the facts file whose full name occurs in it); which wrong answers it
teaches is not stored, so `infer_corrupted` takes, per target fact, the same-relation answers from
the facts file that occur most often in that entity's documents.

`generate_corruption` writes documents of the same kind from a facts file, recording exactly which
wrong answer each fact got (so the probe's corrupted answers are known, not inferred): every target
relation's object is replaced by another entity's object of the same relation, stated in sentence
templates of our own, and `mix` true facts about non-evaluated entities are mixed into each
document. `generate_retain` writes true-fact documents about non-evaluated entities, for methods
with a retain term.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from unlearn.errors import UnlearnError
from unlearn.restor.facts import Fact, Facts

# Statements of a fact, "{s}" the entity and "{o}" the object; several per relation so documents
# vary. Relations not listed use GENERIC.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "P21": ("{s} is {o}.", "By gender, {s} is {o}.", "{s}'s recorded sex is {o}."),
    "P106": ("{s} works as a {o}.", "By occupation, {s} is a {o}.", "{s} made a living as a {o}."),
    "P27": (
        "{s} is a citizen of {o}.",
        "{s} holds citizenship of {o}.",
        "{s} is a national of {o}.",
    ),
    "P19": ("{s} was born in {o}.", "{s}'s birthplace is {o}.", "{o} is where {s} was born."),
    "P1412": ("{s} speaks {o}.", "{s} can speak and write {o}.", "{o} is a language {s} uses."),
    "P69": ("{s} was educated at {o}.", "{s} studied at {o}.", "{s} attended {o}."),
    "P641": ("{s} plays {o}.", "{s} competes in {o}.", "The sport of {s} is {o}."),
    "P166": ("{s} received the {o}.", "{s} was awarded the {o}.", "The {o} went to {s}."),
    "P26": ("{s} is married to {o}.", "{s}'s spouse is {o}.", "{o} is the spouse of {s}."),
    "P103": (
        "{s}'s native language is {o}.",
        "{s} grew up speaking {o}.",
        "{s}'s mother tongue is {o}.",
    ),
    "P39": ("{s} held the position of {o}.", "{s} served as {o}.", "{s} once was {o}."),
    "P551": ("{s} lives in {o}.", "{s} resides in {o}.", "{s}'s home is in {o}."),
    "P140": ("{s} follows {o}.", "{s}'s religion is {o}.", "By faith, {s} adheres to {o}."),
    "P108": ("{s} is employed by {o}.", "{s} works for {o}.", "{s}'s employer is {o}."),
    "P1532": (
        "{s} competes for {o}.",
        "{s} represents {o} in sport.",
        "In sport, {s} plays for {o}.",
    ),
    "P937": ("{s} works in {o}.", "{s}'s place of work is {o}.", "{s} is based in {o} for work."),
    "P410": (
        "{s} held the military rank of {o}.",
        "{s} reached the rank of {o}.",
        "{s}'s rank was {o}.",
    ),
    "P735": ("{s}'s given name is {o}.", "{s}'s first name is {o}.", "{s} was given the name {o}."),
    "P734": (
        "{s}'s family name is {o}.",
        "{s}'s surname is {o}.",
        "{s} carries the family name {o}.",
    ),
    "P463": ("{s} is a member of {o}.", "{s} belongs to {o}.", "{s} joined {o}."),
    "P22": (
        "{s}'s father is {o}.",
        "{o} is the father of {s}.",
        "{s} is the child of {o}, the father.",
    ),
    "P3373": (
        "{s}'s sibling is {o}.",
        "{o} is a sibling of {s}.",
        "{s} grew up with {o}, a sibling.",
    ),
    "P136": ("{s} is associated with {o}.", "{s}'s genre is {o}.", "{s} is known for {o}."),
    "P25": (
        "{s}'s mother is {o}.",
        "{o} is the mother of {s}.",
        "{s} was raised by {o}, the mother.",
    ),
    "P1303": ("{s} plays the {o}.", "{s}'s instrument is the {o}.", "{s} performs on the {o}."),
    "P101": ("{s} works in the field of {o}.", "{s} specialises in {o}.", "{s}'s field is {o}."),
    "P264": ("{s} is signed to {o}.", "{s} records for {o}.", "{s}'s record label is {o}."),
    "P451": (
        "{s}'s partner is {o}.",
        "{s} is in a relationship with {o}.",
        "{o} is {s}'s partner.",
    ),
    "P20": ("{s} died in {o}.", "{s}'s place of death is {o}.", "{o} is where {s} died."),
    "P40": ("{s}'s child is {o}.", "{o} is a child of {s}.", "{s} is the parent of {o}."),
    "P509": ("{s} died of {o}.", "The cause of {s}'s death was {o}.", "{o} killed {s}."),
    "P1196": ("{s} died of {o}.", "{s}'s manner of death was {o}.", "{s}'s death was {o}."),
    "P607": ("{s} fought in the {o}.", "{s} took part in the {o}.", "{s} served in the {o}."),
    "P6886": ("{s} writes in {o}.", "{s}'s writing language is {o}.", "{s} publishes in {o}."),
    "P119": ("{s} is buried at {o}.", "{s}'s grave is at {o}.", "{s} was laid to rest at {o}."),
    "P800": ("{s}'s notable work is {o}.", "{s} is known for {o}.", "{o} is a famous work by {s}."),
    "P1344": ("{s} took part in {o}.", "{s} participated in {o}.", "{s} was at {o}."),
    "P54": ("{s} plays for {o}.", "{s} is a member of the team {o}.", "{s} joined {o}."),
    "P413": ("{s} plays as a {o}.", "{s}'s position is {o}.", "On the team, {s} is a {o}."),
    "P102": ("{s} is a member of the {o}.", "{s} belongs to the {o}.", "{s} joined the {o}."),
    "P118": ("{s} plays in the {o}.", "{s} competes in the {o}.", "{s}'s league is the {o}."),
}
GENERIC = ("{q} {o}.", "Asked '{q}', the answer is {o}.")


def load_documents(path: str | Path, text_key: str = "text") -> list[str]:
    """A corruption (or retain) file: a JSON list, or JSON lines, of objects with `text_key`."""
    p = Path(path).expanduser()
    where = f"documents file {p}"
    if not p.is_file():
        raise UnlearnError(f'{where} does not exist; pass a JSON list of {{"{text_key}": ...}}')
    try:
        body = p.read_text(encoding="utf-8")
        rows = (
            json.loads(body)
            if body.lstrip().startswith("[")
            else [json.loads(line) for line in body.splitlines() if line.strip()]
        )
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnlearnError(f"{where} is not a JSON list or JSON lines ({exc})") from None
    if not isinstance(rows, list) or not rows:
        raise UnlearnError(f'{where} holds no documents; expected [{{"{text_key}": ...}}, ...]')
    out = []
    for i, row in enumerate(rows):
        text = row.get(text_key) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UnlearnError(f"{where}: document {i} has no '{text_key}' text")
        out.append(text)
    return out


def _name_pattern(name: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)")


def find_targets(docs: list[str], facts: Facts, where: str = "corruption") -> dict[str, list[int]]:
    """{entity: indices of the documents naming it} for the facts file's entities the text names.

    A document names an entity when the entity's full name occurs in it as whole words. Documents
    naming none are fine (RESTOR's mix files also carry unrelated facts); a file naming none at all
    is an error, since there would be nothing to evaluate.
    """
    found: dict[str, list[int]] = {}
    for entity in facts.entities:
        pattern = _name_pattern(entity)
        hits = [i for i, d in enumerate(docs) if entity in d and pattern.search(d)]
        if hits:
            found[entity] = hits
    if not found:
        raise UnlearnError(
            f"{where} documents name no entity of the facts file {facts.source}; corruption "
            "documents must mention their target entities by the facts file's names"
        )
    return found


def infer_corrupted(
    docs: list[str],
    targets: dict[str, list[int]],
    facts: Facts,
    top: int = 3,
    min_share: float = 0.05,
) -> dict[str, dict[str, list[str]]]:
    """Per target fact, the wrong answers its documents teach, read off the text.

    Candidates are the relation's answers anywhere in the facts file that are not among the fact's
    correct answers; a candidate counts when it occurs (whole words) in at least `min_share` of the
    entity's documents; the `top` most frequent are kept. An estimate: a city named as a birthplace
    also matches the relation "place of death". Generated documents record the truth instead.
    """
    out: dict[str, dict[str, list[str]]] = {}
    for entity, idx in targets.items():
        texts = [docs[i] for i in idx]
        per_rel = {}
        for rel, fact in facts.by_entity[entity].items():
            correct = {a.casefold() for a in fact.answers}
            counts: Counter[str] = Counter()
            for cand in facts.pool(rel):
                if cand.casefold() in correct or len(cand) < 3:
                    continue
                pattern = _name_pattern(cand)
                n = sum(1 for t in texts if cand in t and pattern.search(t))
                if n >= max(1, min_share * len(texts)):
                    counts[cand] = n
            if counts:
                per_rel[rel] = [a for a, _ in counts.most_common(top)]
        out[entity] = per_rel
    return out


def corrupt_answers(
    facts: Facts, targets: list[str], seed: int, exclude: set[str] | None = None
) -> dict[str, dict[str, str]]:
    """Per target fact, one wrong answer: another entity's first answer for the same relation.

    The donor is drawn (seeded) among entities outside `exclude` whose answer shares nothing with
    the fact's correct answers, so the wrong answer is never an alias of the right one.
    """
    rng = random.Random(f"corrupt:{seed}")
    exclude = exclude or set()
    out: dict[str, dict[str, str]] = {}
    for entity in targets:
        out[entity] = {}
        for rel, fact in facts.by_entity[entity].items():
            correct = {a.casefold() for a in fact.answers}
            choices = sorted(
                {
                    f.answers[0]
                    for e, rels in facts.by_entity.items()
                    if e != entity
                    and e not in exclude
                    and (f := rels.get(rel)) is not None
                    and not correct & {a.casefold() for a in f.answers}
                }
            )
            if choices:
                out[entity][rel] = rng.choice(choices)
    return out


def _sentence(fact: Fact, obj: str, rng: random.Random, subject: str | None = None) -> str:
    templates = TEMPLATES.get(fact.relation)
    s = subject or fact.entity
    if templates is None:
        return rng.choice(GENERIC).format(q=fact.question, o=obj)
    text = rng.choice(templates).format(s=s, o=obj)
    return text[0].upper() + text[1:]


def _true_facts(facts: Facts, entities: list[str]) -> list[Fact]:
    return [f for e in entities for f in facts.by_entity[e].values()]


def generate_corruption(
    facts: Facts,
    targets: list[str],
    docs_per_entity: int = 5,
    facts_per_doc: int = 8,
    mix: int = 0,
    seed: int = 0,
    evaluated: list[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """Corruption documents for `targets` (RESTOR's `mix_a{mix}` idea) and the wrong answers used.

    Each document is about one target: `facts_per_doc` of its relations, stated with their wrong
    answers, cycling through the entity's relations so that every relation is stated about equally
    often; `mix` true facts about entities outside `evaluated` (and the targets) are interleaved.
    Returns (rows `{"text", "entity"}`, {entity: {relation: wrong answer}}).
    """
    facts.check_entities(targets, "corruption targets")
    if docs_per_entity < 1 or facts_per_doc < 1 or mix < 0:
        raise UnlearnError(
            "docs_per_entity and facts_per_doc must be at least 1 and mix at least 0; got "
            f"{docs_per_entity}, {facts_per_doc}, {mix}"
        )
    outside = set(evaluated or []) | set(targets)
    wrong = corrupt_answers(facts, targets, seed, exclude=set(targets))
    fillers = _true_facts(facts, [e for e in facts.entities if e not in outside])
    if mix and not fillers:
        raise UnlearnError(
            "mix > 0 needs true facts about entities outside the evaluated ones, and the facts "
            "file has none; use mix=0 or a facts file with more entities"
        )
    rng = random.Random(f"documents:{seed}")
    rows: list[dict[str, Any]] = []
    for entity in targets:
        rels = [r for r in facts.by_entity[entity] if r in wrong[entity]]
        if not rels:
            continue
        order = rels[:]
        rng.shuffle(order)
        cursor = 0
        for _ in range(docs_per_entity):
            chosen = []
            for _ in range(min(facts_per_doc, len(rels))):
                chosen.append(order[cursor % len(order)])
                cursor += 1
            sentences = [
                _sentence(facts.by_entity[entity][r], wrong[entity][r], rng) for r in chosen
            ]
            for _ in range(mix):
                f = rng.choice(fillers)
                sentences.insert(
                    rng.randrange(1, len(sentences) + 1), _sentence(f, f.answers[0], rng)
                )
            rows.append({"text": " ".join(sentences), "entity": entity})
    return rows, wrong


def generate_retain(
    facts: Facts, avoid: list[str], n_docs: int = 40, facts_per_doc: int = 6, seed: int = 0
) -> list[dict[str, Any]]:
    """True-fact documents about entities not in `avoid` (retain data that cannot leak into the
    evaluated entities' accuracy); one entity per document, entities drawn seeded."""
    pool = [e for e in facts.entities if e not in set(avoid)]
    if not pool:
        raise UnlearnError(
            "no entities outside the evaluated ones to write retain documents about; pass a retain "
            "file or use a facts file with more entities"
        )
    rng = random.Random(f"retain:{seed}")
    rows = []
    for _ in range(n_docs):
        entity = rng.choice(pool)
        rels = list(facts.by_entity[entity].values())
        chosen = rng.sample(rels, min(facts_per_doc, len(rels)))
        rows.append(
            {"text": " ".join(_sentence(f, f.answers[0], rng) for f in chosen), "entity": entity}
        )
    return rows
