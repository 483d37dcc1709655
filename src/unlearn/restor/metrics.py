"""RESTOR's numbers as pure functions of fact records (see `unlearn.restor.evaluate`).

A fact record is a dict with at least `id`, `group` ("target" or "untouched"), `answers` (the
acceptable answers), `generation` (the model's first line) and `probe` ({"correct", "corrupted",
"random"}: mean per-token log-probability, each averaged over that kind's answers; a kind the fact
has no answers of is absent). Judging happens here, not when the model runs, so a different judge
re-scores saved records without running anything.

Restoration (RESTOR, Rezaei et al. 2024): (unlearned - corrupted) / (clean - corrupted), on
accuracy and on the probe's correct-answer log-probability. 1 means the clean model's value is
back, 0 means unlearning did nothing for it, below 0 means it went further from clean. It is
undefined when corruption did not move the value; that case is reported as skipped with the
values, never as a number.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from statistics import fmean
from typing import Any

Judge = Callable[[str, list[str]], bool]

# Common alternative names of frequent Wikidata answers; a generation naming any of them counts.
ALIASES: dict[str, tuple[str, ...]] = {
    "united states of america": ("united states", "usa", "us", "u s", "u s a", "america"),
    "united kingdom": ("uk", "u k", "britain", "great britain"),
    "people s republic of china": ("china", "prc"),
    "soviet union": ("ussr",),
    "kingdom of the netherlands": ("netherlands", "holland"),
    "russian empire": ("russia",),
    "german reich": ("germany",),
    "association football player": ("football player", "footballer", "soccer player"),
    "association football": ("football", "soccer"),
}


def normalize(text: str) -> str:
    """Case-folded, accents stripped, punctuation as spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "").strip()


def acceptable(answers: Iterable[str]) -> list[str]:
    """Normalized answers plus their known aliases."""
    out: dict[str, None] = {}
    for a in answers:
        n = normalize(a)
        if n:
            out[n] = None
            out.update(dict.fromkeys(ALIASES.get(n, ())))
    return list(out)


def judge_contains(generation: str, answers: list[str]) -> bool:
    """An acceptable answer (or alias) occurs, as whole words, in the normalized first line.

    Offline and strict about names: "Nesta" does not match "Robert Nesta Marley" unless listed, and
    a paraphrase ("American" for "United States of America") does not count, where an LLM judge
    as RESTOR used would accept it. Whole words keep "male" from matching "female".
    """
    line = f" {normalize(first_line(generation))} "
    return any(f" {a} " in line for a in acceptable(answers))


def judge_exact(generation: str, answers: list[str]) -> bool:
    """The normalized first line is an acceptable answer (or alias), nothing more."""
    return normalize(first_line(generation)) in acceptable(answers)


JUDGES: dict[str, Judge] = {"contains": judge_contains, "exact": judge_exact}


def judged(records: list[dict[str, Any]], judge: Judge) -> dict[str, bool]:
    return {r["id"]: bool(judge(r["generation"], r["answers"])) for r in records}


@dataclass(frozen=True)
class Accuracy:
    """How many of `n` facts were judged correct."""

    correct: int
    n: int

    @property
    def value(self) -> float | None:
        return self.correct / self.n if self.n else None


def accuracy(correct: dict[str, bool], ids: list[str]) -> Accuracy:
    return Accuracy(sum(correct[i] for i in ids), len(ids))


def probe_means(records: list[dict[str, Any]], ids: set[str]) -> dict[str, dict[str, Any]]:
    """Per probe kind, the mean over facts in `ids` that have that kind, and how many those are."""
    out = {}
    for kind in ("correct", "corrupted", "random"):
        values = [r["probe"][kind] for r in records if r["id"] in ids and kind in r["probe"]]
        out[kind] = {"mean": fmean(values) if values else None, "n": len(values)}
    return out


def restoration(
    clean: float | None, corrupted: float | None, unlearned: float | None, min_gap: float
) -> tuple[float | None, str | None]:
    """(ratio, None), or (None, why) when it is undefined."""
    if clean is None or corrupted is None or unlearned is None:
        return None, "a value it needs is missing (no facts in this subset)"
    if abs(clean - corrupted) < min_gap:
        return None, (
            f"corruption did not move it (clean {clean:.4g}, corrupted {corrupted:.4g}): "
            "nothing to restore"
        )
    return (unlearned - corrupted) / (clean - corrupted), None


def score_restor(
    records: list[dict[str, Any]],
    clean: list[dict[str, Any]],
    corrupted: list[dict[str, Any]],
    judge: Judge = judge_contains,
) -> dict[str, Any]:
    """Every RESTOR number for one model, given the clean and corrupted models' records of the same
    facts: {"metrics": {name: float}, "skipped": {name: why}, "counts": {...}}.

    Subsets: each group ("target", "untouched") on all its facts and on the facts the clean model
    answers correctly ("known"), since a fact the clean model never knew cannot be restored.
    """
    for name, other in (("clean", clean), ("corrupted", corrupted)):
        if {r["id"] for r in other} != {r["id"] for r in records}:
            raise ValueError(f"the {name} model's records cover other facts than this model's")
    mine, was, bad = judged(records, judge), judged(clean, judge), judged(corrupted, judge)
    by_id = {r["id"]: r for r in records}
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    counts: dict[str, Any] = {}
    for group in ("target", "untouched"):
        ids = [r["id"] for r in records if r["group"] == group]
        if not ids:
            continue
        known = [i for i in ids if was[i]]
        for subset, chosen in (("", ids), ("_known", known)):
            key = f"{group}{subset}"
            acc = {
                name: accuracy(c, chosen)
                for name, c in (("self", mine), ("clean", was), ("corrupted", bad))
            }
            probes = {
                name: probe_means(rs, set(chosen))
                for name, rs in (("self", records), ("clean", clean), ("corrupted", corrupted))
            }
            counts[key] = {
                "facts": len(chosen),
                "entities": len({by_id[i]["entity"] for i in chosen}),
                "correct": acc["self"].correct,
                "clean_correct": acc["clean"].correct,
                "corrupted_correct": acc["corrupted"].correct,
                "probe_facts": {k: v["n"] for k, v in probes["self"].items()},
            }
            mine_acc, clean_acc = acc["self"].value, acc["clean"].value
            if mine_acc is None or clean_acc is None:
                skipped[f"{key}_accuracy"] = "no facts in this subset"
                continue
            metrics[f"{key}_accuracy"] = mine_acc
            for kind, v in probes["self"].items():
                if v["mean"] is None:
                    skipped[f"{key}_probe_{kind}"] = f"no {kind} answers for these facts"
                else:
                    metrics[f"{key}_probe_{kind}"] = v["mean"]
            ratios = {
                f"{key}_restoration": (
                    clean_acc, acc["corrupted"].value, mine_acc,
                    1.0 / (2 * len(chosen)),  # less than one fact's worth of accuracy
                ),
                f"{key}_probe_restoration": (
                    probes["clean"]["correct"]["mean"], probes["corrupted"]["correct"]["mean"],
                    probes["self"]["correct"]["mean"], 1e-3,
                ),
            }  # fmt: skip
            if group != "target":
                ratios = {}  # corruption did not aim at these: their change from clean is the number
            for name, (c, k, u, gap) in ratios.items():
                value, why = restoration(c, k, u, gap)
                if value is None:
                    skipped[name] = why or ""
                else:
                    metrics[name] = value
            metrics[f"{key}_accuracy_change"] = mine_acc - clean_acc
    return {"metrics": metrics, "skipped": skipped, "counts": counts}
