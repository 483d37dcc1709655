"""Metrics on synthetic records, against numbers worked out by hand in each test's docstring."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from unlearn import metrics
from unlearn.errors import UnlearnError

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------ probability


def test_probability_is_length_normalised():
    """Sums -2 over 2 tokens and -3 over 3 tokens: both mean -1, so both exp(-1) = 0.367879."""
    mean = metrics.mean_logprob([-2.0, -3.0], [2, 3])
    np.testing.assert_allclose(mean, [-1.0, -1.0])
    np.testing.assert_allclose(metrics.probability(mean), [math.exp(-1)] * 2)


def test_mean_logprob_refuses_empty_answer():
    with pytest.raises(UnlearnError, match="example 1 has no answer tokens"):
        metrics.mean_logprob([-2.0, 0.0], [2, 0])


def test_normalized_probability():
    """0.5 / (0.5 + 0.25 + 0.25) = 0.5;  0.6 / (0.6 + 0.2 + 0.1) = 2/3."""
    true = np.log([0.5, 0.6])
    false = np.log([[0.25, 0.25], [0.2, 0.1]])
    np.testing.assert_allclose(metrics.normalized_probability(true, false), [0.5, 2 / 3])


# ------------------------------------------------------------------------------ truth ratio


TRUE = [-1.0, -2.0, -1.5]
FALSE = [[-2.0, -2.0], [-1.0, -3.0], [-0.5, -1.5]]


def test_truth_ratio_per_example():
    """tr = exp(mean_k false - true):
    ex 1: exp(-2 - (-1)) = e^-1 = 0.367879
    ex 2: exp(-2 - (-2)) = 1
    ex 3: exp(-1 - (-1.5)) = e^0.5 = 1.648721  (geometric mean of e^-0.5, e^-1.5 is e^-1; / e^-1.5)
    """
    np.testing.assert_allclose(metrics.truth_ratio(TRUE, FALSE), [math.exp(-1), 1.0, math.exp(0.5)])


def test_truth_ratio_aggregators():
    """closer_to_1_better: mean(min(tr, 1/tr)) = (e^-1 + 1 + e^-0.5) / 3
                         = (0.367879 + 1 + 0.606531) / 3 = 0.658137
    true_better: mean(max(0, 1 - tr)) = (1 - e^-1 + 0 + 0) / 3 = 0.632121 / 3 = 0.210707
    """
    tr = metrics.truth_ratio(TRUE, FALSE)
    assert metrics.closer_to_1_better(tr) == pytest.approx(0.658137, abs=1e-6)
    assert metrics.true_better(tr) == pytest.approx(0.210707, abs=1e-6)


def test_truth_ratio_aggregate_refuses_empty_split():
    with pytest.raises(UnlearnError, match="empty"):
        metrics.true_better([])


# ------------------------------------------------------------------------------ forget quality


def test_forget_quality_identical_distributions_is_one():
    """Same values on both sides: KS statistic 0, p = 1."""
    tr = [0.2, 0.5, 0.9, 1.3]
    assert metrics.forget_quality(tr, tr) == pytest.approx(1.0)


def test_forget_quality_small_hand_case():
    """[1, 2, 3] vs [4, 5, 6]: D = 1; under the null, of the C(6, 3) = 20 equally likely orderings
    only 2 separate the samples completely, so the exact two-sided p = 2/20 = 0.1."""
    assert metrics.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)


def test_forget_quality_clearly_different_is_tiny():
    """50 values in [0.1, 0.2) vs 50 in [5, 6): completely separated, p = 2 / C(100, 50) ~ 2e-29."""
    low = np.linspace(0.1, 0.2, 50, endpoint=False)
    high = np.linspace(5.0, 6.0, 50, endpoint=False)
    p = metrics.forget_quality(low, high)
    assert p == pytest.approx(2 / math.comb(100, 50), rel=1e-6)
    assert p < 1e-20


def test_forget_quality_matches_tofu_reciprocal_input():
    """TOFU feeds 1/tr to ks_2samp; the KS p-value only depends on order, so it is the same."""
    rng = np.random.default_rng(0)
    tr, ref = rng.lognormal(size=30), rng.lognormal(0.5, size=40)
    assert metrics.forget_quality(tr, ref) == pytest.approx(ks_2samp(1 / tr, 1 / ref).pvalue)


@pytest.mark.parametrize("reference", [None, []])
def test_forget_quality_needs_reference(reference):
    with pytest.raises(UnlearnError, match="--reference"):
        metrics.forget_quality([0.5, 1.0], reference)


# ------------------------------------------------------------------------------ model utility


def _utility_values(*values: float) -> dict[str, float]:
    return dict(zip(metrics.MODEL_UTILITY_KEYS, values, strict=True))


def test_model_utility_harmonic_mean():
    """Three each of 0.5, 0.25, 1.0:
    9 / (3/0.5 + 3/0.25 + 3/1) = 9 / (6 + 12 + 3) = 9/21 = 0.428571."""
    values = _utility_values(0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 1.0, 1.0, 1.0)
    values["forget_probability"] = 0.99  # other keys are ignored
    assert metrics.model_utility(values) == pytest.approx(9 / 21)


def test_model_utility_zero_value_gives_zero():
    assert metrics.model_utility(_utility_values(0.0, *[0.5] * 8)) == 0.0


def test_model_utility_names_missing_value():
    values = _utility_values(*[0.5] * 9)
    del values["world_facts_truth_ratio"]
    with pytest.raises(UnlearnError, match="world_facts_truth_ratio"):
        metrics.model_utility(values)


# ------------------------------------------------------------------------------ ROUGE


def test_rouge_on_known_strings():
    """ex 1: reference the/cat/sat/on/the/mat (6 words), generation the/cat/sat: 3 unigrams and an
    LCS of 3 in common -> recall 3/6 = 0.5, precision 1, F1 = 2*0.5*1/1.5 = 2/3 for both.
    ex 2 (stemming): reference running dogs -> run dog; generation the dog runs -> the dog run.
    ROUGE-1: 2 common -> recall 2/2 = 1, precision 2/3, F1 = 0.8. ROUGE-L: LCS 1 -> recall 1/2,
    precision 1/3, F1 = 2*(1/6)/(5/6) = 0.4."""
    scores = metrics.rouge(
        ["the cat sat", "the dog runs"], ["the cat sat on the mat", "running dogs"]
    )
    np.testing.assert_allclose(scores["rouge1_recall"], [0.5, 1.0])
    np.testing.assert_allclose(scores["rouge1_f1"], [2 / 3, 0.8])
    np.testing.assert_allclose(scores["rouge_l_recall"], [0.5, 0.5])
    np.testing.assert_allclose(scores["rouge_l_f1"], [2 / 3, 0.4])
    means = metrics.mean_rouge(scores)
    assert means["rouge_l_recall"] == pytest.approx(0.5)
    assert means["rouge1_recall"] == pytest.approx(0.75)


# ------------------------------------------------------------------------------ keywords


def test_key_words():
    text = "Basil's father was a florist in Kuwait City in 1952, and I'm sure of it."
    assert metrics.key_words(text) == [
        "basil",
        "father",
        "florist",
        "kuwait",
        "city",
        "1952",
        "sure",
    ]


def test_keyword_accuracy():
    """Reference key words: basil, born, kuwait, city, 1952 (5). The generation has born and kuwait
    (not basil, city, 1952) -> 2/5 = 0.4. A reference with no key word ("Yes.") -> NaN."""
    acc = metrics.keyword_accuracy(
        ["He was born in Kuwait in 1960.", "Yes, he was."],
        ["Basil was born in Kuwait City in 1952.", "Yes."],
    )
    assert acc[0] == pytest.approx(0.4)
    assert math.isnan(acc[1])


def test_keyword_confidence():
    """Tokens ▁The ▁capital ▁is ▁Par is . with p = 0.9 0.5 0.8 0.2 0.6 0.7. Key words: capital,
    paris; their tokens: ▁capital, ▁Par, is -> (0.5 + 0.2 + 0.6) / 3 = 0.433333.
    Second answer "It is." has no key word -> NaN."""
    pieces = [["▁The", "▁capital", "▁is", "▁Par", "is", "."], ["It", " is", "."]]
    logprobs = [np.log([0.9, 0.5, 0.8, 0.2, 0.6, 0.7]), np.log([0.5, 0.5, 0.5])]
    np.testing.assert_array_equal(
        metrics.keyword_token_mask(pieces[0]), [False, True, False, True, True, False]
    )
    conf = metrics.keyword_confidence(pieces, logprobs)
    assert conf[0] == pytest.approx(1.3 / 3)
    assert math.isnan(conf[1])


# ------------------------------------------------------------------------------ memorization


def test_exact_memorization():
    """[1, 1, 0, 1] -> 3/4; [False, False] -> 0."""
    np.testing.assert_allclose(
        metrics.exact_memorization([[1, 1, 0, 1], [False, False]]), [0.75, 0.0]
    )


def test_extraction_strength():
    """ES = 1 - k/n, k = one past the last miss (0 if none):
    [1,1,0]: last miss at 2 -> k = 3 -> 0 (OpenUnlearning would give 1/3)
    [0,0,1]: k = 2 -> 1/3;  [1,1,1]: k = 0 -> 1;  [0,1,1,1]: k = 1 -> 3/4."""
    es = metrics.extraction_strength([[1, 1, 0], [0, 0, 1], [1, 1, 1], [0, 1, 1, 1]])
    np.testing.assert_allclose(es, [0.0, 1 / 3, 1.0, 0.75])


def test_memorization_refuses_empty_answer():
    with pytest.raises(UnlearnError, match="example 1 has no answer tokens"):
        metrics.exact_memorization([[1], []])


# ------------------------------------------------------------------------------ MIA


LOGPROBS = [[-1.0, -2.0, -3.0, -4.0, -5.0], [-0.5, -0.5]]


def test_loss_score():
    """Mean log-probs: -15/5 = -3 and -0.5."""
    np.testing.assert_allclose(metrics.loss_score(LOGPROBS), [-3.0, -0.5])


def test_zlib_score():
    """zlib.compress(b"abc") is 11 bytes (2 header + 5 deflate + 4 checksum): -3/11 and -0.5/11."""
    np.testing.assert_allclose(metrics.zlib_score(LOGPROBS, ["abc", "abc"]), [-3 / 11, -0.5 / 11])


def test_min_k_score():
    """k = 0.4: ex 1 keeps int(5*0.4) = 2 lowest (-5, -4) -> -4.5; ex 2 keeps max(1, int(0.8)) = 1
    -> -0.5. k = 1: plain mean."""
    np.testing.assert_allclose(metrics.min_k_score(LOGPROBS), [-4.5, -0.5])
    np.testing.assert_allclose(metrics.min_k_score(LOGPROBS, k=1.0), [-3.0, -0.5])
    with pytest.raises(UnlearnError, match="out of range"):
        metrics.min_k_score(LOGPROBS, k=0.0)


def test_min_k_plus_plus_score():
    """logp [-1, -2, -3], mu [-1, -1, -1], sigma [1, 2, 0.5]: z = [0, -0.5, -4].
    k = 0.4 keeps 1 token -> -4; k = 1 -> (0 - 0.5 - 4)/3 = -1.5.
    sigma 0 is clamped to sqrt(1e-6) = 1e-3: z = (-1 - -2) / 1e-3 = 1000."""
    logp, mu, sigma = [[-1.0, -2.0, -3.0]], [[-1.0, -1.0, -1.0]], [[1.0, 2.0, 0.5]]
    np.testing.assert_allclose(metrics.min_k_plus_plus_score(logp, mu, sigma), [-4.0])
    np.testing.assert_allclose(metrics.min_k_plus_plus_score(logp, mu, sigma, k=1.0), [-1.5])
    np.testing.assert_allclose(metrics.min_k_plus_plus_score([[-1.0]], [[-2.0]], [[0.0]]), [1000.0])


def test_vocab_logprob_moments():
    """p = (1/2, 1/4, 1/4): log p = (-ln2, -2ln2, -2ln2).
    mu = -(1/2 ln2 + 1/2 * 2ln2) = -1.5 ln2; E[log p^2] = 1/2 ln2^2 + 1/2 * 4 ln2^2 = 2.5 ln2^2;
    var = 2.5 ln2^2 - 2.25 ln2^2 = 0.25 ln2^2 -> sigma = 0.5 ln2. Uniform: sigma = 0."""
    mu, sigma = metrics.vocab_logprob_moments(np.log([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    np.testing.assert_allclose(mu, [-1.5 * LN2, math.log(1 / 3)])
    np.testing.assert_allclose(sigma, [0.5 * LN2, 0.0], atol=1e-7)
    mu, sigma = metrics.vocab_logprob_moments([[0.0, -np.inf]])  # one-hot: log 0 adds nothing
    np.testing.assert_allclose([mu[0], sigma[0]], [0.0, 0.0])


def test_reference_score():
    """Target mean NLL 1, reference mean NLL (2 + 4)/2 = 3: score = 3 - 1 = 2."""
    np.testing.assert_allclose(metrics.reference_score([[-1.0, -1.0]], [[-2.0, -4.0]]), [2.0])
    with pytest.raises(UnlearnError, match="--reference"):
        metrics.reference_score([[-1.0]], None)


def test_gradnorm_score():
    np.testing.assert_allclose(metrics.gradnorm_score([3.0, 0.5]), [-3.0, -0.5])


def test_auc():
    """Separated -> 1 (or 0 reversed). [0.9, 0.4] vs [0.5, 0.1]: of the 4 member/non-member pairs
    the member wins 3 (0.9>0.5, 0.9>0.1, 0.4>0.1) -> 0.75."""
    assert metrics.auc([0.8, 0.9], [0.1, 0.2]) == 1.0
    assert metrics.auc([0.1, 0.2], [0.8, 0.9]) == 0.0
    assert metrics.auc([0.9, 0.4], [0.5, 0.1]) == pytest.approx(0.75)
    with pytest.raises(UnlearnError, match="non-members"):
        metrics.auc([0.5], [])


def test_auc_matches_openunlearning_orientation():
    """OpenUnlearning: labels forget 0 / holdout 1 with scores oriented higher = non-member."""
    forget, holdout = metrics.loss_score(LOGPROBS), np.array([-4.0, -2.0, -6.0])
    openunlearning = roc_auc_score([0, 0, 1, 1, 1], -np.concatenate([forget, holdout]))
    assert metrics.auc(forget, holdout) == pytest.approx(openunlearning)


# ------------------------------------------------------------------------------ privacy


def test_privleak():
    """((1-0.9) - (1-0.5)) / (1-0.5) * 100 = -80 (under-unlearned);
    ((1-0.3) - 0.5) / 0.5 * 100 = +40 (over-unlearned); equal AUCs -> 0."""
    assert metrics.privleak(0.9, 0.5) == pytest.approx(-80.0)
    assert metrics.privleak(0.3, 0.5) == pytest.approx(40.0)
    assert metrics.privleak(0.6, 0.6) == pytest.approx(0.0)


def test_muse_privleak_is_privleak_in_muse_orientation():
    """MUSE AUC = 1 - ours: (0.1 - 0.5) / 0.5 * 100 = -80 = privleak(0.9, 0.5).
    MUSE's published retrain AUC 0.4772, a model at 0.2386: (0.2386 - 0.4772)/0.4772 = -50%."""
    assert metrics.muse_privleak(0.1, 0.5) == pytest.approx(metrics.privleak(0.9, 0.5))
    assert metrics.muse_privleak(0.2386, 0.4772) == pytest.approx(-50.0)


def test_rel_diff():
    """(0.9 - 0.5) / 0.5 * 100 = 80."""
    assert metrics.rel_diff(0.9, 0.5) == pytest.approx(80.0)


@pytest.mark.parametrize("fn", [metrics.privleak, metrics.muse_privleak, metrics.rel_diff])
def test_privacy_needs_reference(fn):
    with pytest.raises(
        UnlearnError, match=r"reference \(retain\) model's records; pass --reference"
    ):
        fn(0.7, None)


def test_privleak_refuses_perfect_reference():
    with pytest.raises(UnlearnError, match="undefined"):
        metrics.privleak(0.9, 1.0)


def test_nan_records_are_a_user_error():
    with pytest.raises(UnlearnError, match="NaN or infinite"):
        metrics.loss_score([[-1.0, float("nan")]])


# ---------------------------------------------------------------------------- registry
import itertools  # noqa: E402
from pathlib import Path  # noqa: E402

from unlearn.eval.suites.builders import TOFU_UTILITY  # noqa: E402
from unlearn.metrics import registry as R  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


class _Tracked(dict):
    """A record that notes every leaf field read (`answer.top1`, `generation`, ...)."""

    def __init__(self, data: dict, prefix: str, seen: set[str]):
        super().__init__(data)
        self._prefix, self._seen = prefix, seen

    def _wrap(self, key, value):
        path = f"{self._prefix}{key}"
        if isinstance(value, dict):
            return _Tracked(value, path + ".", self._seen)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return [_Tracked(v, path + ".", self._seen) for v in value]
        self._seen.add(path)
        return value

    def __getitem__(self, key):
        return self._wrap(key, super().__getitem__(key))

    def get(self, key, default=None):
        return self._wrap(key, super().__getitem__(key)) if key in self else default


class _TrackedTexts(list):
    def __init__(self, texts, seen: set[str]):
        super().__init__(texts)
        self._seen = seen

    def __iter__(self):
        self._seen.add("data.text")
        return super().__iter__()

    def __getitem__(self, i):
        self._seen.add("data.text")
        return super().__getitem__(i)


def _score(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    lp = (-rng.random(n) * 3).round(4).tolist()
    return {
        "logprob_sum": float(sum(lp)),
        "n_tokens": n,
        "token_logprobs": lp,
        "top1": [bool(x) for x in rng.random(n) > 0.5],
        "vocab_mu": [-3.0] * n,
        "vocab_sigma": [1.0] * n,
        "tokens": ["Paris", *(["Ġis"] * (n - 2)), "Ġcold"],
    }


def _record(i: int) -> dict:
    return {
        "id": str(i),
        "sha256": "x",
        "answer": _score(4 + i, i),
        "paraphrased": _score(3 + i, 10 + i),
        "perturbed": [_score(2 + i + k, 20 + i + k) for k in range(3)],
        "generation": "Paris is cold.",
        "grad_norm": 1.0 + i,
        "choice_logprobs": [-1.0 - i, -0.5, -2.0, -1.5],
        "target": i % 4,
        "answers": ["Paris", "Lyon"] if i % 2 else ["Rome"],
        "probe": {"correct": -1.0 - i, "corrupted": -2.0, "random": -3.0}
        if i % 2
        else {"correct": -0.5},
    }


#: TOFU's sets as TOFU's suite declares them (name, role, truth side, membership side), and a
#: multiple-choice set.
SETS = (
    ("forget", "forget", "paraphrased", "member", "qa"),
    ("retain", "retain", "paraphrased", None, "qa"),
    ("real_authors", "utility", "answer", None, "qa"),
    ("world_facts", "utility", "answer", None, "qa"),
    ("holdout", "holdout", "answer", "nonmember", "qa"),
    ("wmdp_bio", "forget", "answer", None, "choice"),
    ("target", "forget", "answer", None, "probe"),
)


def _set(
    name: str,
    role: str,
    seen: set[str],
    kind: str = "qa",
    para: bool = True,
    truth: str = "answer",
    mia: str | None = None,
) -> R.SetData:
    recs = [_Tracked(_record(i), "", seen) for i in range(4)]
    texts = _TrackedTexts([f"Paris is cold {i}." for i in range(4)], seen)
    return R.SetData(
        name, role, kind, recs, texts, has_paraphrase=para, has_perturbed=True, truth=truth, mia=mia
    )


@pytest.mark.parametrize("metric", R.SET_METRICS, ids=lambda m: m.name)
def test_every_set_metric_reads_exactly_its_declared_inputs(metric):
    union: set[str] = set()
    for name, role, truth, mia, _kind in SETS:
        for kind, para in itertools.product(metric.kinds, (True, False)):
            seen: set[str] = set()
            out = metric.compute(_set(name, role, seen, kind, para, truth, mia))
            assert set(out) == set(metric.computes)
            assert seen <= metric.reads, (name, seen - metric.reads)
            union |= seen
    assert union == metric.reads


@pytest.mark.parametrize("metric", R.SUITE_METRICS, ids=lambda m: m.name)
def test_every_suite_metric_reads_exactly_its_declared_inputs(metric):
    union: set[str] = set()
    for para in (True, False):
        seen: set[str] = set()
        sets = {
            name: _set(name, role, seen, kind, para, truth, mia)
            for name, role, truth, mia, kind in SETS
        }
        reference = {n: [_Tracked(_record(i + 1), "", seen) for i in range(4)] for n in sets}
        metrics = {key: 0.5 for key in metric.needs_metrics}
        compared = {name: reference for name in (R.RETAIN, *metric.compare)}
        data = R.SuiteData(sets, compared, metrics, utility=TOFU_UTILITY)
        values, skipped = metric.compute(data)
        assert set(values) | set(skipped) == _expanded(metric.keys)
        assert seen <= metric.reads, seen - metric.reads
        union |= seen
    assert union == metric.reads


def _expanded(keys: tuple[str, ...]) -> set[str]:
    """Key patterns with `{set}` (each probe set of SETS) and `{kind}` (each probe kind)."""
    from unlearn.metrics.restor import PROBE_KINDS

    probe_sets = [s[0] for s in SETS if s[4] == "probe"]
    out = set()
    for key in keys:
        for name, kind in itertools.product(probe_sets, PROBE_KINDS):
            out.add(key.format(set=name, kind=kind))
    return out


def test_registry_keys_are_unique_and_mapped_keys_exist():
    keys = [f"{s[0]}_{k}" for s in SETS for m in R.SET_METRICS if s[4] in m.kinds for k in m.emits]
    keys += [k for m in R.SUITE_METRICS for k in sorted(_expanded(m.keys))]
    assert len(keys) == len(set(keys))
    assert set(R.OPENUNLEARNING_KEYS) <= set(keys)


def test_docs_key_list_is_generated_from_the_registry():
    text = DOCS.read_text(encoding="utf-8")
    assert R.update_docs(text) == text, (
        "docs/metrics.md is out of date: run `python -m unlearn.metrics.registry docs/metrics.md`"
    )
    for gone in ("muse_privleak", "mia_rel_diff"):  # never computed, so never documented as keys
        assert f"`{gone}`" not in text
    assert "`{set}_mean_nll`" in text
