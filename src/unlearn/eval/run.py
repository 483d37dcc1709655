"""`unlearn eval`: run the model once per dataset, save records, score every metric from them.

Output folder:
  results.json         metrics, skipped metrics with reasons, per-example values, dataset ids/hashes,
                       the resolved evaluation settings, and (only with `examples=N`) N examples'
                       text per set for `unlearn report --show-examples`
  records/<set>.jsonl  per-example records (ids, hashes, scores, generations) for re-scoring and
                       for use as another model's `--reference`
Scoring is `unlearn.eval.scoring.score_suite`, a pure function of records; a comparison with a
reference model reads the reference's saved records and never runs that model again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from unlearn.config import EvalConfig, PromptConfig, to_dict
from unlearn.errors import UnlearnError
from unlearn.eval.scoring import score_suite
from unlearn.eval.suites.builders import (
    BENCHMARKS,
    EvalSet,
    Suite,
    custom_suite,
    people_suite,
    tofu_suite,
)
from unlearn.outputs import atomic_write_json, atomic_write_text

__all__ = ["build_suite", "check_reference", "load_records", "run_evaluation", "run_records"]
__all__ += ["score_suite"]

RESULTS = "results.json"
RECORDS = "records"


# ---------------------------------------------------------------------------- running the model
def run_records(
    model,
    formatter,
    suite: Suite,
    max_new_tokens: int = 200,
    batch_size: int = 32,
    progress: bool = True,
    mia_gradnorm: bool = False,
    score_end: bool = True,
    generation_batch: int | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Per dataset, one pass over its prompts serves teacher forcing and generation -> records.

    `score_end`: score the end-of-turn marker after each answer (the TOFU protocol), or the
    answer text only. `mia_gradnorm` adds each forget/holdout example's gradient norm (one
    backward pass each).
    """
    from tqdm.auto import tqdm

    from unlearn.eval.gradnorm import grad_norms
    from unlearn.eval.records import PassStats, ScoreItem, score, score_and_generate

    gen_batch = {"generation_batch": generation_batch} if generation_batch else {}
    stats = PassStats()
    out: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(suite.sets, desc="eval", unit="set", disable=not progress)
    for s in bar:
        bar.set_postfix_str(s.name)
        if s.kind == "text":
            docs = [ScoreItem(None, r["text"], detail=True) for r in s.rows]
            scores = score(model, formatter, docs, batch_size=batch_size, stats=stats)
            out[s.name] = [
                {"id": r["id"], "sha256": r["sha256"], "answer": sc.to_dict()}
                for r, sc in zip(s.rows, scores, strict=True)
            ]
            if mia_gradnorm and s.name in ("forget", "holdout"):
                for rec, g in zip(out[s.name], grad_norms(model, formatter, docs), strict=True):
                    rec["grad_norm"] = g
            continue
        items: list[ScoreItem] = []
        layout: list[tuple[int, str, int]] = []  # (row, variant, index within variant)
        for i, r in enumerate(s.rows):
            items.append(ScoreItem(r["question"], r["answer"], detail=True))
            layout.append((i, "answer", 0))
            if r.get("paraphrased_answer"):
                items.append(ScoreItem(r["question"], r["paraphrased_answer"]))
                layout.append((i, "paraphrased", 0))
            for k, p in enumerate(r.get("perturbed_answer") or []):
                items.append(ScoreItem(r["question"], p))
                layout.append((i, "perturbed", k))
        # holdout sets only feed membership inference: no generation
        questions = [r["question"] for r in s.rows] if s.role != "holdout" else []
        scores, gens = score_and_generate(
            model,
            formatter,
            items,
            questions,
            max_new_tokens,
            batch_size,
            stats=stats,
            score_end=score_end,
            **gen_batch,
        )
        recs: list[dict[str, Any]] = [{"id": r["id"], "sha256": r["sha256"]} for r in s.rows]
        for (i, variant, _k), sc in zip(layout, scores, strict=True):
            d = sc.to_dict()
            if variant == "perturbed":
                recs[i].setdefault("perturbed", []).append(d)
            else:
                recs[i][variant] = d
        for rec, g in zip(recs if questions else [], gens, strict=True):
            rec["generation"] = g
        if mia_gradnorm and s.name in ("forget", "holdout"):
            answers = [ScoreItem(r["question"], r["answer"]) for r in s.rows]
            norms = grad_norms(model, formatter, answers, score_end=score_end)
            for rec, g in zip(recs, norms, strict=True):
                rec["grad_norm"] = g
        out[s.name] = recs
    info = {
        "padding_efficiency": round(stats.efficiency, 4),
        "scored_sequences": stats.sequences,
        "forward_batches": stats.batches,
        "forward_tokens": stats.padded_tokens,
        "generated_tokens": stats.generated,
        "truncated": stats.truncated,
    }
    return out, info


# ---------------------------------------------------------------------------- files
def load_records(eval_dir: str | Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """A finished evaluation's results.json and its records."""
    root = Path(eval_dir)
    res = root / RESULTS
    if not res.is_file():
        raise UnlearnError(f"{root} has no {RESULTS}; run `unlearn eval ... --output {root}` first")
    results = json.loads(res.read_text())
    records = {}
    for f in sorted((root / RECORDS).glob("*.jsonl")):
        records[f.stem] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return results, records


def check_reference(suite: Suite, ref_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Load a reference evaluation and make sure it scored exactly the same examples."""
    results, records = load_records(ref_dir)
    for s in suite.sets:
        if s.name not in ("forget", "holdout"):
            continue
        theirs = records.get(s.name)
        if theirs is None:
            raise UnlearnError(
                f"reference {ref_dir} has no '{s.name}' records; evaluate it on the same benchmark"
            )
        mine = list(zip(s.ids, s.hashes, strict=True))
        if [(r["id"], r["sha256"]) for r in theirs] != mine:
            raise UnlearnError(
                f"reference {ref_dir} was evaluated on different '{s.name}' data (ids/hashes differ: "
                f"{results.get('benchmark')}/{results.get('split')}); evaluate the reference on the same split"
            )
    return records


def check_output(out: Path, overwrite: bool) -> None:
    """An evaluation goes into an empty (or new) folder; a non-empty one needs `overwrite`."""
    if out.exists() and not out.is_dir():
        raise UnlearnError(f"--output {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "an evaluation" if (out / RESULTS).is_file() else "files"
        raise UnlearnError(
            f"--output {out} already holds {what}; pass --overwrite to replace the evaluation "
            "there, or choose another folder"
        )


def _write_outputs(out: Path, records: dict[str, list[dict[str, Any]]], results: dict) -> None:
    """Records and results.json; records of sets this evaluation did not score are removed, so a
    folder never mixes two evaluations."""
    out.mkdir(parents=True, exist_ok=True)
    for set_name, recs in records.items():
        atomic_write_text(
            out / RECORDS / f"{set_name}.jsonl", "".join(json.dumps(r) + "\n" for r in recs)
        )
    for stale in (out / RECORDS).glob("*.jsonl"):
        if stale.stem not in records:
            stale.unlink()
    atomic_write_json(out / RESULTS, results)


def _examples(suite: Suite, records: dict[str, list[dict[str, Any]]], n: int) -> dict:
    """The first `n` rows of each generated set, with text: only when the user asked (privacy)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for s in suite.sets:
        recs = records.get(s.name, [])
        if n <= 0 or s.kind != "qa" or not recs or "generation" not in recs[0]:
            continue
        out[s.name] = [
            {"id": r["id"], "question": r["question"], "answer": r["answer"], "generation": g}
            for r, g in zip(s.rows[:n], (rec["generation"] for rec in recs[:n]), strict=True)
        ]
    return out


def run_evaluation(
    cfg: EvalConfig, suite: Suite | None = None, progress: bool = True
) -> dict[str, Any]:
    """Evaluate `cfg.model` as `cfg` says; write results.json and records to `cfg.output`.

    `suite` overrides the benchmark settings with a prebuilt suite (the demo uses its own sizes).
    Returns the results (what results.json holds).
    """
    t0 = time.time()
    if not cfg.model.name:
        raise UnlearnError("no model to evaluate; pass --model (a folder, hub id, .gguf or alias)")
    if not cfg.output:
        raise UnlearnError("no output folder; pass --output FOLDER")
    suite = suite or build_suite(
        cfg.benchmark, cfg.split, cfg.data_dir, cfg.forget, cfg.retain, cfg.holdout, cfg.limit
    )
    ref_records = check_reference(suite, cfg.reference) if cfg.reference else None
    out = Path(cfg.output)
    from unlearn.models import (
        hash_model_files,
        load_model_and_tokenizer,
        local_folder,
        resolve_model,
    )
    from unlearn.prompts import PromptFormatter

    mcfg = cfg.model
    resolved = resolve_model(mcfg)
    if resolved.kind == "local" and out.resolve() == Path(resolved.path).resolve():
        raise UnlearnError("--output must not be the model folder itself")
    check_output(out, cfg.overwrite)
    lm, tok, resolved = load_model_and_tokenizer(mcfg)
    prompt = cfg.prompt.resolve(_prompt_for(resolved))
    formatter = PromptFormatter(tok, prompt)
    records, info = run_records(
        lm,
        formatter,
        suite,
        cfg.generation.max_new_tokens,
        32,  # teacher-forced rows per batch (also capped at 4096 tokens)
        progress,
        cfg.mia_gradnorm,
        cfg.score.end_of_turn,
        generation_batch=cfg.generation.batch_size,
    )
    metrics, skipped, per_example = score_suite(suite, records, ref_records)
    folder = local_folder(resolved, mcfg)
    model_path = folder if resolved.kind in ("local",) else None
    results: dict[str, Any] = {
        "name": cfg.name or out.name,
        "model": {
            "spec": mcfg.name,
            "kind": resolved.kind,
            "sha256": hash_model_files(folder) if resolved.kind != "hub" else None,
        },
        "model_path": model_path,
        "benchmark": suite.benchmark,
        "split": suite.split,
        "reference": str(cfg.reference) if cfg.reference else None,
        "settings": {
            "prompt": to_dict(prompt),
            "generation": to_dict(cfg.generation),
            "score": to_dict(cfg.score),
            "model": {"dtype": mcfg.dtype, "device": mcfg.device},
        },
        "metrics": metrics,
        "skipped": skipped,
        "per_example": per_example,
        "datasets": {
            s.name: {
                "source": s.source,
                "n": len(s.rows),
                "kind": s.kind,
                "ids_sha256": _ids_hash(s),
            }
            for s in suite.sets
        },
        "pass": info,
        "seconds": round(time.time() - t0, 2),
    }
    if cfg.examples:
        results["examples"] = _examples(suite, records, cfg.examples)
    _write_outputs(out, records, results)
    return results


def _ids_hash(s: EvalSet) -> str:
    from unlearn.data import content_hash

    return content_hash(*(f"{i}:{h}" for i, h in zip(s.ids, s.hashes, strict=True)))


def _prompt_for(resolved) -> PromptConfig | None:
    """The prompt format the model was trained with, when its manifest says so (else None)."""
    manifest = Path(resolved.path) / "unlearn.json"
    if resolved.kind == "local" and manifest.is_file():
        cfg = json.loads(manifest.read_text()).get("config", {}).get("prompt")
        if cfg:
            return PromptConfig(**cfg)
    return None


def build_suite(
    benchmark: str,
    split: str | None = None,
    data_dir: str | None = None,
    forget: str | None = None,
    retain: str | None = None,
    holdout: str | None = None,
    limit: int | None = None,
) -> Suite:
    """The suite for a benchmark name; custom files are used when --forget is given."""
    if forget is not None:
        return custom_suite(forget, retain, holdout)
    if benchmark == "tofu":
        return tofu_suite(split or "forget01", data_dir, limit)
    if benchmark == "people":
        return people_suite()
    if benchmark == "custom":
        raise UnlearnError(
            "benchmark 'custom' needs --forget FILE (and optionally --retain, --holdout)"
        )
    raise UnlearnError(f"unknown benchmark '{benchmark}'; choose one of {', '.join(BENCHMARKS)}")
