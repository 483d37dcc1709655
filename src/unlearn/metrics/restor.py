"""RESTOR's numbers as pure functions of fact records (the suite: `unlearn.eval.suites.restor`).

A fact record (a row of a `probe` set) holds `answers` (the acceptable answers), `generation` (the
model's first line) and `probe` ({"correct", "corrupted", "random"}: mean per-token log-probability,
each averaged over that kind's answers; a kind the fact has no answers of is absent). Judging
happens here, not when the model runs, so a different judge re-scores saved records without running
anything.

Restoration (RESTOR, Rezaei et al. 2024): (unlearned - corrupted) / (clean - corrupted), on
accuracy and on the probe's correct-answer log-probability. 1 means the clean model's value is
back, 0 means unlearning did nothing for it, below 0 means it went further from clean. It is
undefined when corruption did not move the value; that case is reported as skipped with the
values, never as a number.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from unlearn.errors import UnlearnError
from unlearn.metrics.declare import (
    Computed,
    Record,
    SetData,
    SetMetric,
    SuiteData,
    SuiteMetric,
    mean,
)

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


def judge_of(judge: str | Judge) -> Judge:
    """A judge by name ("contains", "exact"), or the user's own function."""
    if callable(judge):
        return judge
    if judge not in JUDGES:
        raise UnlearnError(
            f"unknown judge '{judge}'; choose one of {', '.join(JUDGES)} (or pass a function to "
            "the Python API)"
        )
    return JUDGES[judge]


def judged(records: Sequence[Record], judge: Judge) -> np.ndarray:
    """1.0 where the generation is judged correct, else 0.0, per record."""
    return np.array([float(bool(judge(r["generation"], list(r["answers"])))) for r in records])


PROBE_KINDS = ("correct", "corrupted", "random")
PROBES = frozenset(f"probe.{k}" for k in PROBE_KINDS)


def probe_values(records: Sequence[Record], kind: str) -> np.ndarray:
    """Each fact's probe value of `kind`; NaN where the fact has no answers of that kind."""
    return np.array([float(r["probe"].get(kind, np.nan)) for r in records], dtype=np.float64)


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


def _nanmean(values: np.ndarray) -> float | None:
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def score_restor(
    records: Sequence[Record],
    clean: Sequence[Record],
    corrupted: Sequence[Record],
    judge: Judge = judge_contains,
    name: str = "target",
    restore: bool = True,
) -> Computed:
    """RESTOR's numbers for one set of facts (`name`), given the clean and corrupted models'
    records of the same facts, in the same order: ({key: value}, {key: why skipped}).

    Keys: `{name}_known_*` (accuracy, its counts and the probe means over the facts the clean
    model answers correctly: a fact it never knew cannot be restored), `{name}_accuracy_change`
    and `{name}_known_accuracy_change` (this model minus the clean one), and with `restore` (the
    corrupted facts; untouched ones were not aimed at, so their change from clean is the number)
    restoration = (this - corrupted) / (clean - corrupted) on accuracy and on the correct-answer
    probe, over all facts and over the known ones. 1 means the clean model's value is back, 0 that
    unlearning did nothing for it, below 0 that it went further from clean."""
    for which, other in (("clean", clean), ("corrupted", corrupted)):
        if len(other) != len(records):  # which facts: checked with the comparison's ids/hashes
            raise ValueError(f"the {which} model's records cover other facts than this model's")
    acc = {w: judged(rs, judge) for w, rs in (("self", records), ("clean", clean),
                                                  ("corrupted", corrupted))}  # fmt: skip
    probes = {
        w: {k: probe_values(rs, k) for k in PROBE_KINDS}
        for w, rs in (("self", records), ("clean", clean), ("corrupted", corrupted))
    }
    known = acc["clean"] > 0.5
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for subset, chosen in (("", np.ones(len(records), dtype=bool)), ("_known", known)):
        key = f"{name}{subset}"
        n = int(chosen.sum())
        if subset:
            metrics[f"{key}_facts"] = float(n)
            metrics[f"{key}_correct"] = float(acc["self"][chosen].sum())
        if n == 0:
            skipped[f"{key}_accuracy"] = "no facts in this subset"
            continue
        mine, was, bad = (float(acc[w][chosen].mean()) for w in ("self", "clean", "corrupted"))
        if subset:
            metrics[f"{key}_accuracy"] = mine
            for kind in PROBE_KINDS:
                value = _nanmean(probes["self"][kind][chosen])
                if value is None:
                    skipped[f"{key}_probe_{kind}"] = f"no {kind} answers for these facts"
                else:
                    metrics[f"{key}_probe_{kind}"] = value
        metrics[f"{key}_accuracy_change"] = mine - was
        if not restore:
            continue
        c, k, u = (_nanmean(probes[w]["correct"][chosen]) for w in ("clean", "corrupted", "self"))
        ratios: dict[str, tuple[float | None, float | None, float | None, float]] = {
            f"{key}_restoration": (was, bad, mine, 1.0 / (2 * n)),  # under one fact's worth
            f"{key}_probe_restoration": (c, k, u, 1e-3),
        }
        for ratio, (c, k, u, gap) in ratios.items():
            value, why = restoration(c, k, u, gap)
            if value is None:
                skipped[ratio] = why or ""
            else:
                metrics[ratio] = value
    return metrics, skipped


# ---------------------------------------------------------------------------- declarations
def _judged(d: SetData) -> dict[str, np.ndarray]:
    return {"accuracy": judged(d.records, judge_of(d.judge))}


def _counts(d: SetData) -> dict[str, np.ndarray]:
    right = judged(d.records, judge_of(d.judge))
    return {"correct": right, "facts": np.ones_like(right)}


def _probe(d: SetData) -> dict[str, np.ndarray]:
    return {f"probe_{k}": probe_values(d.records, k) for k in PROBE_KINDS}


def _sum(values: np.ndarray, _data: SetData | None = None) -> float:
    return float(np.sum(values))


def _restoration(data: SuiteData) -> Computed:
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for d in (d for d in data.sets.values() if d.kind == "probe"):
        clean, corrupted = (data.comparisons[w][d.name] for w in ("clean", "corrupted"))
        m, s = score_restor(
            d.records, clean, corrupted, judge_of(d.judge), d.name, restore=d.role == "forget"
        )
        metrics.update(m)
        skipped.update(s)
    return metrics, skipped


JUDGED = frozenset({"generation", "answers"})
RESTOR_ACCURACY = SetMetric(
    "judged_accuracy", _judged, mean,
    "mean (the generation's first line judged correct against the acceptable answers by the "
    "set's judge)", JUDGED, keys=("accuracy",), kinds=("probe",),
)  # fmt: skip
RESTOR_COUNTS = SetMetric(
    "judged_counts", _counts, _sum, "sum (correct answers; facts)", JUDGED,
    keys=("correct", "facts"), kinds=("probe",),
)  # fmt: skip
PROBE = SetMetric(
    "probe", _probe, mean,
    "mean over the facts that have answers of that kind (each fact: the mean per-token "
    "log-probability of its answers of that kind)", PROBES,
    keys=tuple(f"probe_{k}" for k in PROBE_KINDS), kinds=("probe",),
)  # fmt: skip
RESTORATION = SuiteMetric(
    "restoration", _restoration,
    ("{set}_restoration", "{set}_known_restoration", "{set}_probe_restoration",
     "{set}_known_probe_restoration", "{set}_accuracy_change", "{set}_known_accuracy_change",
     "{set}_known_accuracy", "{set}_known_correct", "{set}_known_facts",
     "{set}_known_probe_{kind}"),
    JUDGED | PROBES, sets=("probe",), compare=("clean", "corrupted"), skip_key="restoration",
)  # fmt: skip
