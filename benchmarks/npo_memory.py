"""NPO's peak memory and seconds/step against GradAscent's, measured in the same run.

NPO needs log pi_ref(y|x) of every forget example. unlearn computes it in one pass before training
and stores it with the batch, so no second model is held; the goal is NPO <= 1.15x GradAscent's
peak memory on SmolLM2-135M. Each method runs in its own subprocess, because peak RSS only grows.
On a GPU the peak is torch.cuda.max_memory_allocated; on CPU it is the process's peak RSS.

    python benchmarks/npo_memory.py [--steps 4] [--batch-size 4] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


def _data(tmp: Path, n: int) -> tuple[str, str]:
    """TOFU forget01/retain99 when ../shared is there, else the built-in fictitious people."""
    if TOFU.is_dir():
        f = [json.loads(x) for x in (TOFU / "forget01.json").read_text().splitlines()[:n]]
        r = [json.loads(x) for x in (TOFU / "retain99.json").read_text().splitlines()[:n]]
    else:
        from unlearn.eval.suites.people import build_people_benchmark

        splits = build_people_benchmark()
        f, r = splits["forget"][:n], splits["retain"][:n]
    for name, rows in (("f", f), ("r", r)):
        (tmp / f"{name}.jsonl").write_text(
            "".join(
                json.dumps({"question": x["question"], "answer": x["answer"]}) + "\n" for x in rows
            )
        )
    return str(tmp / "f.jsonl"), str(tmp / "r.jsonl")


def child(method: str, model: str, steps: int, batch: int) -> None:
    import torch

    import unlearn

    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, logs: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with tempfile.TemporaryDirectory() as tmp:
        f, r = _data(Path(tmp), steps * batch)
        unlearn.forget(
            model,
            f,
            r,
            method,
            str(Path(tmp) / "out"),
            callbacks=[tick],
            overrides=[
                f"train.max_steps={steps}",
                f"train.batch_size={batch}",
                "train.progress=false",
                "prompt.max_length=128",
            ],
        )
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steady = times[1:] or times  # the first step pays one-off costs
    print(
        json.dumps({"method": method, "peak_mb": peak_mb, "s_per_step": sum(steady) / len(steady)})
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.steps, args.batch_size)
        return
    results = {}
    for method in ("grad_ascent", "npo"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                method,
                "--model",
                args.model,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            sys.exit(f"{method} failed:\n{proc.stderr[-2000:]}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    ga, npo = results["grad_ascent"], results["npo"]
    print(f"model={args.model} steps={args.steps} batch={args.batch_size} (forget+retain for NPO)")
    print(f"{'method':<12} {'peak MB':>10} {'s/step':>8}")
    for r in (ga, npo):
        print(f"{r['method']:<12} {r['peak_mb']:>10.0f} {r['s_per_step']:>8.2f}")
    ratio = npo["peak_mb"] / ga["peak_mb"]
    print(
        f"NPO/GradAscent peak memory: {ratio:.3f}x (goal <= 1.15x: {'met' if ratio <= 1.15 else 'MISSED'})"
    )
    print(f"NPO/GradAscent seconds/step: {npo['s_per_step'] / ga['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
