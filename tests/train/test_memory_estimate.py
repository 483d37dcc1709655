"""`--dry-run`'s memory estimate (unlearn.train.memory): exact parameter counts, what each setting
adds or removes, and a clear answer when the model's config cannot be read. Its accuracy against
measured peaks on SmolLM2 is benchmarks/memory_estimate.py's (docs/results/scale.md)."""

from __future__ import annotations

import pytest

import unlearn

GIB = 1024**3


def _estimate(tiny_model_dir, qa_files, tmp_path, *overrides, method="npo"):
    forget, retain = qa_files
    plan = unlearn.forget(
        str(tiny_model_dir), str(forget), str(retain), method, str(tmp_path / "o"),
        overrides=["train.batch_size=4", *overrides], dry_run=True,
    )  # fmt: skip
    return plan.memory()


def test_counts_are_exact_and_each_setting_moves_its_part(
    tiny_model_dir, qa_files, tmp_path, monkeypatch, one_torch_thread
):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    n = sum(p.numel() for p in model.parameters())
    base = _estimate(tiny_model_dir, qa_files, tmp_path)
    parts = base["parts_gib"]
    assert base["parameters"] == n and base["trainable_parameters"] == n
    assert parts["weights"] == pytest.approx(n * 4 / GIB, rel=1e-3)
    assert parts["optimizer"] == pytest.approx(2 * parts["gradients"], rel=1e-3)
    assert parts["frozen_copies"] == 0 and parts["cached_reference"] == 0  # NPO caches log-probs
    assert base["peak_gib"] >= max(base["phases_gib"].values()) - 1e-9 > 0

    kl = _estimate(tiny_model_dir, qa_files, tmp_path, "method.retain_loss=kl")
    assert kl["parts_gib"]["frozen_copies"] == pytest.approx(parts["weights"], rel=1e-3)
    assert kl["parts_gib"]["activations_retain"] > parts["activations_retain"]

    lora = _estimate(tiny_model_dir, qa_files, tmp_path, "model.adapter=lora", "lora.r=4")
    res = unlearn.forget(
        str(tiny_model_dir), str(qa_files[0]), str(qa_files[1]), "npo", str(tmp_path / "l"),
        overrides=["model.adapter=lora", "lora.r=4", "train.max_steps=1", "train.progress=false",
                   "train.nll_check=false"],
    )  # fmt: skip
    assert lora["trainable_parameters"] == res.manifest["adapter"]["trainable_parameters"]
    assert lora["parts_gib"]["optimizer"] < parts["optimizer"] / 10
    lora_kl = _estimate(
        tiny_model_dir, qa_files, tmp_path, "model.adapter=lora", "method.retain_loss=kl"
    )
    assert lora_kl["parts_gib"]["frozen_copies"] == 0  # the adapters switched off, no copy

    gc = _estimate(tiny_model_dir, qa_files, tmp_path, "train.gradient_checkpointing=true")
    assert gc["parts_gib"]["activations_forget"] < parts["activations_forget"]
    chunked = _estimate(tiny_model_dir, qa_files, tmp_path, "train.logits_chunk=2")
    assert chunked["parts_gib"]["activations_forget"] < parts["activations_forget"]

    undial = _estimate(tiny_model_dir, qa_files, tmp_path, method="undial")
    assert undial["parts_gib"]["cached_reference"] > 0  # the starting model's logits, N x T' x V

    monkeypatch.setenv("WORLD_SIZE", "2")
    sharded = _estimate(tiny_model_dir, qa_files, tmp_path, "train.sharding=fsdp2")
    assert sharded["processes"] == 2
    assert sharded["parts_gib"]["optimizer"] == pytest.approx(parts["optimizer"] / 2, rel=1e-3)
    assert sharded["parts_gib"]["sharding_gathered"] > 0


def test_a_model_whose_config_cannot_be_read_says_why(qa_files, tmp_path):
    memory = _estimate("some-org/not-here", qa_files, tmp_path)
    assert memory["peak_gib"] is None
    assert "could not read some-org/not-here's config" in memory["error"]
    assert "\n" not in memory["error"]
