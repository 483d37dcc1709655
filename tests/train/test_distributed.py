"""Two data-parallel CPU processes (gloo) train to the weights of one process.

The script below is written to tmp_path and run twice on the same global batches: plainly, and as
two ranks. `accelerate launch --num_processes 2 --cpu` runs ONE process in accelerate 1.x (its CPU
multi-process path needs mpirun), so the ranks are started by torchrun, which is what `accelerate
launch --multi_gpu` runs; the script asserts it really ran as two processes. NPO with a KL retain term covers cached reference values, the frozen
reference copy and the separate retain backward; 7 forget examples in batches of 3 make uneven
shards (2 + 1 examples) and a micro-batch (1 example) smaller than the world size.

A rank that exits with its process group alive can abort at interpreter teardown ("terminate
called without an active exception", issue 16): a gloo worker thread dropping a finished
all-reduce's tensors needs the GIL, and a finalizing interpreter kills it mid-destructor. `train`
destroys the group at exit, before teardown; the script checks that from an exit handler that
runs after the product's, so the check does not depend on losing the race.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = r"""
import atexit, os, sys, torch
import torch.distributed as dist

def record_exit():  # registered before train(), so it runs after the exit handler train() adds
    gloo = [t for t in os.listdir("/proc/self/task")
            if "gloo" in open(f"/proc/self/task/{t}/comm").read()]
    open(f"{sys.argv[1]}/exit{os.environ.get('RANK', '0')}.txt", "w").write(
        f"initialized={dist.is_initialized()} gloo_threads={len(gloo)}")

atexit.register(record_exit)
from transformers import LlamaConfig, LlamaForCausalLM
from unlearn.config import TrainConfig
from unlearn.methods import build_params, get_method
from unlearn.prompts import Tokenized
from unlearn.train.loop import TrainJob, train

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    tie_word_embeddings=False,
))
start = {k: v.clone() for k, v in model.state_dict().items()}
g = torch.Generator().manual_seed(1)

def item(n_prompt, n_answer, i):
    ids = torch.randint(1, 64, (n_prompt + n_answer,), generator=g).tolist()
    return Tokenized(ids, [-100] * n_prompt + ids[n_prompt:], i)

forget = [item(4 + i % 4, 3 + i, i) for i in range(7)]  # ragged: NPO averages over sequences
retain = [item(5, 4, i) for i in range(8)]  # equal answer lengths: KL averages over tokens
method = get_method("npo")
params = build_params(method, {"retain_loss": "kl"})
cfg = TrainConfig(batch_size=3, max_steps=3, lr=1e-3, progress=False, seed=3)
# one process would pack its rows (two cannot); both pad here, so they compute the same sums
# (packing against padding: tests/test_loop_extensions.py)
import unlearn.forward
unlearn.forward.uses_sdpa = lambda model: False
train(TrainJob(model, method, params, forget, cfg, __import__("pathlib").Path(sys.argv[1]), 0,
      retain=retain))
import accelerate
state = accelerate.PartialState()
assert state.num_processes == int(__import__("os").environ.get("WORLD_SIZE", "1"))
if state.is_main_process:
    open(sys.argv[1] + "/world.txt", "w").write(str(state.num_processes))
    torch.save(model.state_dict(), sys.argv[1] + "/weights.pt")
    torch.save(start, sys.argv[1] + "/start.pt")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(one)], check=True, env=env, timeout=120)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_port", str(_free_port()), str(script), str(two)]
    done = subprocess.run(launch, env=env, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (one / "world.txt").read_text() == "1" and (two / "world.txt").read_text() == "2"
    # every rank destroyed its process group (and so joined gloo's threads) before teardown
    for rank in (0, 1):
        assert (two / f"exit{rank}.txt").read_text() == "initialized=False gloo_threads=0"
    a = torch.load(one / "weights.pt")
    b = torch.load(two / "weights.pt")
    start = torch.load(one / "start.pt")
    assert a.keys() == b.keys() == start.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = min(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4, "training did not change every tensor"
    assert worst < 1e-5, f"largest weight difference between 1 and 2 processes: {worst}"
