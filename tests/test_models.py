"""Model placement and identity: which dtype and device a run gets, and hashing weights once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from unlearn import models
from unlearn.config import ModelConfig
from unlearn.errors import UnlearnError
from unlearn.models import local_cuda_device, pick_device, resolve_dtype

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    "requested, stored, device, bf16_ok, expected, noted",
    [
        ("auto", "bfloat16", CPU, False, torch.float32, False),  # float32 on CPU, always
        ("auto", "bfloat16", GPU, True, torch.bfloat16, False),  # the checkpoint's dtype on GPU
        ("auto", "float16", GPU, True, torch.float16, False),
        ("auto", "float32", GPU, True, torch.float32, False),
        ("auto", "torch.bfloat16", GPU, True, torch.bfloat16, False),  # old configs' spelling
        ("auto", "bfloat16", GPU, False, torch.float32, True),  # no bf16 on this GPU: say so
        ("auto", None, GPU, True, torch.float32, True),  # unknown: float32, with a note
        ("float32", "bfloat16", GPU, True, torch.float32, False),  # asked for: that
        ("bfloat16", None, CPU, False, torch.bfloat16, False),
    ],
)
def test_auto_dtype_is_the_checkpoints_on_gpu(requested, stored, device, bf16_ok, expected, noted):
    dtype, note = resolve_dtype(requested, stored, device, bf16_ok)
    assert dtype == expected
    assert bool(note) == noted


def test_impossible_dtypes_are_one_line_errors():
    with pytest.raises(UnlearnError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", None, CPU, False)
    with pytest.raises(UnlearnError, match="does not support bfloat16"):
        resolve_dtype("bfloat16", None, GPU, False)


def _fake_gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_each_launched_process_loads_onto_its_own_gpu(monkeypatch):
    # Under `accelerate launch` every rank used to load onto cuda (= GPU 0) before accelerate existed.
    _fake_gpus(monkeypatch, 4)
    for spec in ("auto", "cuda"):
        cfg = ModelConfig(device=spec)
        assert pick_device(cfg, {"LOCAL_RANK": "2"}) == torch.device("cuda", 2)
        assert pick_device(cfg, {}) == torch.device("cuda", 0)  # a plain single process
    assert pick_device(ModelConfig(device="cpu"), {"LOCAL_RANK": "2"}) == CPU
    with pytest.raises(UnlearnError, match="LOCAL_RANK=5 but only 4 GPU"):
        local_cuda_device({"LOCAL_RANK": "5"}, 4)
    # a launcher that gives each process one visible GPU
    assert local_cuda_device({"LOCAL_RANK": "3"}, 1) == torch.device("cuda", 0)


def test_no_gpu_means_cpu_for_auto_and_an_error_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(ModelConfig(device="auto"), {"LOCAL_RANK": "1"}) == CPU
    with pytest.raises(UnlearnError, match="no CUDA GPU is visible"):
        pick_device(ModelConfig(device="cuda"), {})


def test_load_uses_the_checkpoint_dtype_on_the_local_gpu(monkeypatch, tiny_model_dir, tmp_path):
    """The loader with fakes for CUDA: dtype=auto reads config.json, the model goes to cuda:LOCAL_RANK."""
    folder = tmp_path / "bf16-model"
    shutil.copytree(tiny_model_dir, folder)
    conf = json.loads((folder / "config.json").read_text())
    conf.pop("torch_dtype", None)
    conf["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(conf))
    seen: dict = {}

    class FakeModel:
        def to(self, device):
            seen["device"] = device
            return self

    def fake_load(source, dtype=None, **kwargs):
        seen["dtype"] = dtype
        return FakeModel()

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_load)
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    for bf16_ok, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "_bf16_ok", lambda device, ok=bf16_ok: ok)
        models.load_model_and_tokenizer(ModelConfig(name=str(folder)))
        assert seen == {"dtype": expected, "device": torch.device("cuda", 1)}
    placement = models.describe_placement(
        ModelConfig(name=str(folder)), models.resolve_model(ModelConfig(name=str(folder)))
    )
    assert placement["device"] == "cuda:1" and placement["dtype"] == "float32"
    assert "bfloat16" in placement["note"]


def test_model_hash_is_cached_by_path_size_and_mtime(monkeypatch, tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    expected = hashlib.sha256()  # the digest as it was always computed: names and bytes in order
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".json"):
            expected.update(f.name.encode())
            expected.update(f.read_bytes())
    reads = []
    real_feed = models._feed
    monkeypatch.setattr(models, "_feed", lambda h, p: (reads.append(p.name), real_feed(h, p)))
    cache = tmp_path / "cache"
    first = models.hash_model_files(str(folder), cache)
    assert first == expected.hexdigest() and reads
    reads.clear()
    assert models.hash_model_files(str(folder), cache) == first
    assert reads == []  # the second run reads no weights
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    os.utime(weights, ns=(1, 1))
    assert models.hash_model_files(str(folder), cache) != first  # a changed file is re-hashed
    assert "model.safetensors" in reads
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" * 100)
    assert models.file_sha256(gguf, cache) == hashlib.sha256(b"GGUF" * 100).hexdigest()
    reads.clear()
    assert models.file_sha256(gguf, cache) == hashlib.sha256(b"GGUF" * 100).hexdigest()
    assert reads == []
