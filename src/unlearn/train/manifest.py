"""What a finished run records about itself (`unlearn.json`): where the model and data came from
(ids and hashes, never the forget text), the settings, the seconds of every phase, the numbers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from unlearn.config import DataConfig
from unlearn.data import Example, dataset_hash, manifest_entries

#: Where `unlearn forget` writes its localization (mask, summary, heatmap) inside the run folder.
LOCALIZATION_DIR = "localization"


def base_model_record(resolved, cache: Path) -> dict[str, Any]:
    from unlearn.models import source_sha256

    record: dict[str, Any] = {"spec": resolved.spec, "kind": resolved.kind}
    record["sha256"] = source_sha256(resolved, cache)
    if resolved.kind in ("alias", "gguf"):
        record["hashed"] = Path(resolved.path).name
    elif resolved.kind == "hub":
        record["note"] = "hub model: identified by id and revision"
    return record


def localization_record(loc) -> dict[str, Any] | None:
    if loc is None:
        return None
    keep = ("method", "selected", "scored", "fraction", "seconds", "peak_memory_mb", "experts")
    record = {k: loc.info[k] for k in keep if k in loc.info}
    record["folder"] = LOCALIZATION_DIR
    record["train_all"] = loc.train_all
    record["noise_tensors"] = len(loc.noise)
    if "loaded_from" in loc.info:
        record["loaded_from"] = loc.info["loaded_from"]
    return record


class Clock:
    """Wall seconds per phase of a run (a phase seen twice, like the NLL check, adds up)."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self.mark, 2)
        self.mark = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


def data_record(cfg: DataConfig | None, examples: list[Example] | None) -> dict[str, Any]:
    assert cfg is not None and examples is not None
    return {
        "source": cfg.path,
        "kind": examples[0].kind,
        "n": len(examples),
        "sha256": dataset_hash(examples),
        "examples": manifest_entries(examples),
    }


def request_chain(
    resolved,
    base: dict[str, Any],
    command: str,
    forget: dict,
    applied: dict[str, Any],
) -> list:
    """The deletion requests applied to this model, oldest first: the input model's chain (from its
    unlearn.json, when it is a folder this framework wrote) plus this run. Each entry names the
    forget set by its hash, size and example ids/hashes, never its text; `applied` holds the
    request id, method, hyperparameters, the numbers measured after it, and the weights' hashes
    before and after (`weights_sha256`), which `unlearn audit` checks link up."""
    chain: list[dict[str, Any]] = []
    manifest = Path(resolved.path) / "unlearn.json"
    if resolved.kind == "local" and manifest.is_file():
        try:
            chain = list(json.loads(manifest.read_text(encoding="utf-8")).get("requests") or [])
        except (OSError, json.JSONDecodeError):
            chain = []
    if command != "forget":
        return chain  # fine-tuning adds knowledge; it is not a deletion request
    chain.append(
        {
            "index": len(chain) + 1,
            "request": applied.get("request"),
            "method": applied.get("method"),
            "hyperparameters": applied.get("hyperparameters"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base_model_sha256": base.get("sha256"),
            "weights_before": applied.get("weights_before"),
            "weights_after": applied.get("weights_after"),
            "forget": {k: forget[k] for k in ("kind", "n", "sha256", "examples")},
            "metrics": applied.get("metrics"),
        }
    )
    return chain
