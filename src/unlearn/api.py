"""The Python API: every entry point the CLI has, as functions.

`forget` and `finetune` train (`unlearn.train`), `evaluate` scores a model (`unlearn.eval`) — these
single jobs live in `unlearn.jobs` — `protocol` and `restor` chain them, `report` compares
evaluations (`unlearn.report`). The CLI is a thin layer over these functions, so a notebook
gets exactly the behaviour of the command line: same config resolution (YAML < arguments < dotted
overrides), same checks, same outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearn.jobs import (
    attack,
    audit,
    evaluate,
    finetune,
    forget,
    localize,
    resolve_config,
    resolve_eval_config,
)
from unlearn.train.plan import Plan, RunResult

__all__ = [
    "Plan",
    "RunResult",
    "attack",
    "audit",
    "demo",
    "evaluate",
    "finetune",
    "forget",
    "localize",
    "protocol",
    "report",
    "resolve_config",
    "resolve_eval_config",
    "restor",
    "restor_corrupt",
    "restor_eval",
]


def protocol(
    kind: str,
    model: str,
    forget: str | list[str],
    retain: str | None,
    method: str,
    output: str,
    *,
    stages: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    eval_overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
    **eval_fields: Any,
) -> dict[str, Any]:
    """MUSE's scalability or sustainability protocol (`unlearn.protocol`): unlearn stage after
    stage, evaluating each (`eval_fields`: `evaluate`'s keys, e.g. benchmark="muse", data_dir,
    reference); resumes a stopped run in `output`. Returns what protocol.json holds."""
    from unlearn.protocol import Protocol, run_protocol

    p = Protocol(
        kind, model, [forget] if isinstance(forget, str) else list(forget), retain, method,
        output, stages, list(overrides), {k: v for k, v in eval_fields.items() if v is not None},
        list(eval_overrides),
    )  # fmt: skip
    return run_protocol(p, progress=progress)


def report(
    eval_dirs: list[str] | list[Path], output: str | Path, show_examples: bool = False
) -> dict[str, Any]:
    """Write report.md, report.html and summary.json comparing evaluations; return the summary.

    `show_examples` includes the examples' text that evaluations saved with `examples=N`.
    """
    from unlearn.report.build import build_report

    return build_report(list(eval_dirs), output, show_examples=show_examples)


def demo(output: str = "out/demo", method: str = "npo", fresh: bool = False) -> dict[str, Any]:
    """The demo end to end (fine-tune SmolLM2 on built-in fictitious people, unlearn some,
    evaluate, report); fine-tuned models are cached unless `fresh`. Returns the report summary."""
    from unlearn.demo import DemoSettings, run_demo

    return run_demo(output, DemoSettings(method=method), fresh=fresh)


# ---------------------------------------------------------------------------- RESTOR
def restor(
    model: str | None = None,
    facts: str | None = None,
    corruption: str | None = None,
    methods: list[str] | None = None,
    output: str | Path = "restor",
    *,
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
    **fields: Any,
) -> dict[str, Any]:
    """RESTOR, all stages: choose targets, corrupt `model` with `corruption` (generated from
    `facts` when None), unlearn with each of `methods`, evaluate, report into `output`.

    `fields` are the other settings of `unlearn.restor.pipeline.Settings` (entities, targets,
    untouched, n_targets, docs_per_entity, ...); `overrides` dotted ones (`corrupt.lr=1e-4`,
    `eval.judge=exact`). Returns {"report": summary, "seconds": per stage}. Reruns continue.
    """
    from unlearn.restor.pipeline import resolve_settings, run_pipeline

    settings = resolve_settings(
        config, overrides, model=model, facts=facts, corruption=corruption, methods=methods,
        **fields,
    )  # fmt: skip
    return run_pipeline(settings, output, progress=progress)


def restor_corrupt(
    model: str, corruption: str, output: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> Path:
    """Fine-tune `model` on corruption documents into `output` (the RESTOR corruption stage)."""
    from unlearn.restor.pipeline import corrupt, corrupt_settings

    return corrupt(model, corruption, output, corrupt_settings(list(overrides)))


def restor_eval(
    model: str | None,
    clean: str | None,
    corrupted: str | None,
    facts: str | None,
    output: str | Path | None = None,
    *,
    corruption: str | None = None,
    setup: str | None = None,
    targets: str | list[str] | None = None,
    untouched: str | list[str] | None = None,
    name: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Evaluate `model` on RESTOR facts against the clean and corrupted models; returns the
    results (metrics, skipped with reasons, counts). Targets come from `setup`, `corruption` or
    `targets` (a list, a file, or "A;B")."""
    from unlearn.restor.run import eval_command

    return eval_command(
        model, clean, corrupted, facts, corruption=corruption, setup=setup,
        targets=";".join(targets) if isinstance(targets, list) else targets,
        untouched=";".join(untouched) if isinstance(untouched, list) else untouched,
        name=name, output=None if output is None else str(output), overrides=overrides,
    )  # fmt: skip
