"""Which suite a benchmark name builds: one entry per benchmark, each a function of the settings.

A new benchmark is a builder module in this package (its sets, each declared: role, prompt style,
generation length, stop strings, truth side) plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable

from unlearn.config import EvalConfig
from unlearn.errors import UnlearnError
from unlearn.eval.suites.builders import Suite, custom_suite, people_suite, tofu_suite


def _tofu(cfg: EvalConfig) -> Suite:
    return tofu_suite(cfg.split or "forget01", cfg.data_dir, cfg.limit)


def _people(cfg: EvalConfig) -> Suite:
    return people_suite()


def _custom(cfg: EvalConfig) -> Suite:
    raise UnlearnError(
        "benchmark 'custom' needs --forget FILE (and optionally --retain, --holdout)"
    )


def _muse(cfg: EvalConfig) -> Suite:
    from unlearn.eval.suites.muse import muse_suite

    return muse_suite(cfg.split or "news", cfg.data_dir, cfg.limit, cfg.rouge_stem)


def _choice(benchmark: str) -> Callable[[EvalConfig], Suite]:
    def build(cfg: EvalConfig) -> Suite:
        from unlearn.eval.suites.choice import choice_suite

        return choice_suite(benchmark, cfg.split, cfg.data_dir, cfg.limit, cfg.shots, cfg.forget)

    return build


BENCHMARKS: dict[str, Callable[[EvalConfig], Suite]] = {
    "tofu": _tofu,
    "people": _people,
    "custom": _custom,
    "muse": _muse,
    "wmdp": _choice("wmdp"),
    "mmlu": _choice("mmlu"),
    "mcq": _choice("mcq"),
}


def build_suite(cfg: EvalConfig) -> Suite:
    """The suite `cfg` names; the user's own question/answer files when --forget is given (except
    for `mcq`, whose --forget is the multiple-choice file)."""
    if cfg.forget is not None and cfg.benchmark in ("tofu", "custom", "people"):
        return custom_suite(cfg.forget, cfg.retain, cfg.holdout)
    if cfg.benchmark not in BENCHMARKS:
        raise UnlearnError(
            f"unknown benchmark '{cfg.benchmark}'; choose one of {', '.join(BENCHMARKS)}"
        )
    return BENCHMARKS[cfg.benchmark](cfg)
