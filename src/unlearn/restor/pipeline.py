"""`unlearn restor`: corrupt a model with wrong facts, unlearn them with each method, measure what
comes back (RESTOR, Rezaei et al. 2024), as one resumable run.

Every stage writes into its own folder and is skipped when a finished result of the same inputs
and settings is there, so rerunning continues an interrupted run (a training run resumes from its
checkpoint; one made with other settings is redone). Folder of a run:

  setup.json                 targets, untouched entities, corrupted answers (and how they were found)
  data/corruption.json       the forget set: RESTOR's documents (subsampled) or generated ones
  data/retain.json           true-fact documents about non-evaluated entities
  models/corrupted, models/<method>   fine-tuned / unlearned models (`unlearn forget` outputs)
  evals/select               the clean model's answers on the candidates (when targets are chosen)
  evals/clean, evals/corrupted, evals/<method>   RESTOR evaluations (`unlearn.eval.suites.restor`)
  report/                    `unlearn report` over evals/ (RESTOR table and probe plot)

Default sizes fit a 2-core CPU in about half an hour with SmolLM2-135M (docs/results/restor.md has
the measured stage times).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unlearn.config import build_section, resolve_tree
from unlearn.errors import UnlearnError
from unlearn.eval.suites.restor import EvalSettings
from unlearn.outputs import atomic_write_json
from unlearn.restor.documents import (
    find_targets,
    generate_corruption,
    generate_retain,
    load_documents,
)
from unlearn.restor.facts import load_facts, sample_entities
from unlearn.restor.run import (
    METHOD_ALIASES,
    SETUP,
    Setup,
    corruption_setup,
    evaluate,
    evaluate_baselines,
    select_targets,
)


@dataclass
class TrainSettings:
    """One training stage; `overrides` are `unlearn forget` dotted settings (method.beta=0.2)."""

    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 8
    max_length: int = 256
    overrides: list[str] = field(default_factory=list)


def corrupt_settings(overrides: list[str] | None = None) -> TrainSettings:
    """The corruption stage's defaults: full fine-tuning, 6 epochs at 1e-4 (on SmolLM2-135M, 35
    steps at 1e-4 took the clean model's known target facts from 100% to 60%); `overrides` are
    `unlearn finetune` dotted settings applied after them (`train.lr=5e-5` wins)."""
    return TrainSettings(epochs=6, lr=1e-4, overrides=list(overrides or []))


def _unlearn_defaults() -> TrainSettings:
    # 1e-5 (TOFU's) barely moved SmolLM2 in 35 steps; 5e-5 let NPO restore part of the corrupted
    # facts (while gradient ascent, 35 steps at 5e-5, collapsed the model).
    return TrainSettings(epochs=5, lr=5e-5)


@dataclass
class Settings:
    """Everything `unlearn restor` does, from a YAML file plus dotted overrides.

    entities: candidates for automatic targets and the pool of untouched entities (a JSON list or
        lines file, or "A;B"); default: `candidates` entities drawn from the facts file.
    targets / untouched: explicit lists; targets default to the documents' entities (with
        `corruption`) or to the best-known candidates (generated documents).
    corruption: a RESTOR-style documents file; none means documents are generated from the facts
        (`docs_per_entity`, `facts_per_doc`, `mix` true facts per document).
    retain: "auto" writes true-fact documents about non-evaluated entities, "none" uses no retain
        set (methods that need one then fail), or a documents file.
    """

    model: str = "smollm2-135m"
    facts: str = ""
    corruption: str | None = None
    entities: str | None = None
    targets: str | None = None
    untouched: str | None = None
    candidates: int = 40
    n_targets: int = 5
    n_untouched: int = 10
    docs_per_entity: int = 5
    facts_per_doc: int = 8
    mix: int = 0
    retain: str = "auto"
    retain_docs: int = 40
    methods: list[str] = field(
        default_factory=lambda: ["grad_ascent", "grad_diff", "npo", "simnpo"]
    )
    seed: int = 0
    corrupt: TrainSettings = field(default_factory=corrupt_settings)
    unlearn: TrainSettings = field(default_factory=_unlearn_defaults)
    eval: EvalSettings = field(default_factory=EvalSettings)


SECTIONS = ["corrupt", "unlearn", "eval"]
SCALARS = {f for f in Settings.__dataclass_fields__ if f not in SECTIONS}


def resolve_settings(
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **fields: Any,
) -> Settings:
    """YAML (or dict) < explicit arguments < dotted overrides; unknown keys are one-line errors."""
    tree = resolve_tree(config, overrides, fields, sections=SECTIONS, scalars=SCALARS)
    sections = {name: tree.pop(name, None) or {} for name in SECTIONS}
    defaults = Settings()
    built = build_section(Settings, {k: v for k, v in tree.items()}, "restor")
    built.corrupt = build_section(
        TrainSettings, {**asdict(defaults.corrupt), **sections["corrupt"]}, "corrupt"
    )
    built.unlearn = build_section(
        TrainSettings, {**asdict(defaults.unlearn), **sections["unlearn"]}, "unlearn"
    )
    built.eval = build_section(EvalSettings, sections["eval"], "eval")
    built.eval.check()
    built.methods = [normalize_method(m) for m in built.methods]
    return built


def normalize_method(name: str) -> str:
    from unlearn.methods import get_method

    name = METHOD_ALIASES.get(name.strip().lower(), name.strip())
    get_method(name)  # unknown names: one line listing the valid ones
    return name


def _write_docs(path: Path, rows: list[dict[str, Any]]) -> str:
    atomic_write_json(path, rows)
    return str(path)


STAGE = "stage.json"


def _train(
    kind: str,
    model: str,
    data: str,
    retain: str | None,
    method: str,
    out: Path,
    t: TrainSettings,
    seed: int,
) -> None:
    """One `unlearn forget`/`finetune` run into `out`. A finished run of the same inputs and
    settings is kept, an interrupted one resumed, one made with other settings redone."""
    from unlearn import jobs as api
    from unlearn.models import file_sha256

    stage = {
        "kind": kind, "model": model, "method": method, "seed": seed, "train": asdict(t),
        "data": file_sha256(data), "retain": file_sha256(retain) if retain else None,
    }  # fmt: skip
    marker = out.parent / f"{out.name}.{STAGE}"  # beside: the training run wants its folder empty
    same = marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stage
    if same and (out / "unlearn.json").is_file():
        return
    resume = same and (out / "checkpoints").is_dir()
    overrides = [
        f"train.epochs={t.epochs}", f"train.lr={t.lr}", f"train.batch_size={t.batch_size}",
        f"prompt.max_length={t.max_length}", f"train.seed={seed}", "train.nll_check=false",
        *t.overrides,
    ]  # fmt: skip
    if out.exists() and not resume:
        shutil.rmtree(out)  # our own stage folder, made with other inputs or settings
    atomic_write_json(marker, stage)
    common = {"overrides": overrides, "resume": resume or None}
    if kind == "finetune":
        api.finetune(model, data, str(out), **common)
    else:
        api.forget(model, data, retain, method, str(out), **common)


def corrupt(
    model: str,
    corruption: str,
    output: str | Path,
    t: TrainSettings | None = None,
    seed: int = 0,
) -> Path:
    """Fine-tune `model` on the corruption documents (full fine-tuning) into `output`; the model
    it starts from is only read."""
    load_documents(corruption)  # a bad file fails here, in one line, before any model loads
    out = Path(output)
    _train("finetune", model, corruption, None, "finetune", out, t or corrupt_settings(), seed)
    return out


def _log(msg: str) -> None:
    print(f"restor: {msg}", flush=True)


def prepare(s: Settings, out: Path, progress: bool = True) -> Setup:
    """Choose targets and untouched entities, write (or subsample) the corruption documents and
    the retain documents; reuse setup.json when an earlier run wrote it with the same settings."""
    from unlearn.restor.run import parse_entities

    facts = load_facts(s.facts)
    fingerprint = {k: v for k, v in asdict(s).items() if k not in ("methods", "unlearn")}
    if (out / SETUP).is_file():
        setup = Setup.load(out / SETUP)
        if setup.extra.get("settings") == json.loads(json.dumps(fingerprint)):
            return setup
        raise UnlearnError(
            f"{out} holds a RESTOR run with other settings (facts, targets, corruption or "
            "training); choose another --output or delete it"
        )
    candidates = parse_entities(s.entities, "entities")
    targets = parse_entities(s.targets, "targets")
    untouched = parse_entities(s.untouched, "untouched")
    for names, what in ((candidates, "entities"), (targets, "targets"), (untouched, "untouched")):
        if names is not None:
            facts.check_entities(names, what)
    if candidates is None:
        candidates = sample_entities(facts.entities, s.candidates, s.seed)
    extra: dict[str, Any] = {}
    data = out / "data"
    docs = load_documents(s.corruption) if s.corruption else None
    # who may be a target: the entities the documents name, or (generated documents) candidates
    pool = targets or (list(find_targets(docs, facts)) if docs is not None else candidates)
    if targets is None and len(pool) > s.n_targets:
        _log(f"choosing {s.n_targets} of {len(pool)} possible targets by what the clean model "
             "knows")  # fmt: skip
        targets, auto_untouched, extra["selection"] = select_targets(
            s.model, out / "evals" / "select", facts, pool, candidates, s.n_targets,
            s.n_untouched, s.eval, s.seed, progress, avoid=set(pool) if docs is not None else None,
        )  # fmt: skip
        untouched = untouched if untouched is not None else auto_untouched
    targets = targets or pool
    if docs is not None:
        rows, targets, wrong = corruption_setup(facts, docs, targets, s.docs_per_entity, s.seed)
        source = "inferred"
    else:
        rows, one = generate_corruption(
            facts, targets, s.docs_per_entity, s.facts_per_doc, s.mix, s.seed,
            evaluated=[*candidates, *(untouched or [])],
        )  # fmt: skip
        wrong = {e: {r: [a] for r, a in rels.items()} for e, rels in one.items()}
        source = "generated"
    if untouched is None:
        named = set(pool) if docs is not None else set()
        rest = [e for e in candidates if e not in targets and e not in named]
        untouched = sample_entities(rest, s.n_untouched, s.seed)
    overlap = set(targets) & set(untouched)
    if overlap:
        raise UnlearnError(f"entity '{sorted(overlap)[0]}' is both a target and untouched")
    extra["corruption"] = _write_docs(data / "corruption.json", rows)
    extra["corruption_documents"] = len(rows)
    if s.retain == "auto":
        avoid = [*targets, *untouched]
        extra["retain"] = _write_docs(
            data / "retain.json",
            generate_retain(facts, avoid, s.retain_docs, s.facts_per_doc, s.seed),
        )
    elif s.retain != "none":
        load_documents(s.retain)
        extra["retain"] = s.retain
    extra["settings"] = json.loads(json.dumps(fingerprint))
    setup = Setup(targets, untouched, wrong, source, facts.sha256, extra)
    setup.save(out / SETUP)
    return setup


def run_pipeline(s: Settings, output: str | Path, progress: bool = True) -> dict[str, Any]:
    """All stages, then the report; returns {"report": summary, "seconds": this call's time per
    stage, "cost": what each stage cost when it ran (`stage_costs`)}."""
    from unlearn.report.build import build_report

    if not s.facts:
        raise UnlearnError("no facts file given; pass --facts FILE (RESTOR's facts.json format)")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    setup = prepare(s, out, progress)
    seconds["prepare"] = time.perf_counter() - t
    facts = load_facts(s.facts)
    corruption = setup.extra["corruption"]
    retain = setup.extra.get("retain")
    _log(f"{len(setup.target)} targets, {len(setup.untouched)} untouched entities, "
         f"{setup.extra['corruption_documents']} corruption documents")  # fmt: skip
    t = time.perf_counter()
    corrupted = corrupt(s.model, corruption, out / "models" / "corrupted", s.corrupt, s.seed)
    seconds["corrupt"] = time.perf_counter() - t
    evals = out / "evals"
    clean_eval, corrupted_eval = evals / "clean", evals / "corrupted"
    t = time.perf_counter()
    _log("evaluating the clean and corrupted models")
    evaluate_baselines(s.model, str(corrupted), clean_eval, corrupted_eval, facts, setup, s.eval,
                       progress)  # fmt: skip
    seconds["eval_baselines"] = time.perf_counter() - t
    for method in s.methods:
        t = time.perf_counter()
        _log(f"unlearning with {method}")
        model_dir = out / "models" / method
        _train("forget", str(corrupted), corruption, retain, method, model_dir, s.unlearn, s.seed)
        seconds[f"unlearn_{method}"] = time.perf_counter() - t
        t = time.perf_counter()
        evaluate(str(model_dir), evals / method, facts, setup, clean_eval, corrupted_eval, s.eval,
                 "unlearned", method, progress=progress)  # fmt: skip
        seconds[f"eval_{method}"] = time.perf_counter() - t
    dirs = [clean_eval, corrupted_eval, *(evals / m for m in s.methods)]
    summary = build_report([str(d) for d in dirs], out / "report")
    result = {
        "report": summary,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "cost": stage_costs(out, s.methods),
    }
    atomic_write_json(
        out / "run.json",
        {"seconds": result["seconds"], "cost": result["cost"], "methods": s.methods},
    )
    return result


def stage_costs(out: Path, methods: list[str]) -> dict[str, float]:
    """What each stage cost when it ran, read off what it wrote (a training run's manifest, an
    evaluation's results), so a rerun that reuses finished stages still reports their cost."""

    def read(path: Path, key: str) -> float | None:
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (OSError, json.JSONDecodeError):
            return None
        return round(float(value), 1) if isinstance(value, (int, float)) else None

    evals, models = out / "evals", out / "models"
    items = {
        "select": read(evals / "select" / "results.json", "seconds"),
        "corrupt": read(models / "corrupted" / "unlearn.json", "wall_seconds"),
        "eval_clean": read(evals / "clean" / "results.json", "seconds"),
        "eval_corrupted": read(evals / "corrupted" / "results.json", "seconds"),
    }
    for m in methods:
        items[f"unlearn_{m}"] = read(models / m / "unlearn.json", "wall_seconds")
        items[f"eval_{m}"] = read(evals / m / "results.json", "seconds")
    return {k: v for k, v in items.items() if v is not None}
