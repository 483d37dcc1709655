"""LoRA unlearning (model.adapter=lora): only adapter weights train, the starting model is the same
network with adapters off, the merged model is base + scale * B A, adapter folders load as models,
resume is bitwise, and the errors are one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import unlearn
from unlearn.cli import main
from unlearn.errors import UnlearnError

FAST = ["train.progress=false", "train.batch_size=2", "train.nll_check=false"]
LORA = ["model.adapter=lora", "lora.r=4", "lora.alpha=8", "lora.dropout=0"]


def _lora_run(target_dir, qa_files, out, method="npo", extra=(), merge=False, resume=False):
    forget, retain = qa_files
    return unlearn.forget(
        str(target_dir), str(forget), str(retain), method, str(out),
        overrides=[*FAST, *LORA, "train.lr=1e-2", *extra], merge=merge, resume=resume,
    )  # fmt: skip


def test_only_adapters_train_and_the_merged_model_is_base_plus_scaled_ba(
    target_dir, qa_files, tmp_path, one_torch_thread
):
    from unlearn.models import hash_model_files

    before = hash_model_files(str(target_dir))
    out = tmp_path / "lora"
    res = _lora_run(target_dir, qa_files, out, "grad_diff", ["train.max_steps=2"], merge=True)
    adapter = res.manifest["adapter"]
    assert adapter["kind"] == "lora" and adapter["r"] == 4 and adapter["merged"] is True
    assert set(adapter["module_types"]) >= {"q_proj", "down_proj"}  # every linear layer
    base = load_file(str(target_dir / "model.safetensors"))
    lora = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()  # else transformers applies it again
    scale = 8 / 4
    changed = 0
    for name, w in base.items():
        module = name.removesuffix(".weight")
        a = lora.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            assert torch.equal(merged[name], w), name  # no adapter: untouched
            continue
        b = lora[f"base_model.model.{module}.lora_B.weight"]
        assert torch.allclose(merged[name], w + scale * b @ a, atol=1e-6), name
        changed += bool((b != 0).any())
    assert changed > 0
    assert hash_model_files(str(target_dir)) == before  # the input model is only read


def test_every_adapter_weight_gets_a_gradient_and_base_weights_none(target_dir, one_torch_thread):
    from transformers import AutoModelForCausalLM

    from unlearn import adapters
    from unlearn.config import LoraSettings

    model = adapters.wrap(
        AutoModelForCausalLM.from_pretrained(str(target_dir)), LoraSettings(r=2, dropout=0.0)
    )
    with torch.no_grad():  # B starts at 0, so A's gradient would be 0: give B a value
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    model(input_ids=ids, labels=ids).loss.backward()
    named = dict(model.named_parameters())
    lora = [n for n in named if "lora_" in n]
    assert lora and all(named[n].requires_grad for n in lora)
    assert all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in lora)
    assert all(named[n].grad is None for n in named if "lora_" not in n)


def test_disabled_adapters_are_the_base_model(target_dir, one_torch_thread):
    from transformers import AutoModelForCausalLM

    from unlearn import adapters
    from unlearn.config import LoraSettings

    base = AutoModelForCausalLM.from_pretrained(str(target_dir)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 4, 6, 8, 10, 12]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = adapters.wrap(AutoModelForCausalLM.from_pretrained(str(target_dir)), LoraSettings())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.train()
    view = adapters.DisabledAdapters(model)
    got = view(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert model.training  # the view restores the training mode
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, want, atol=1e-3)  # adapters on


def test_kl_retain_term_uses_the_adapters_off_view_not_a_copy(
    target_dir, qa_files, tmp_path, one_torch_thread, monkeypatch
):
    from unlearn.train import setup

    def no_copy(*a, **k):
        raise AssertionError("a frozen copy was made")

    monkeypatch.setattr(setup, "frozen_copy", no_copy)
    res = _lora_run(
        target_dir,
        qa_files,
        tmp_path / "npo_kl",
        "npo",
        ["train.max_steps=1", "method.retain_loss=kl"],
    )
    assert res.metrics["steps"] == 1


def test_adapter_folder_evaluates_like_its_merged_model(target_dir, qa_files, tmp_path):
    out = tmp_path / "lora"
    _lora_run(target_dir, qa_files, out, "grad_ascent", ["train.max_steps=2"])
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").is_file()
    merged = tmp_path / "merged"
    shutil.copytree(out, merged, ignore=shutil.ignore_patterns("adapter_*"))
    from transformers import AutoModelForCausalLM

    from unlearn.config import ModelConfig
    from unlearn.models import load_model_and_tokenizer

    model, _, resolved = load_model_and_tokenizer(ModelConfig(name=str(out), device="cpu"))
    assert resolved.adapter and "Lora" not in type(model).__name__
    model.save_pretrained(str(merged))  # the merged weights, as a plain model folder
    forget, _ = qa_files
    results = {}
    for name, folder in (("adapter", out), ("merged", merged)):
        code = main(["eval", "--model", str(folder), "--benchmark", "custom", "--forget",
                     str(forget), "--output", str(tmp_path / f"ev_{name}"),
                     "generation.max_new_tokens=4"])  # fmt: skip
        assert code == 0
        results[name] = json.loads((tmp_path / f"ev_{name}" / "results.json").read_text())
    assert results["adapter"]["metrics"] == results["merged"]["metrics"]
    base = AutoModelForCausalLM.from_pretrained(str(target_dir))  # the adapter changed the weights
    assert any(
        not torch.equal(a, b) for a, b in zip(base.parameters(), model.parameters(), strict=True)
    )


def test_adapter_onto_another_base_is_refused(target_dir, tiny_model_dir, qa_files, tmp_path):
    out = tmp_path / "lora"
    _lora_run(target_dir, qa_files, out, "grad_ascent", ["train.max_steps=1"])
    from unlearn.config import ModelConfig
    from unlearn.models import load_model_and_tokenizer

    with pytest.raises(UnlearnError) as err:
        load_model_and_tokenizer(ModelConfig(name=str(out), base=str(tiny_model_dir)))
    msg = str(err.value)
    assert "only applies to its own base model" in msg and "\n" not in msg


@pytest.mark.slow  # an interrupted run and a whole one
def test_resume_of_a_lora_run_is_bitwise_the_uninterrupted_run(target_dir, qa_files, tmp_path):
    whole = tmp_path / "whole"
    _lora_run(target_dir, qa_files, whole, "npo", ["train.max_steps=4"])
    part = tmp_path / "part"

    def stop_after_two(step, logs):
        if step == 2:
            raise KeyboardInterrupt

    forget, retain = qa_files
    with pytest.raises((KeyboardInterrupt, UnlearnError)):
        unlearn.forget(
            str(target_dir), str(forget), str(retain), "npo", str(part),
            overrides=[*FAST, *LORA, "train.lr=1e-2", "train.max_steps=4", "train.save_every=1"],
            callbacks=[stop_after_two],
        )  # fmt: skip
    ckpt = part / "checkpoints" / "step-2"
    saved = load_file(str(ckpt / "model.safetensors"))  # adapters only: the base is the input
    assert saved and all(".lora_" in k for k in saved)
    assert not list(ckpt.glob("pytorch_model*.bin"))
    res = _lora_run(
        target_dir, qa_files, part, "npo", ["train.max_steps=4", "train.save_every=1"], resume=True
    )
    assert res.manifest["resumed_from_step"] == 2
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rmu_puts_adapters_on_the_blocks_it_would_train(
    target_dir, qa_files, tmp_path, one_torch_thread
):
    res = _lora_run(
        target_dir, qa_files, tmp_path / "rmu", "rmu",
        ["train.max_steps=1", "method.layer=1", "method.steering_coeff=1"],
    )  # fmt: skip
    targets = res.manifest["adapter"]["target_modules"]
    assert targets == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_task_vector_negates_the_adapter_delta(target_dir, qa_files, tmp_path, one_torch_thread):
    """Task vector with adapters: fine-tune the adapters as `finetune` does, then B -> -alpha B
    (B starts at 0) and A kept, so the weight delta is -alpha times the fine-tuned one."""
    steps = ["train.max_steps=2"]
    _lora_run(target_dir, qa_files, tmp_path / "ft", "finetune", steps)
    _lora_run(target_dir, qa_files, tmp_path / "tv", "task_vector", [*steps, "method.alpha=2"])
    ft = load_file(str(tmp_path / "ft" / "adapter_model.safetensors"))
    tv = load_file(str(tmp_path / "tv" / "adapter_model.safetensors"))
    assert ft.keys() == tv.keys()
    for k in ft:
        want = -2 * ft[k] if "lora_B" in k else ft[k]
        assert torch.allclose(tv[k], want, atol=1e-6), k
    assert any((ft[k] != 0).any() for k in ft if "lora_B" in k)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["lora.target_modules=[nope_proj]"], "matches no module"),
        (["lora.r=0"], "lora.r must be at least 1"),
        (["localize.method=grin", "localize.noise_std=0.5"], "act on base weights"),
        (["localize.method=uoe"], "trains chosen experts' weights"),
    ],
)
def test_adapter_errors_are_one_line(capsys, target_dir, qa_files, tmp_path, overrides, needle):
    forget, retain = qa_files
    code = main(
        ["forget", "--model", str(target_dir), "--forget", str(forget), "--retain", str(retain),
         "--method", "grad_diff", "--output", str(tmp_path / "o"), *FAST, *LORA,
         "train.max_steps=1", *overrides]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # the lines before it are the weights' loading bar
    assert code != 0 and needle in last and last.startswith("unlearn: error:"), err
    assert "Traceback" not in err


def test_merge_without_an_adapter_is_refused(capsys, target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    code = main(
        ["forget", "--model", str(target_dir), "--forget", str(forget), "--retain", str(retain),
         "--method", "grad_diff", "--output", str(tmp_path / "o"), "--merge", *FAST]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and "model.adapter=lora" in err and "\n" not in err


def test_a_lora_run_on_an_adapter_folder_stacks_and_loads(target_dir, qa_files, tmp_path):
    """A LoRA run started from another LoRA run's output (RESTOR corrupts, then unlearns, both with
    adapters) loads as base + first adapter + second adapter."""
    first, second = tmp_path / "first", tmp_path / "second"
    _lora_run(target_dir, qa_files, first, "finetune", ["train.max_steps=2"])
    _lora_run(first, qa_files, second, "grad_ascent", ["train.max_steps=2"])
    from unlearn.config import ModelConfig
    from unlearn.models import load_model_and_tokenizer

    one, _, _ = load_model_and_tokenizer(ModelConfig(name=str(first), device="cpu"))
    two, _, _ = load_model_and_tokenizer(ModelConfig(name=str(second), device="cpu"))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert not torch.allclose(one(input_ids=ids).logits, two(input_ids=ids).logits)


def test_grin_chooses_the_modules_that_get_adapters(target_dir, qa_files, tmp_path):
    """GRIN with adapters: its mask (top weights by gradient ratio) is computed on the base model
    and the adapters go on the linear modules where the selection is enriched."""
    from unlearn.localization.mask import load_mask

    out = tmp_path / "grin_lora"
    res = _lora_run(
        target_dir, qa_files, out, "npo",
        ["train.max_steps=1", "localize.method=grin", "localize.top_fraction=0.05"],
    )  # fmt: skip
    targets = res.manifest["adapter"]["target_modules"]
    mask, _ = load_mask(str(out / "localization" / "mask.safetensors"))
    dens = {n.removesuffix(".weight"): float(m.float().mean()) for n, m in mask.items()
            if n.endswith("_proj.weight")}  # fmt: skip
    overall = sum(int(m.sum()) for n, m in mask.items() if n.endswith("_proj.weight")) / sum(
        m.numel() for n, m in mask.items() if n.endswith("_proj.weight")
    )
    assert targets and set(targets) < set(dens)  # some linear modules, not all
    assert all(dens[t] >= overall for t in targets)
    assert all(d < overall for m, d in dens.items() if m not in targets)
    assert res.manifest["localization"]["selected"] > 0


@pytest.mark.parametrize("adapter", [[], LORA], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_run(target_dir, qa_files, tmp_path, adapter):
    """train.gradient_checkpointing recomputes activations in the backward pass: the same weights
    (up to float rounding), and with adapters every adapter weight still trains (non-reentrant
    checkpointing needs no inputs that require grad)."""
    forget, retain = qa_files
    outs = {}
    for gc in (False, True):
        out = tmp_path / f"gc_{gc}"
        unlearn.forget(
            str(target_dir), str(forget), str(retain), "npo", str(out),
            overrides=[*FAST, *adapter, "train.lr=1e-2", "train.max_steps=2",
                       "method.retain_loss=kl", f"train.gradient_checkpointing={gc}"],
        )  # fmt: skip
        name = "adapter_model.safetensors" if adapter else "model.safetensors"
        outs[gc] = load_file(str(out / name))
    assert outs[True].keys() == outs[False].keys()
    for k in outs[True]:
        diff = (outs[True][k] - outs[False][k]).abs().max()
        # Adam normalises each entry's step, so a rounding-size gradient difference on an entry
        # with a near-zero gradient moves it by up to ~lr: bound the difference well below lr
        assert diff < 0.1 * 1e-2, (k, float(diff))
    if adapter:
        assert all((v != 0).any() for k, v in outs[True].items() if "lora_B" in k)


def test_checkpoint_weights_are_safetensors(target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    out = tmp_path / "full"
    unlearn.forget(
        str(target_dir), str(forget), str(retain), "grad_diff", str(out),
        overrides=[*FAST, "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=true"],
    )  # fmt: skip
    ckpt = out / "checkpoints" / "step-1"
    assert (ckpt / "model.safetensors").is_file()  # optimizer/RNG: weights-only loads
    assert not list(ckpt.glob("pytorch_model*"))
    assert "model.embed_tokens.weight" in load_file(str(ckpt / "model.safetensors"))


@pytest.mark.slow  # two child processes
def test_gpu_check_script_runs_on_cpu_with_tiny_shapes():
    """benchmarks/gpu_check.py (the GPU check) runs end to end here with --tiny shapes, so the
    script a GPU session runs once is not first run there."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--cases", "lora_npo_7b_bf16"],
        cwd=root, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["case"] == "lora_npo_7b_bf16" and row["trainable"] > 0 and row["s_per_step"] > 0


def test_adapters_start_from_the_run_seed_not_the_global_generator(target_dir, one_torch_thread):
    from transformers import AutoModelForCausalLM

    from unlearn import adapters
    from unlearn.config import LoraSettings

    def a_matrices(seed: int) -> list[torch.Tensor]:
        base = AutoModelForCausalLM.from_pretrained(str(target_dir))
        model = adapters.wrap(base, LoraSettings(r=2), seed=seed)
        return [p.detach() for n, p in model.named_parameters() if "lora_A" in n]

    first = a_matrices(0)
    torch.rand(100)  # the global generator moves on; the adapters must not
    again, other = a_matrices(0), a_matrices(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_qlora_settings_that_cannot_work_are_one_line_before_loading(
    target_dir, qa_files, tmp_path
):
    """model.quantize=nf4 (QLoRA) needs adapters, a CUDA GPU and bitsandbytes, and takes no
    merge, localization or sharding; each is refused before any weight loads (the GPU path
    itself runs in benchmarks/gpu_check.sh)."""
    forget, retain = qa_files

    def refused(*overrides: str, merge: bool = False) -> str:
        with pytest.raises(UnlearnError) as err:
            unlearn.forget(
                str(target_dir), str(forget), str(retain), "npo", str(tmp_path / "o"),
                overrides=["model.quantize=nf4", *overrides], merge=merge, dry_run=True,
            )  # fmt: skip
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "add model.adapter=lora" in refused()
    assert "needs a CUDA GPU" in refused("model.adapter=lora", "model.device=cpu")
    assert "round the adapter away" in refused("model.adapter=lora", merge=True)
    assert "localize" in refused("model.adapter=lora", "localize.method=grin")
    assert "sharding" in refused("model.adapter=lora", "train.sharding=fsdp2")
