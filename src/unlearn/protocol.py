"""MUSE's scalability and sustainability protocols: unlearning stage after stage, evaluated each time.

- scalability: forget sets of growing size (nested: stage k holds the first k parts), each
  unlearned from the same target, to see whether a method holds up as the forget set grows.
- sustainability: disjoint forget sets unlearned one after another, each from the previous stage's
  model, to see whether utility survives a stream of deletion requests.

Stage k writes OUT/stage_k/{model, eval}; OUT/stage_0/eval is the starting model's evaluation.
A finished stage (its eval/results.json) is never redone, so an interrupted protocol resumes
where it stopped; the training of an interrupted stage resumes from its checkpoint.
OUT/protocol.json (rewritten atomically after every stage) lists the stages with their forget
sets' sizes and hashes and their headline metrics; each stage's model folder keeps the chain of
requests applied to it (`unlearn.json` "requests"). A stage's forget file (a copy of its part of
the user's data, needed to train) is deleted once the stage's model is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn.data import content_hash, read_rows
from unlearn.errors import UnlearnError
from unlearn.outputs import atomic_write_json, atomic_write_text

KINDS = ("scalability", "sustainability")
PROTOCOL = "protocol.json"


@dataclass
class Protocol:
    """What a protocol run does (the settings are recorded in protocol.json)."""

    kind: str
    model: str
    forget: list[str]  # one file per stage, or one file cut into `stages` parts
    retain: str | None
    method: str
    output: str
    stages: int | None = None
    train_overrides: list[str] = field(default_factory=list)
    eval_fields: dict[str, Any] = field(default_factory=dict)
    eval_overrides: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.kind not in KINDS:
            raise UnlearnError(f"unknown protocol '{self.kind}'; choose one of {', '.join(KINDS)}")
        if not self.forget:
            raise UnlearnError(
                "a protocol needs --forget FILE (one per stage, or one with --stages)"
            )
        if self.stages is not None and (len(self.forget) != 1 or self.stages < 2):
            raise UnlearnError("--stages K (K >= 2) cuts one --forget file into K parts")
        if self.stages is None and len(self.forget) < 2:
            raise UnlearnError(
                "a protocol needs 2 or more stages: several --forget files, or --stages K"
            )


def stage_sets(p: Protocol) -> list[list[Any]]:
    """The forget rows of every stage: the user's files as given, or one file cut into parts
    (scalability: the first k parts; sustainability: part k)."""
    if p.stages is None:
        return [read_rows(f) for f in p.forget]
    # each row keeps its place in the whole file as its id, so every stage's requests name it alike
    rows = [{"id": str(i), **r} for i, r in enumerate(read_rows(p.forget[0]))]
    if len(rows) < p.stages:
        raise UnlearnError(f"{p.forget[0]} has {len(rows)} rows, fewer than --stages {p.stages}")
    bounds = [round(len(rows) * k / p.stages) for k in range(p.stages + 1)]
    parts = [rows[bounds[k] : bounds[k + 1]] for k in range(p.stages)]
    if p.kind == "scalability":
        return [rows[: bounds[k + 1]] for k in range(p.stages)]
    return parts


def _digest(rows: list[Any]) -> str:
    return content_hash(*(json.dumps(r, sort_keys=True) for r in rows))


def run_protocol(p: Protocol, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every stage; return what protocol.json holds."""
    from unlearn import jobs as unlearn

    p.check()
    out = Path(p.output)
    sets = stage_sets(p)
    state_path = out / PROTOCOL
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    settings = {
        "kind": p.kind, "model": p.model, "method": p.method, "retain": p.retain,
        "stage_sha256": [_digest(s) for s in sets], "train_overrides": p.train_overrides,
        "eval": {**p.eval_fields, "overrides": p.eval_overrides},
    }  # fmt: skip
    if state is not None and state.get("settings") != settings:
        raise UnlearnError(
            f"{out} holds a protocol run with other settings; choose another --output or delete it"
        )
    state = state or {"settings": settings, "stages": []}
    done = {s["stage"]: s for s in state["stages"]}

    def evaluate(model: str, folder: Path) -> dict[str, Any]:
        if (folder / "results.json").is_file():
            return json.loads((folder / "results.json").read_text())
        return unlearn.evaluate(
            model, str(folder), overrides=p.eval_overrides, overwrite=True, progress=progress,
            name=folder.parent.name, **p.eval_fields,
        )  # fmt: skip

    def record(stage: int, n: int, sha: str | None, model: str, res: dict) -> None:
        keys = res.get("headline") or list(res["metrics"])
        done[stage] = {
            "stage": stage, "forget_n": n, "forget_sha256": sha, "model": model,
            "eval": str(out / f"stage_{stage}" / "eval"),
            "metrics": {k: res["metrics"][k] for k in keys if k in res["metrics"]},
        }  # fmt: skip
        state["stages"] = [done[k] for k in sorted(done)]
        atomic_write_json(state_path, state)

    out.mkdir(parents=True, exist_ok=True)
    if 0 not in done:
        record(0, 0, None, p.model, evaluate(p.model, out / "stage_0" / "eval"))
    start = p.model
    for k, rows in enumerate(sets, start=1):
        folder = out / f"stage_{k}"
        model_dir = folder / "model"
        if k not in done:
            if not (model_dir / "unlearn.json").is_file():
                data = folder / "forget.json"
                atomic_write_text(data, json.dumps(rows))
                resume = (model_dir / "checkpoints").is_dir()
                unlearn.forget(
                    start, str(data), p.retain, p.method, str(model_dir),
                    overrides=[
                        *p.train_overrides,
                        *(["forget.id_key=id"] if p.stages is not None else []),
                        f"train.progress={str(progress).lower()}",
                    ],
                    overwrite=not resume, resume=resume or None,
                )  # fmt: skip
                data.unlink()
            record(
                k,
                len(rows),
                _digest(rows),
                str(model_dir),
                evaluate(str(model_dir), folder / "eval"),
            )
        if p.kind == "sustainability":
            start = str(model_dir)
    write_curves(out, state)
    return state


def write_curves(out: Path, state: dict[str, Any]) -> None:
    """protocol.md (a table) and protocol.png (each headline metric against the forget-set size
    for scalability, the stage for sustainability)."""
    from unlearn.report.figures import grid as _grid
    from unlearn.report.figures import png as _png

    stages = state["stages"]
    kind = state["settings"]["kind"]
    keys = list(dict.fromkeys(k for s in stages for k in s["metrics"]))
    x_label = "forget set size" if kind == "scalability" else "stage (requests applied)"
    xs = [s["forget_n"] if kind == "scalability" else s["stage"] for s in stages]
    lines = [
        f"# {kind.capitalize()}: {state['settings']['method']} from {state['settings']['model']}",
        "",
        "| stage | forget rows | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for s in stages:
        vals = [s["metrics"].get(k) for k in keys]
        cells = ["n/a" if v is None else f"{v:.4g}" for v in vals]
        lines.append(f"| {s['stage']} | {s['forget_n']} | " + " | ".join(cells) + " |")
    atomic_write_text(out / "protocol.md", "\n".join(lines) + "\n")
    fig, axes = _grid(len(keys), 3.4, 2.6)
    for ax, k in zip(axes, keys, strict=False):
        pts = [(x, s["metrics"][k]) for x, s in zip(xs, stages, strict=True) if k in s["metrics"]]
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o")
        ax.set_title(k, fontsize=8)
        ax.set_xlabel(x_label, fontsize=7)
    (out / "protocol.png").write_bytes(_png(fig))
