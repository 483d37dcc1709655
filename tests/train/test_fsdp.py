"""FSDP2 (`train.sharding=fsdp2`) on two CPU processes (gloo) trains to the weights of one plain
process on the same global batches: NPO with a KL retain term (cached reference values and a
sharded frozen reference), GradDiff, a masked (GRIN-style) run, a LoRA run, RMU (a sharded
truncated reference), a task vector (the starting weights laid out as the shards) and WHP; an interrupted
sharded run resumes from its torch.distributed.checkpoint shards to the same weights. A sharded
run without a multi-process launch is a one-line error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlearn.methods import METHODS

SCRIPT = r"""
import atexit, os, sys, pathlib, torch
import torch.distributed as dist

def record_exit():  # registered before train(), so it runs after the exit handler train() adds
    gloo = [t for t in os.listdir("/proc/self/task")
            if "gloo" in open(f"/proc/self/task/{t}/comm").read()]
    open(f"{sys.argv[1]}/exit{os.environ.get('RANK', '0')}.txt", "w").write(
        f"initialized={dist.is_initialized()} gloo_threads={len(gloo)}")

atexit.register(record_exit)
from transformers import LlamaConfig, LlamaForCausalLM
from unlearn.config import TrainConfig
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, get_method
from unlearn.prompts import Tokenized
from unlearn.train.loop import TrainJob, train
from unlearn.train import sharding as S
import accelerate
import unlearn.forward
unlearn.forward.uses_sdpa = lambda model: False  # both sides pad (one process would pack)

root, variants = pathlib.Path(sys.argv[1]), sys.argv[2].split(",")
sharding, _, zero = sys.argv[3].partition(":")  # "deepspeed:zero3"

def fresh(variant):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    ))
    if variant == "lora":
        from unlearn import adapters
        from unlearn.config import LoraSettings
        model = adapters.wrap(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    return model

def data():
    g = torch.Generator().manual_seed(1)
    def item(n_prompt, n_answer, i):
        ids = torch.randint(1, 64, (n_prompt + n_answer,), generator=g).tolist()
        return Tokenized(ids, [-100] * n_prompt + ids[n_prompt:], i)
    forget = [item(4 + i % 4, 3 + i, i) for i in range(7)]
    retain = [item(5, 2 + i, i) for i in range(8)]  # ragged too: token means weigh by tokens
    return forget, retain

def run(variant):
    out = root / variant
    out.mkdir(parents=True, exist_ok=True)
    # "MODE/variant": this variant sharded by MODE (fsdp2, none, or zero2/zero3: DeepSpeed)
    mode = variant.split("/")[0] if "/" in variant else sharding
    shard, ds = ("deepspeed", mode) if mode.startswith("zero") else (mode, zero or "zero2")
    variant = variant.split("/")[-1]
    forget, retain = data()
    fixed = {"npo_kl": ("npo", {"retain_loss": "kl"}), "resume": ("npo", {"retain_loss": "kl"}),
             "grad_diff": ("grad_diff", {}), "masked": ("npo", {}),
             "lora": ("npo", {"retain_loss": "kl"})}
    if variant.startswith("m:"):  # any method at its defaults (sizes for the tiny model)
        name = variant[2:]
        hp = {"rmu": {"layer": 1, "steering_coeff": 1.0}, "whp": {"reinforce_steps": 2}}.get(name, {})
    else:
        name, hp = fixed[variant]
    method = get_method(name)
    params = build_params(method, hp)
    needs = method.needs(params)
    second = [Tokenized(f.input_ids, f.labels[:-1] + [-100], f.source) for f in forget] if needs.second_target else None
    cfg = TrainConfig(batch_size=3, max_steps=3, lr=1e-3, progress=False, seed=3,
                      sharding=shard, deepspeed=ds)
    model = fresh(variant)
    mask = None
    if variant == "masked":
        gm = torch.Generator().manual_seed(5)
        mask = {n: torch.rand(p.shape, generator=gm) < 0.3 for n, p in model.named_parameters()
                if n.endswith("proj.weight")}
    def job(m, **kw):
        return TrainJob(m, method, params, forget, cfg, out, 0, retain=retain, mask=mask,
                        second=second, **kw)
    if variant == "resume":
        def stop(step, logs):
            if step == 2:
                raise KeyboardInterrupt
        try:
            train(job(model, callbacks=[stop]))
            raise SystemExit("the run was not interrupted")
        except UnlearnError as exc:
            assert "interrupted after step 2" in str(exc), exc
        model = fresh(variant)
        train(job(model, resume=True))
    else:
        train(job(model))
    if shard == "fsdp2":
        state = S.full_state_dict(model)
    elif shard == "deepspeed":
        from unlearn.train import deepspeed
        state = deepspeed.full_state_dict(model)
    else:
        state = model.state_dict()
    if accelerate.PartialState().is_main_process:
        keep = {k: v.detach().cpu().clone() for k, v in state.items()
                if variant != "lora" or "lora_" in k}
        torch.save(keep, out / "weights.pt")

for v in variants:
    run(v)
# leave no DTensor or pending gloo work behind; the process group itself is destroyed by the
# exit handler `train` registers, which `record_exit` checks
import gc
gc.collect()
if dist.is_initialized():
    dist.barrier()
if accelerate.PartialState().is_main_process:
    (root / "world.txt").write_text(str(accelerate.PartialState().num_processes))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: Path, out: Path, variant: str, procs: int, sharding: str = "fsdp2") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cpu"}  # fmt: skip
    if procs == 1:
        cmd = [sys.executable, str(script), str(out), variant, "none"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(_free_port()), str(script), str(out), variant, sharding]  # fmt: skip
    done = subprocess.run(cmd, env=env, timeout=240, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


VARIANTS = ["npo_kl", "grad_diff", "masked", "lora", "resume", "m:rmu", "m:task_vector", "m:whp"]
#: Every method that runs on several processes (UNO and UNO-S combine the gradients themselves and
#: are refused there).
PARALLEL = [m for m in METHODS if m not in ("uno", "uno_s")]
DEEPSPEED = ["zero2/npo_kl", "zero2/lora", "zero2/m:rmu", "zero3/npo_kl", "zero3/lora"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> Path:
    """Every run of this module, in one launch per process count (a launch costs seconds): one
    plain process (every variant and method), two processes (FSDP2 variants, data-parallel
    methods, DeepSpeed variants where deepspeed is installed), four (GradDiff)."""
    try:
        import deepspeed  # noqa: F401

        ds = DEEPSPEED
    except ImportError:
        ds = []
    root = tmp_path_factory.mktemp("launches")
    script = root / "run.py"
    script.write_text(SCRIPT)
    one = [v for v in VARIANTS if v != "resume"] + [f"m:{m}" for m in PARALLEL]
    _run(script, root / "p1", ",".join(dict.fromkeys(one)), 1)
    two = [f"fsdp2/{v}" for v in VARIANTS] + [f"none/m:{m}" for m in PARALLEL]
    two.append("none/npo_kl")  # data parallel with a frozen KL reference and cached values
    two += ds  # last: a plain run after a DeepSpeed one in the same process is not supported
    _run(script, root / "p2", ",".join(two), 2)
    _run(script, root / "p4", "none/m:grad_diff", 4)
    return root


def _compare(root: Path, variants: list[str], tol: float, label: str, procs: int = 2) -> None:
    for variant in variants:
        key = variant.split("/")[-1]
        a = torch.load(root / "p1" / ("npo_kl" if key == "resume" else key) / "weights.pt")
        b = torch.load(root / f"p{procs}" / variant / "weights.pt")
        assert a.keys() == b.keys() and a, variant
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < tol, f"{variant}: 1 process vs {label} differ by {worst}"


@pytest.mark.slow
def test_fsdp2_on_two_processes_matches_one(launches: Path) -> None:
    """Each variant's final weights (LoRA: its adapters) on 2 sharded processes against 1 plain
    process."""
    _compare(launches, [f"fsdp2/{v}" for v in VARIANTS], 1e-5, "FSDP2 on 2")


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_on_two_processes_match_one(launches: Path) -> None:
    """DeepSpeed through accelerate on 2 CPU processes (DS_ACCELERATOR=cpu): the forget and
    retain backward passes of a step accumulate and the optimizer steps once (a second step per
    optimizer step would move the weights twice as far), for ZeRO-2 and ZeRO-3."""
    pytest.importorskip("deepspeed")
    _compare(launches, DEEPSPEED, 1e-5, "DeepSpeed on 2")


@pytest.mark.slow
def test_ranks_are_real_and_leave_no_gloo_thread_at_exit(launches: Path) -> None:
    """The launches ran as 1, 2 and 4 processes, and every rank of the data-parallel one destroyed
    its process group (so joined gloo's threads) before interpreter teardown: a gloo worker thread releasing a finished
    all-reduce's tensors at teardown cannot take the GIL and aborts the process ("terminate
    called without an active exception"); `train` registers the destroy at exit."""
    for procs in (1, 2, 4):
        assert (launches / f"p{procs}" / "world.txt").read_text() == str(procs)
    # the plain data-parallel launch (the 2-process one also ran DeepSpeed, whose engine keeps
    # its own process groups referenced: their gloo threads outlive the destroy)
    for rank in range(4):
        record = (launches / "p4" / f"exit{rank}.txt").read_text()
        assert record == "initialized=False gloo_threads=0", (rank, record)
    _compare(launches, ["none/npo_kl"], 1e-5, "DDP on 2")


@pytest.mark.slow
def test_results_do_not_depend_on_the_process_count(launches: Path) -> None:
    """Each method's loss averages over sequences (NPO) or answer tokens (NLL-like), and the
    sequences are ragged: each process's part is weighed by its share of what the loss averages
    over (`Method.mean_over`), so 1 and 2 processes (data parallel) train every method to the same
    weights, and GradDiff on 4 too."""
    _compare(launches, [f"none/m:{m}" for m in PARALLEL], 2e-5, "2 processes")
    _compare(launches, ["none/m:grad_diff"], 2e-5, "4 processes", procs=4)


def test_fsdp2_without_a_multi_process_launch_is_one_line(tiny_model_dir, qa_files, tmp_path):
    import unlearn
    from unlearn.errors import UnlearnError

    forget, retain = qa_files
    with pytest.raises(UnlearnError) as err:
        unlearn.forget(
            str(tiny_model_dir), str(forget), str(retain), "grad_diff", str(tmp_path / "o"),
            overrides=["train.sharding=fsdp2", "train.max_steps=1", "train.progress=false"],
        )  # fmt: skip
    msg = str(err.value)
    assert "torchrun --nproc_per_node" in msg and "\n" not in msg


@pytest.mark.slow
def test_fsdp2_from_the_command_line(tiny_model_dir, qa_files, tmp_path: Path) -> None:
    """`torchrun ... -m unlearn.cli forget ... train.sharding=fsdp2` (and =deepspeed with ZeRO-3):
    one process writes the output folder, the sharded weights are gathered whole, and they match
    a one-process run (up to the rounding of one process packing its rows while two pad them)."""
    from safetensors.torch import load_file

    forget, retain = qa_files
    args = ["forget", "--model", str(tiny_model_dir), "--forget", str(forget), "--retain",
            str(retain), "--method", "grad_diff", "train.max_steps=2", "train.batch_size=4",
            "train.progress=false", "train.nll_check=false", "train.lr=1e-3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    from unlearn.cli import main

    # the one-process side runs in this process, as the command line would
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(_free_port()), "-m", "unlearn.cli", *args, "train.sharding=fsdp2", "--output",
         str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "unlearn.json").is_file()
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return
    # DeepSpeed ZeRO-3 from the command line: the partitioned weights are gathered for the save
    three = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(_free_port()), "-m", "unlearn.cli", *args, "train.sharding=deepspeed",
         "train.deepspeed=zero3", "--output", str(tmp_path / "three")],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert three.returncode == 0, three.stderr[-3000:]
    c = load_file(str(tmp_path / "three" / "model.safetensors"))
    assert c.keys() == a.keys()
    worst = max(float((a[k] - c[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst


def test_deepspeed_settings_that_cannot_work_are_one_line_before_loading(
    tiny_model_dir, qa_files, tmp_path, monkeypatch
):
    pytest.importorskip("deepspeed")
    import unlearn
    from unlearn.errors import UnlearnError

    forget, retain = qa_files
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")

    def refused(method: str, *overrides: str, resume: bool = False) -> str:
        with pytest.raises(UnlearnError) as err:
            unlearn.forget(
                str(tiny_model_dir), str(forget), str(retain), method, str(tmp_path / "o"),
                overrides=["train.sharding=deepspeed", *overrides], dry_run=True, resume=resume,
            )  # fmt: skip
        assert "\n" not in str(err.value)
        return str(err.value)

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "needs a launcher" in refused("npo")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "pickles" in refused("npo", "train.save_every=1")
    assert "pickles" in refused("npo", resume=True)
    assert "localize mask" in refused("npo", "localize.method=grin")
    assert "combines gradients by hand" in refused("uno")
    assert "rewrites the trained weights" in refused("task_vector", "train.deepspeed=zero3")
    assert "ZeRO-3" in refused("npo", "train.deepspeed=zero3", "train.logits_chunk=64")
    assert "neither a shipped config" in refused("npo", f"train.deepspeed={tmp_path / 'no.json'}")
    assert "not valid JSON" in refused("npo", f"train.deepspeed={bad_json}")
