"""finetune (what `unlearn finetune` runs): the plain forget NLL, by hand, and no retain term."""

from __future__ import annotations

from method_inputs import LN2, close, make_inputs
from unlearn.methods import build_params, finetune, get_method


def test_finetune_is_forget_nll() -> None:
    """A: NLL = 1.5 ln 2 (the loop passes the training data as the forget batch)."""
    loss, _ = finetune.finetune_loss(make_inputs(retain=None), finetune.FinetuneParams())
    close(loss, 1.5 * LN2)


def test_finetune_needs_no_retain_batch() -> None:
    assert not get_method("finetune").needs_retain(build_params("finetune", {}))
