"""Per-process peak memory of NPO sharded over 2 processes (FSDP2) against one process.

The job: SmolLM2-135M-Instruct (float32, CPU), TOFU forget01 + retain99 rows from ../shared/data,
NPO, batch 4 + 4, `--steps` optimizer steps. One process runs it plainly (`train.sharding=none`,
2 torch threads); two processes run it under torchrun with `train.sharding=fsdp2` (1 thread each).
Peak: each process's peak RSS at its last step (resource.getrusage), the largest over the ranks.
Goal (issue 18): the sharded per-process peak at most 0.65x one process's.

On CPU the RSS depends on glibc's allocator, which keeps freed memory in its arenas: the pair is
measured with the default allocator and with `MALLOC_MMAP_THRESHOLD_=131072
MALLOC_TRIM_THRESHOLD_=0` (large blocks go straight back to the system), which shows the memory
the run needs rather than what the allocator keeps, at a cost in speed (the s/step columns).

    python benchmarks/fsdp_memory.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
TUNED = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
GOAL = 0.65


def child(model: str, sharding: str, steps: int, data: Path, out: Path) -> None:
    import unlearn

    rec: dict = {"ends": []}
    t0 = time.perf_counter()

    def tick(step: int, logs: dict) -> None:
        rec["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rec["ends"].append(time.perf_counter() - t0)

    unlearn.forget(
        model, str(data / "f.jsonl"), str(data / "r.jsonl"), "npo", str(out / "model"),
        overwrite=True, callbacks=[tick],
        overrides=[f"train.max_steps={steps}", "train.batch_size=4", "train.progress=false",
                   "train.nll_check=false", "prompt.max_length=512", f"train.sharding={sharding}",
                   "model.dtype=float32", "model.device=cpu"],
    )  # fmt: skip
    e = rec["ends"]
    rank = os.environ.get("RANK", "0")
    (out / f"rank{rank}.json").write_text(
        json.dumps({"peak_mib": rec["peak_mib"], "s_per_step": (e[-1] - e[0]) / (len(e) - 1)})
    )


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, procs: int, steps: int, data: Path, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        args = ["--child", model, "fsdp2" if procs > 1 else "none", str(steps), str(data), tmp]
        if procs == 1:
            cmd = [sys.executable, __file__, *args]
            threads = "2"
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_port", str(_port()), __file__, *args]  # fmt: skip
            threads = "1"
        done = subprocess.run(
            cmd, env={**os.environ, **env, "OMP_NUM_THREADS": threads}, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
        if done.returncode != 0 or len(ranks) != procs:
            sys.exit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    return {
        "peak_mib": max(r["peak_mib"] for r in ranks),
        "s_per_step": max(r["s_per_step"] for r in ranks),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, sharding, steps, data, out = args.child
        child(model, sharding, int(steps), Path(data), Path(out))
        return
    from unlearn.config import ModelConfig
    from unlearn.models import local_folder, resolve_model

    cfg = ModelConfig(name="smollm2-135m")
    model = local_folder(resolve_model(cfg), cfg)
    n = args.steps * 4
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for name, split in (("f", "forget01"), ("r", "retain99")):
            rows = [json.loads(x) for x in (TOFU / f"{split}.json").read_text().splitlines()[:n]]
            lines = [json.dumps({"question": r["question"], "answer": r["answer"]}) for r in rows]
            (data / f"{name}.jsonl").write_text("".join(x + "\n" for x in lines))
        print(f"NPO, SmolLM2-135M fp32 CPU, TOFU, batch 4+4, {args.steps} steps; peak RSS per "
              "process at its last step (the largest rank)")  # fmt: skip
        print(f"{'allocator':<10} {'1 proc MiB':>10} {'FSDP2 x2 MiB':>13} {'ratio':>6} "
              f"{'1 proc s/step':>14} {'FSDP2 s/step':>13}")  # fmt: skip
        for label, env in (("default", {}), ("tuned", TUNED)):
            one = run(model, 1, args.steps, data, env)
            two = run(model, 2, args.steps, data, env)
            ratio = two["peak_mib"] / one["peak_mib"]
            mark = "met" if ratio <= GOAL else "MISSED"
            print(f"{label:<10} {one['peak_mib']:>10.0f} {two['peak_mib']:>13.0f} {ratio:>6.2f} "
                  f"{one['s_per_step']:>14.2f} {two['s_per_step']:>13.2f}  goal <= {GOAL}: {mark}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
