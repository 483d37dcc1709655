"""train.logits_chunk: losses computed from the last hidden states, a chunk of answer positions at a
time (`losses.HeadLogits`), give every method the loss and gradients of full logits; runs give the
same weights; a model whose logits are not its output layer's is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import unlearn
from method_inputs import full_inputs
from unlearn import losses
from unlearn.errors import UnlearnError
from unlearn.losses import HeadLogits
from unlearn.methods import METHODS, get_method
from unlearn.methods.retain import declared_value, declared_weight

LOGIT_METHODS = [n for n, m in METHODS.items() if m.needs(m.params()).logits]


def _head_and_hidden(inputs, vocab: int = 3):
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, 8, generator=gen))
    shapes = {
        "forget": inputs.forget_labels.shape,
        "retain": inputs.retain_labels.shape,
        "second": inputs.second_labels.shape,
        "ref": inputs.retain_labels.shape,
    }
    return head, {k: torch.randn(*shape, 8, generator=gen) for k, shape in shapes.items()}


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_every_method_has_the_same_loss_and_gradients_from_chunked_logits(name):
    method = get_method(name)
    params = method.params()
    results = []
    for chunked in (False, True):
        inputs = full_inputs(method, params)
        head, hidden = _head_and_hidden(inputs)
        for k in ("forget", "retain", "second"):
            hidden[k].requires_grad_(True)

        def logits(h, frozen=False, chunked=chunked, head=head):
            if chunked:
                return HeadLogits(h.detach() if frozen else h, head, 1, frozen=frozen)
            return head(h).detach() if frozen else head(h)

        inputs.forget_logits = logits(hidden["forget"])
        inputs.retain_logits = logits(hidden["retain"])
        inputs.second_logits = logits(hidden["second"])
        inputs.ref_retain_logits = logits(hidden["ref"], frozen=True)
        loss, logs = method.loss(inputs, params)
        term = method.needs(params).retain
        if term is not None:
            loss = loss + declared_weight(term, inputs.state) * declared_value(term, inputs)
        loss.backward()
        grads = [hidden[k].grad for k in ("forget", "retain", "second")]
        results.append((float(loss.detach()), logs, grads, head.weight.grad.clone()))
    (loss0, logs0, grads0, w0), (loss1, logs1, grads1, w1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-5, abs=1e-6)
    assert logs1 == pytest.approx(logs0, rel=1e-5, abs=1e-6)
    for a, b in zip(grads0, grads1, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(w0, w1, atol=1e-6) and w0.abs().sum() > 0


def test_chunked_pieces_equal_the_full_ones_with_soft_capping_and_any_chunk():
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(3, 7, 6, generator=gen, requires_grad=True)
    ref_hidden = torch.randn(3, 7, 6, generator=gen)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[0, :3] = -100
    labels[2, 5:] = -100

    def capped(h):
        return torch.tanh(head(h) / 2.5) * 2.5

    full_logp, mask = losses.token_logprobs(capped(hidden), labels)
    full_kl = losses.kl_to_reference(capped(hidden), capped(ref_hidden), labels)
    (g_full,) = torch.autograd.grad(full_logp.sum() + full_kl, hidden)
    for chunk in (1, 4, 100):
        h = HeadLogits(hidden, head, chunk, softcap=2.5)
        ref = HeadLogits(ref_hidden, head, chunk, softcap=2.5, frozen=True)
        logp, m = losses.token_logprobs(h, labels)
        kl = losses.kl_to_reference(h, ref, labels)
        assert torch.equal(m, mask) and torch.allclose(logp, full_logp, atol=1e-6)
        assert torch.allclose(kl, full_kl, atol=1e-6)
        (g,) = torch.autograd.grad(logp.sum() + kl, hidden)
        assert torch.allclose(g, g_full, atol=1e-6)
        rows, _ = losses.answer_logits(h, labels)
        assert torch.allclose(rows, capped(hidden)[:, :-1][mask], atol=1e-6)
    assert losses.nll(HeadLogits(hidden, head, 2).detach(), labels).requires_grad is False


FAST = ["train.progress=false", "train.batch_size=2", "train.nll_check=false", "train.lr=1e-2"]


@pytest.mark.parametrize(
    "method,extra",
    [
        ("npo", ["method.retain_loss=kl", "train.max_steps=2"]),  # reference pass + start model
        ("ce_u", ["train.max_steps=2"]),  # whole distributions at the answer positions
        ("npo", ["method.retain_loss=kl", "train.max_steps=2", "model.adapter=lora"]),
        ("grad_diff", ["train.max_steps=2", "train.gradient_checkpointing=true"]),
    ],
    ids=["npo_kl", "ce_u", "npo_kl_lora", "grad_diff_gc"],
)
def test_a_chunked_run_ends_at_the_weights_of_an_unchunked_one(
    method, extra, target_dir, qa_files, tmp_path, one_torch_thread
):
    forget, retain = qa_files
    weights = []
    for chunk in (0, 3):
        out = tmp_path / f"c{chunk}"
        res = unlearn.forget(
            str(target_dir), str(forget), str(retain), method, str(out),
            overrides=[*FAST, *extra, f"train.logits_chunk={chunk}"],
        )  # fmt: skip
        name = "adapter_model.safetensors" if "model.adapter=lora" in extra else "model.safetensors"
        weights.append(load_file(str(out / name)))
        logs = [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]
        assert len(logs) == 2 and res.manifest["method"] == method
    start = load_file(str(target_dir / "model.safetensors"))
    for k, w in weights[0].items():
        # Adam turns float-rounding differences of near-zero gradients into visible ones: 5e-5
        # against moves of ~1e-2 at this learning rate
        assert torch.allclose(weights[1][k], w, atol=5e-5), (
            k,
            (weights[1][k] - w).abs().max(),
            w.abs().max(),
        )
    if "model.adapter=lora" not in extra:
        assert any(not torch.equal(weights[1][k], start[k]) for k in start)  # it trained


def test_a_model_whose_logits_are_not_its_output_layers_is_refused(
    target_dir, qa_files, tmp_path, one_torch_thread
):
    config = json.loads((target_dir / "config.json").read_text())
    model = tmp_path / "capped"
    model.mkdir()
    for f in target_dir.iterdir():
        if f.is_file():
            (model / f.name).write_bytes(f.read_bytes())
    # Llama ignores this setting, so logits projected with it differ from the model's own
    (model / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 0.5}))
    forget, retain = qa_files
    with pytest.raises(UnlearnError, match=r"train\.logits_chunk=0") as err:
        unlearn.forget(
            str(model), str(forget), str(retain), "grad_ascent", str(tmp_path / "o"),
            overrides=[*FAST, "train.max_steps=1", "train.logits_chunk=4"],
        )  # fmt: skip
    assert "\n" not in str(err.value)
