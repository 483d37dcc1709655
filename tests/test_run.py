"""What a training run does around the loop: the before/after NLL check in particular."""

from __future__ import annotations

import pytest
import torch

from unlearn.config import PromptConfig
from unlearn.data import Example
from unlearn.prompts import PromptFormatter, tokenize_examples
from unlearn.train.nll_check import mean_nll


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
