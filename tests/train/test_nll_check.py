"""The work a run does around the training loop: the before/after NLL check in particular.

The check runs the prompt start every sequence shares (chat template, system prompt) once per
call, and reads the forget half of "before" off the loop's reference pass when that pass scores
the same sequences; both must give the numbers of plain per-sequence forwards.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import unlearn
from unlearn.config import PromptConfig
from unlearn.data import Example
from unlearn.prompts import PromptFormatter, Tokenized, tokenize_examples
from unlearn.train import nll_check as run_module
from unlearn.train.loop import TrainResult
from unlearn.train.nll_check import mean_nll
from unlearn.train.reference import reference_values

SYSTEM = "You answer questions about people, briefly and in full sentences."
FAST = ["train.progress=false", "train.batch_size=2", "train.max_steps=2", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok


def _items(tok, n: int = 9, system: str = SYSTEM) -> list[Tokenized]:
    examples = [
        Example(str(i), "h", question="Who? " * (1 + 3 * i % 7), answer="A b c. " * (1 + i % 3))
        for i in range(n)
    ]
    return tokenize_examples(examples, PromptFormatter(tok, PromptConfig(system_prompt=system)))


def _plain_nll(model, items: list[Tokenized]) -> float:
    """One unpadded sequence at a time, Hugging Face's own shifted loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t in items:
            n = sum(1 for x in t.labels[1:] if x != -100)
            ids, labels = torch.tensor([t.input_ids]), torch.tensor([t.labels])
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count


def _embedded_tokens(model, fn) -> int:
    """How many token positions go through the model while `fn()` runs."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].numel())
    )
    try:
        fn()
    finally:
        hook.remove()
    return sum(seen)


def test_nll_check_runs_the_shared_prompt_start_once_and_matches_plain_forwards(tiny):
    model, tok = tiny
    items = _items(tok)
    order = sorted(items, key=lambda t: len(t.input_ids))
    head = run_module.shared_head(model, order, torch.device("cpu"))
    assert head is not None and head[0] >= 10  # system prompt + user header
    n = head[0]
    value = 0.0

    def check() -> None:
        nonlocal value
        value = mean_nll(model, items, tok.pad_token_id, batch_size=2)

    ran = _embedded_tokens(model, check)
    # the head once, then each batch of 2 from position n to its longest row
    widths = [max(len(t.input_ids) for t in order[i : i + 2]) for i in range(0, len(order), 2)]
    rows = [len(order[i : i + 2]) for i in range(0, len(order), 2)]
    assert ran == n + sum(r * (w - n) for r, w in zip(rows, widths, strict=True))
    assert value == pytest.approx(_plain_nll(model, items), rel=1e-5)


def test_nll_check_shares_nothing_when_a_labelled_token_comes_first(tiny):
    """Documents are labelled from their second token on: no prefix may skip their logits."""
    model, tok = tiny
    ids = tok("Alice writes books about rivers and old cities.")["input_ids"]
    docs = [Tokenized(ids[: k + 4], ids[: k + 4], k) for k in range(4)]
    assert run_module.shared_head(model, docs, torch.device("cpu")) is None
    assert mean_nll(model, docs, tok.pad_token_id, batch_size=3) == pytest.approx(
        _plain_nll(model, docs), rel=1e-5
    )


@pytest.mark.parametrize("kind", ["sequence_logp", "token_logp", "logits"])
def test_forget_nll_from_cached_reference_values_is_the_checks_number(tiny, kind):
    model, tok = tiny
    items = _items(tok, n=7)
    values = reference_values(model, items, tok.pad_token_id, (kind,), batch_size=3)
    expected = mean_nll(model, items[:5], tok.pad_token_id)
    assert run_module.reference_nll(values, items[:5]) == pytest.approx(expected, rel=1e-5)
    assert run_module.reference_nll({}, items[:5]) is None  # nothing usable: no number


@pytest.mark.parametrize("method", ["npo", "idk_nll"])
def test_before_forget_nll_is_the_start_models_whichever_way_it_is_measured(
    monkeypatch, tiny_model_dir, qa_files, tmp_path, method
):
    """NPO's reference pass scores the forget sequences on the start model, so (once the loop
    hands its values back) the check skips that pass; refusal targets (idk_nll) are not the
    check's sequences, so there it runs. Either way "before" is the start model's NLL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls: list[int] = []
    real = run_module.mean_nll

    def counted(model, items, pad_id, batch_size=8):
        calls.append(len(items))
        return real(model, items, pad_id, batch_size)

    monkeypatch.setattr(run_module, "mean_nll", counted)
    forget, retain = qa_files
    res = unlearn.forget(
        str(tiny_model_dir), str(forget), str(retain), method, str(tmp_path / "out"), overrides=FAST
    )
    shares = "reference" in {f.name for f in dataclasses.fields(TrainResult)} and method == "npo"
    assert len(calls) == (3 if shares else 4)

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in forget.read_text().splitlines()]
    examples = [Example(str(i), "h", question=r["question"], answer=r["answer"]) for i, r in
                enumerate(rows)]  # fmt: skip
    items = tokenize_examples(examples, PromptFormatter(tok, PromptConfig()))
    before = res.metrics["nll_before"]
    assert before["forget_nll"] == pytest.approx(_plain_nll(start, items), rel=1e-4)
    assert list(before) == ["forget_nll", "retain_nll"]
    assert res.metrics["nll_after"]["forget_nll"] != pytest.approx(before["forget_nll"])


def test_batched_trimmed_nll_check_matches_per_sequence_forwards(tiny_model_dir):
    """Length-sorted batches and logits only from the first answer position change nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [
        Example(str(i), "h", question="Q? " * (1 + 3 * i % 7), answer="A b c. " * (1 + i % 3))
        for i in range(7)
    ]
    items = tokenize_examples(examples, PromptFormatter(tok, PromptConfig()))
    total, count = 0.0, 0
    with torch.no_grad():
        for t in items:  # the plain way: one sequence at a time, HF's own shifted loss
            n = sum(1 for x in t.labels[1:] if x != -100)
            ids, labels = torch.tensor([t.input_ids]), torch.tensor([t.labels])
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    assert mean_nll(model, items, tok.pad_token_id, batch_size=3) == pytest.approx(
        total / count, rel=1e-5
    )
