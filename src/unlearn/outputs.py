"""Output folders: refusing to clobber data, writing files atomically, and the run manifest.

A run's folder holds a loadable HF model (safetensors), `config.yaml` (the resolved config) and
`unlearn.json` (the manifest). The manifest is written last, so its presence means the run
finished; a folder with checkpoints but no manifest is an interrupted run that `--resume` continues.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unlearn.errors import UnlearnError

MANIFEST = "unlearn.json"
CONFIG_FILE = "config.yaml"
_OURS = (MANIFEST, CONFIG_FILE, "checkpoints", "logs", "localization")


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (safetensors, savefig);
    renamed onto `path` only if the block finishes, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def prepare_output(output: str, model_path: str | None, overwrite: bool, resume: bool) -> Path:
    """Check the output folder before any work: never the input model, never someone else's files."""
    if not output:
        raise UnlearnError("no output folder given; pass --output DIR")
    out = Path(output).expanduser()
    if model_path and Path(model_path).exists():
        src = Path(model_path).resolve()
        if out.resolve() == src or src in out.resolve().parents:
            raise UnlearnError(
                f"output folder {out} is (inside) the input model {src}; the input model is never "
                "modified, choose another --output"
            )
    if out.exists() and not out.is_dir():
        raise UnlearnError(f"output {out} exists and is a file; choose a folder path")
    if not out.exists() or not any(out.iterdir()):
        return out
    names = {p.name for p in out.iterdir()}
    if resume:
        if (out / MANIFEST).is_file():
            raise UnlearnError(
                f"{out} already holds a finished run; use --overwrite to redo it, or another --output"
            )
        if (out / "checkpoints").is_dir():
            return out
        raise UnlearnError(f"--resume given, but {out} has no checkpoints to resume from")
    if overwrite:
        if not names & set(_OURS):
            raise UnlearnError(
                f"refusing to --overwrite {out}: it is not empty and does not look like an unlearn "
                "output (no unlearn.json, config.yaml, checkpoints or logs); delete it yourself"
            )
        shutil.rmtree(out)
        return out
    hint = " or --resume to continue it" if (out / "checkpoints").is_dir() else ""
    raise UnlearnError(
        f"output folder {out} is not empty; pass --overwrite to replace it{hint}, or choose another"
    )


def save_model(model, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """Save weights and tokenizer into `out` file by file through a staging folder; `state_dict`:
    the weights to write when the model's own are shards (FSDP2, gathered by the caller)."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=out))
    try:
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def versions() -> dict[str, str]:
    """Versions that change numbers: recorded so a result can be reproduced."""
    import accelerate
    import torch
    import transformers

    from unlearn import __version__

    return {
        "unlearn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
