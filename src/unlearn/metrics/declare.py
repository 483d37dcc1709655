"""What a metric is, declared next to its pure function: the data it reads and how it reports.

A per-set metric (`SetMetric`) gives one value per example of a dataset and a named aggregation;
a suite metric (`SuiteMetric`) combines datasets, comparison models' records or other metrics.
Each metric module declares its metrics at its end; `unlearn.metrics.registry` lists them.
`reads` names the record fields a metric uses (tests check it reads nothing else).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unlearn.errors import UnlearnError

#: Min-K%'s k (MUSE's and OpenUnlearning's 0.4).
MIN_K_DEFAULT = 0.4
Record = Mapping[str, Any]
ALL_ROLES = ("forget", "retain", "utility", "holdout")
#: What a row is (`unlearn.eval.suites.builders.KINDS` documents each).
SET_KINDS = ("qa", "text", "choice", "probe")
GENERATED_ROLES = ("forget", "retain", "utility")  # holdout sets feed MIA only: no generation
#: The comparison TOFU's and MUSE's metrics need: a model trained without the forget data.
RETAIN = "retain"


def no_comparison(name: str) -> str:
    """The skip reason of a metric whose named comparison was not given."""
    if name == RETAIN:
        return "needs the reference (retain) model's evaluation; pass --reference EVAL_DIR"
    return f"needs the '{name}' model's evaluation; pass --compare {name}=EVAL_DIR"


NO_REFERENCE = no_comparison(RETAIN)


@dataclass(frozen=True)
class SetData:
    """What a per-set metric may read: one dataset's records and reference texts."""

    name: str
    role: str  # forget | retain | utility | holdout
    kind: str  # qa | text | choice | probe
    records: Sequence[Record]
    texts: Sequence[str]  # `data.text`: each example's answer (qa) or document (text)
    has_paraphrase: bool = False
    has_perturbed: bool = False
    truth: str = "answer"  # the set's declared true side of truth ratio
    only: tuple[str, ...] | None = None  # the set's declared per-set metrics (None: all)
    mia: str | None = None  # member | nonmember
    stem: bool = True  # ROUGE stems words
    judge: Any = "contains"  # how a generation is judged correct (probe sets): a name or function

    @property
    def truth_key(self) -> str:
        """Truth ratio's "true" side: as declared, if the set has that column, else the answer."""
        return "paraphrased" if self.truth == "paraphrased" and self.has_paraphrase else "answer"

    def with_records(self, records: Sequence[Record]) -> SetData:
        """The same examples as another model (a comparison) scored them."""
        return dataclasses.replace(self, records=records)


@dataclass(frozen=True)
class SuiteData:
    """What a suite metric may read: every set, the named comparisons' records (e.g. "retain"),
    the metrics so far, and a published retrained-model AUC (value, source) for privleak."""

    sets: Mapping[str, SetData]
    comparisons: Mapping[str, Mapping[str, Sequence[Record]]]
    metrics: Mapping[str, float]
    min_k: float = MIN_K_DEFAULT
    retrain_auc: tuple[float, str] | None = None
    utility: tuple[str, ...] = ()  # the sets model utility is over
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    def find(self, selector: str) -> SetData | None:
        """The set a suite metric reads: "member" / "nonmember" (membership inference's sides),
        a set kind ("probe", ...: the first set of that kind), else the first set of that role."""
        if selector in ("member", "nonmember"):
            return next((d for d in self.sets.values() if d.mia == selector), None)
        if selector in SET_KINDS:
            return next((d for d in self.sets.values() if d.kind == selector), None)
        return next((d for d in self.sets.values() if d.role == selector), None)

    def get(self, selector: str) -> SetData:
        d = self.find(selector)
        if d is None:
            raise UnlearnError(f"this suite has no {selector} set")
        return d

    def ref(self, selector: str, comparison: str = RETAIN) -> SetData:
        """The set `selector` finds, as the named comparison model scored it."""
        d = self.get(selector)
        theirs = self.comparisons.get(comparison, {})
        if d.name not in theirs:
            raise UnlearnError(f"'{comparison}' records of '{d.name}' are missing")
        return d.with_records(theirs[d.name])


PerExample = dict[str, np.ndarray]


@dataclass(frozen=True)
class SetMetric:
    """One value per example of a dataset, reported as `{set}_{key}` for each key it emits."""

    name: str
    compute: Callable[[SetData], PerExample]
    aggregate: Callable[[np.ndarray, SetData], float]
    aggregation: str  # the aggregation's name, for the docs
    reads: frozenset[str]
    keys: tuple[str, ...] = ()  # emitted key suffixes; default (name,)
    kinds: tuple[str, ...] = ("qa", "text")  # the set kinds it applies to
    roles: tuple[str, ...] = ALL_ROLES
    needs_generation: bool = False
    needs_perturbed: bool = False
    stderr: bool = False  # also report each key's standard error as `{key}_stderr`

    @property
    def computes(self) -> tuple[str, ...]:
        """The per-example value names `compute` returns."""
        return self.keys or (self.name,)

    @property
    def emits(self) -> tuple[str, ...]:
        """The aggregate key suffixes reported."""
        return self.computes + tuple(f"{k}_stderr" for k in self.computes if self.stderr)


@dataclass(frozen=True)
class SuiteMetric:
    """Values over several sets, a reference model's records or other metrics (single keys)."""

    name: str
    compute: Callable[[SuiteData], tuple[dict[str, float], dict[str, str]]]
    keys: tuple[str, ...]
    reads: frozenset[str]
    sets: tuple[str, ...] = ()  # selectors (`SuiteData.find`): a role, a kind, member, nonmember
    sets_hint: str = ""
    compare: tuple[str, ...] = ()  # the named comparisons it needs (e.g. ("retain",))
    needs_perturbed: bool = False  # on every set in `sets`
    needs_metrics: tuple[str, ...] = ()
    metrics_hint: str = ""
    skip_key: str = ""  # where a missing input is reported; default the first key
    sets_key: str = ""  # where a missing set is reported; default skip_key

    @property
    def skip_as(self) -> str:
        return self.skip_key or self.keys[0]


Computed = tuple[dict[str, float], dict[str, str]]


# ---------------------------------------------------------------------------- shared pieces
def mean(values: np.ndarray, _data: SetData | None = None) -> float:
    """Mean over defined values; NaN (reported as skipped) when none is defined."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def mean_lp(score: Record) -> float:
    """A scored answer's mean per-token log-probability."""
    return float(score["logprob_sum"]) / max(int(score["n_tokens"]), 1)


def perturbed_lp(records: Sequence[Record]) -> np.ndarray:
    """[N, K] mean log-probabilities of each example's K perturbed answers."""
    return np.array([[mean_lp(p) for p in r["perturbed"]] for r in records], dtype=np.float64)


def token_logprobs(d: SetData) -> list[Any]:
    return [r["answer"]["token_logprobs"] for r in d.records]


#: Record fields, named as `reads` names them.
SUM = frozenset({"answer.logprob_sum", "answer.n_tokens"})
PERTURBED = frozenset({"perturbed.logprob_sum", "perturbed.n_tokens"})
TRUE = frozenset({"paraphrased.logprob_sum", "paraphrased.n_tokens"}) | SUM
