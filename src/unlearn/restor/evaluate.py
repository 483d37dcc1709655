"""RESTOR evaluation: one model pass over the facts -> fact records -> metrics (`restor.metrics`).

Per fact, the few-shot prompt runs once (`unlearn.eval.records`): greedy decoding continues from
its KV cache to the first newline (the answer is the first line), and the probe's answers (correct,
corrupted, random same-relation) are scored off the same cache as a prefix tree. The facts of one
relation share their in-context examples, so each relation's examples run once
(`score_and_generate` runs a call's common prompt start once) and each fact adds only its
question. Records name facts as "entity/relation"; the generations stay in `records/facts.jsonl`.

Output folder (`results.json` is what `unlearn report` reads; `benchmark` is "restor"):
  results.json         metrics, skipped metrics with reasons, counts, settings, facts-file hash
  records/facts.jsonl  one record per fact: id, entity, relation, group, generation, probe values
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unlearn.config import PromptConfig
from unlearn.errors import UnlearnError
from unlearn.outputs import atomic_write_json, atomic_write_text
from unlearn.prompts import PromptFormatter
from unlearn.restor.facts import SHOTS, Fact, Facts, few_shot_prompt, shots_for
from unlearn.restor.metrics import JUDGES, Judge, score_restor

RESULTS = "results.json"
RECORDS = Path("records") / "facts.jsonl"


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
        if self.judge not in JUDGES:
            raise UnlearnError(
                f"unknown judge '{self.judge}'; choose one of {', '.join(JUDGES)} (or pass a "
                "function to the Python API)"
            )
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


def few_shot_formatter(tokenizer, max_length: int = 512) -> PromptFormatter:
    """Prompts used as given (no chat template): a base-model completion, as RESTOR asks. An answer
    is " " + text; generation stops at the newline that ends RESTOR's answer lines (or EOS, or
    max_new_tokens), so the decoder spends nothing past the first line."""
    cfg = PromptConfig(template="plain", max_length=max_length)
    return PromptFormatter(tokenizer, cfg, style="raw", stop=("\n",))


@dataclass(frozen=True)
class Groups:
    """Which entities are evaluated, and in which role."""

    target: list[str]
    untouched: list[str]

    def of(self, entity: str) -> str:
        return "target" if entity in self.target else "untouched"

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


def fact_records(
    model,
    tokenizer,
    facts: Facts,
    groups: Groups,
    corrupted: dict[str, dict[str, list[str]]],
    s: EvalSettings,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run the model once over every fact of the grouped entities -> one record per fact."""
    from tqdm.auto import tqdm

    from unlearn.eval.records import PassStats, ScoreItem, score_and_generate

    fmt = few_shot_formatter(tokenizer, s.max_length)
    todo = facts.facts_of(groups.all)
    # Facts asked with the same in-context examples form one call: their shared start runs once.
    by_prefix: dict[tuple[str, ...], list[Fact]] = {}
    for f in todo:
        key = tuple(x.question for x in shots_for(facts, f, s.shots))
        by_prefix.setdefault(key, []).append(f)
    stats = PassStats()
    out: dict[str, dict[str, Any]] = {}
    for group in tqdm(
        list(by_prefix.values()), desc="facts", unit="relation", disable=not progress
    ):
        items: list[ScoreItem] = []
        spans: list[dict[str, slice]] = []
        prompts = []
        for f in group:
            prompt = few_shot_prompt(facts, f, s.shots)
            prompts.append(prompt)
            answers = probe_answers(facts, f, corrupted.get(f.entity, {}).get(f.relation, []), s)
            span = {}
            for kind, texts in answers.items():
                span[kind] = slice(len(items), len(items) + len(texts))
                items += [ScoreItem(prompt, t) for t in texts]
            spans.append(span)
        scores, gens = score_and_generate(
            model, fmt, items, prompts, max_new_tokens=s.max_new_tokens,
            batch_size=s.batch_size, stats=stats, score_end=False,
        )  # fmt: skip
        for f, span, gen in zip(group, spans, gens, strict=True):
            probe = {
                kind: sum(sc.logprob_sum / max(sc.n_tokens, 1) for sc in scores[sl])
                / (sl.stop - sl.start)
                for kind, sl in span.items()
            }
            out[f.id] = {
                "id": f.id,
                "entity": f.entity,
                "relation": f.relation,
                "group": groups.of(f.entity),
                "answers": list(f.answers),
                "generation": gen,
                "probe": probe,
                "probe_answers": {k: sl.stop - sl.start for k, sl in span.items()},
            }
    return [out[f.id] for f in todo]


def read_records(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results.json, records) of a RESTOR evaluation folder."""
    folder = Path(folder)
    path = folder / RESULTS
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        lines = (folder / RECORDS).read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise UnlearnError(
            f"{folder} is not a complete RESTOR evaluation ({exc}); rerun `unlearn restor eval`"
        ) from None
    if results.get("benchmark") != "restor":
        raise UnlearnError(f"{folder} holds a {results.get('benchmark')} evaluation, not RESTOR")
    return results, records


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


def reusable(folder: Path, key: dict[str, Any], model_sha: str | None) -> bool:
    """A finished evaluation of the same model files with the same facts and settings."""
    try:
        results, _ = read_records(folder)
    except UnlearnError:
        return False
    return results.get("records_key") == key and results.get("model_sha256") == model_sha


def write_evaluation(
    folder: Path,
    name: str,
    model_path: str,
    model_sha: str | None,
    role: str,
    key: dict[str, Any],
    records: list[dict[str, Any]],
    clean: list[dict[str, Any]],
    corrupted: list[dict[str, Any]],
    s: EvalSettings,
    judge: Judge | None = None,
    seconds: float = 0.0,
    corrupted_source: str = "",
) -> dict[str, Any]:
    """Score and write results.json (and the records, first) atomically; return the results."""
    scored = score_restor(records, clean, corrupted, judge or JUDGES[s.judge])
    atomic_write_text(folder / RECORDS, "".join(json.dumps(r) + "\n" for r in records))
    results = {
        "benchmark": "restor",
        "name": name,
        "role": role,
        "model_path": model_path,
        "model_sha256": model_sha,
        "metrics": scored["metrics"],
        "skipped": scored["skipped"],
        "counts": scored["counts"],
        "records_key": key,
        "settings": asdict(s),
        "judge": s.judge if judge is None else getattr(judge, "__name__", "custom"),
        "corrupted_answers_source": corrupted_source,
        "seconds": round(seconds, 2),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(folder / RESULTS, results)
    return results
