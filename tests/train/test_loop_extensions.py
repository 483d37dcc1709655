"""The loop's declarations beyond logits: block hidden states that stop the forward pass, a
truncated frozen reference, method state across checkpoints, finalize, and the reinforced model.
(Gradient combinations: test_gradients.py.)"""

from __future__ import annotations

import json

import pytest
import torch

import unlearn.train.loop as loop
from unlearn import forward as fwd
from unlearn import losses
from unlearn.config import PromptConfig, TrainConfig
from unlearn.data import Example
from unlearn.errors import UnlearnError
from unlearn.methods.base import Method, Needs, Reinforce, RetainTerm
from unlearn.prompts import PromptFormatter, collate, tokenize_examples
from unlearn.train import hidden


class _P:
    pass


def _tiny(tiny_model_dir, n: int = 4):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = [Example(str(i), "h", question=f"Q{i}?", answer=f"A{i} b{i}.") for i in range(n)]
    return model, tok, tokenize_examples(examples, PromptFormatter(tok, PromptConfig()))


def _train(model, tok, items, method, out, **kw):
    settings = {"batch_size": 2, "max_steps": 2, "progress": False, "lr": 1e-2, **kw.pop("cfg", {})}
    cfg = TrainConfig(**settings)
    return loop.train(loop.TrainJob(model, method, _P(), items, cfg, out, tok.pad_token_id, **kw))


def _ga(inputs, params):
    loss = -losses.nll(inputs.forget_logits, inputs.forget_labels)
    return loss, {"forget_loss": float(loss.detach())}


def test_block_hidden_states_stop_the_forward_and_the_reference_is_truncated(
    tiny_model_dir, tmp_path
):
    model, tok, items = _tiny(tiny_model_dir)
    calls = {"head": 0}
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def loss(inputs, params):
        assert inputs.forget_logits is None
        h, ref = inputs.forget_hidden[0], inputs.ref_forget_hidden[0]
        assert h.shape == (*inputs.forget_labels.shape, 32) and not ref.requires_grad
        seen.append(torch.allclose(h, ref, atol=1e-6))
        return (h - 1.0).pow(2).mean(), {}

    needs = Needs(hidden_layers=(0,), reference_hidden_layers=(0,), logits=False)
    _train(model, tok, items, Method("h", "t", _P, loss, "-", needs=lambda p: needs), tmp_path)
    assert calls["head"] == 0  # never ran past block 0
    assert seen[0] and not seen[-1]  # frozen reference, moving model
    after = dict(model.named_parameters())
    assert torch.equal(
        after["model.layers.1.mlp.down_proj.weight"], start["model.layers.1.mlp.down_proj.weight"]
    )
    assert not torch.equal(
        after["model.layers.0.mlp.down_proj.weight"], start["model.layers.0.mlp.down_proj.weight"]
    )


def test_truncated_copy_matches_the_full_model_and_drops_later_blocks(tiny_model_dir):
    model, tok, items = _tiny(tiny_model_dir)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    ref = hidden.truncated_copy(model, 0)
    assert isinstance(hidden.decoder_blocks(ref)[1], torch.nn.Identity)
    assert isinstance(ref.lm_head, torch.nn.Identity)
    assert isinstance(hidden.decoder_blocks(model)[1], type(hidden.decoder_blocks(model)[0]))
    batch = collate(items[:2], tok.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True).hidden_states[1]
        _, got = hidden.run(ref, batch, (0,), stop=True)
    assert torch.allclose(got[0], full, atol=1e-6)


def test_a_block_past_the_depth_is_one_line(tiny_model_dir, tmp_path):
    model, tok, items = _tiny(tiny_model_dir)
    needs = Needs(hidden_layers=(5,), logits=False)
    method = Method(
        "deep", "t", _P, lambda i, p: (i.forget_hidden[5].sum(), {}), "-", needs=lambda p: needs
    )
    with pytest.raises(
        UnlearnError,
        match=r"block 5 is past the model's 2 decoder blocks; choose a block between 0 and 1",
    ):
        _train(model, tok, items, method, tmp_path)


def _counting(calls):
    def update(state, info, params):
        calls.append(info)
        return {"total": state["total"] + info.logs["retain_loss"], "n": state["n"] + 1}

    return Method(
        "stateful", "t", _P,
        lambda i, p: (-losses.nll(i.forget_logits, i.forget_labels) * (1 + i.state["n"]), {}),
        "-",
        needs=lambda p: Needs(retain=RetainTerm(weight=1.0, state_weight="n")),
        init_state=lambda p: {"total": 0.0, "n": 1.0},
        update_state=update,
    )  # fmt: skip


def test_method_state_is_logged_checkpointed_and_resumed(tiny_model_dir, tmp_path):
    model, tok, items = _tiny(tiny_model_dir, 6)
    calls = []
    res = _train(
        model,
        tok,
        items[:4],
        _counting(calls),
        tmp_path / "a",
        retain=items[4:],
        cfg={"max_steps": 3},
    )
    logs = [
        json.loads(x) for x in (tmp_path / "a" / "logs" / "train.jsonl").read_text().splitlines()
    ]
    assert [r["state.n"] for r in logs] == [2.0, 3.0, 4.0]
    assert logs[-1]["state.total"] == pytest.approx(sum(r["retain_loss"] for r in logs))
    assert [c.step for c in calls] == [1, 2, 3] and calls[0].total == 3
    # interrupted after step 2, resumed: the same weights and state as the uninterrupted run
    model_b, _, _ = _tiny(tiny_model_dir, 6)

    def stop(step, logs):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(UnlearnError, match="interrupted"):
        _train(
            model_b,
            tok,
            items[:4],
            _counting([]),
            tmp_path / "b",
            retain=items[4:],
            cfg={"max_steps": 3},
            callbacks=[stop],
        )
    progress = json.loads(
        next((tmp_path / "b" / "checkpoints").glob("step-2/progress.json")).read_text()
    )
    assert progress["method_state"]["n"] == 3.0
    model_c, _, _ = _tiny(tiny_model_dir, 6)
    res_c = _train(
        model_c,
        tok,
        items[:4],
        _counting([]),
        tmp_path / "b",
        retain=items[4:],
        cfg={"max_steps": 3},
        resume=True,
    )
    assert res_c.final_logs["state.n"] == 4.0
    assert res_c.final_logs["state.total"] == pytest.approx(res.final_logs["state.total"], rel=1e-5)
    for (n, p), q in zip(model.named_parameters(), model_c.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_finalize_gets_the_start_and_the_trained_weights(tiny_model_dir, tmp_path):
    model, tok, items = _tiny(tiny_model_dir)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {}

    def finalize(s, t, params):
        trained.update({n: w.clone() for n, w in t.items()})
        assert all(torch.equal(s[n], start[n]) for n in start)
        return {n: 2 * s[n] - t[n] for n in s}  # alpha = 1 negation

    method = Method(
        "tv",
        "t",
        _P,
        lambda i, p: (losses.nll(i.forget_logits, i.forget_labels), {}),
        "-",
        finalize=finalize,
    )
    _train(model, tok, items, method, tmp_path)
    for n, p in model.named_parameters():
        assert not torch.equal(trained[n], start[n]), n
        assert torch.allclose(p, 2 * start[n] - trained[n], atol=1e-6), n


def test_reinforced_logits_come_from_a_copy_trained_on_the_forget_data(tiny_model_dir, tmp_path):
    model, tok, items = _tiny(tiny_model_dir)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def loss(inputs, params):
        ref, reinforced = inputs.ref_forget["logits"], inputs.ref_forget["reinforced_logits"]
        assert ref.shape == reinforced.shape == inputs.forget_logits.shape
        labels = inputs.forget_labels
        seen.append((losses.nll(ref, labels), losses.nll(reinforced, labels)))
        return -losses.nll(inputs.forget_logits, labels), {}

    needs = Needs(reference=("logits", "reinforced_logits"), reinforce=Reinforce(steps=3, lr=1e-2))
    _train(
        model,
        tok,
        items,
        Method("r", "t", _P, loss, "-", needs=lambda p: needs),
        tmp_path,
        cfg={"max_steps": 1},
    )
    base, reinforced = seen[0]
    assert reinforced < base  # the copy learned the forget answers
    log = (tmp_path / "logs" / "reinforce" / "logs" / "train.jsonl").read_text().splitlines()
    assert len(log) == 3
    # the copy was trained, not the model: after one ascent step it differs from the start only
    # by that step, and its reference logits came from the start
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())


def test_cached_logits_start_at_the_answer_and_line_up_with_the_batch(tiny_model_dir):
    """Logits are stored from the position before each item's first answer token (prompt positions
    predict nothing scored), and put back at their places in a batch of unequal prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn.forward import kept_positions
    from unlearn.train.reference import batch_values, reference_values

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [
        Example("0", "h", question="Q?", answer="A b."),
        Example("1", "h", question="A much longer question here?", answer="Some answer x."),
    ]
    items = tokenize_examples(examples, PromptFormatter(tok, PromptConfig()))
    values = reference_values(model, items, tok.pad_token_id, ("logits",))
    for item, stored, start in zip(items, values["logits"], values["logits:start"], strict=True):
        first = next(i for i, y in enumerate(item.labels) if y != -100)
        assert int(start) == first - 1 and stored.shape[0] == len(item.input_ids) - first + 1
    batch = collate(items, tok.pad_token_id)
    labels = batch.pop("labels")
    kept = kept_positions(labels)
    with torch.no_grad():
        logits = model(**batch).logits[:, -kept:]
    got = batch_values(values, [0, 1], labels.shape[1], torch.device("cpu"), kept)["logits"]
    scored = labels[:, -kept:][:, 1:] != -100  # positions t predicting a scored token t+1
    assert got.shape == logits.shape and scored.sum() > 0
    assert torch.allclose(got[:, :-1][scored], logits[:, :-1][scored], atol=1e-5)


@pytest.mark.parametrize("share", [True, False])
def test_packed_batch_gives_the_padded_batch_logits_and_gradients(share, tiny_model_dir):
    """Rows of unequal length, packed after their shared prefix (or with none): the logits at
    every position that predicts an answer token, the loss and every gradient equal the padded
    batch's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn.forward import kept_positions

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    questions = ["Q?", "A much longer question here?", "Mid question?"]
    answers = ["A b.", "Some answer x.", "An answer that runs on for a while."]
    examples = [
        Example(str(i), "h", question=q, answer=a)
        for i, (q, a) in enumerate(zip(questions, answers, strict=True))
    ]
    items = tokenize_examples(examples, PromptFormatter(tok, PromptConfig()))
    batch = collate(items, tok.pad_token_id)
    labels = batch.pop("labels")
    kept = kept_positions(labels)
    n = fwd.shared_prefix(batch, kept) if share else 0
    assert (n >= 4) == share and kept is not None
    results = []
    for packed in (False, True):
        model.zero_grad()
        if packed:
            logits = fwd.packed_forward(model, batch, n, kept)
        else:
            logits = model(**batch, logits_to_keep=kept).logits
        loss = losses.nll(logits, labels[:, -kept:])
        loss.backward()
        results.append(
            (logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()])
        )
    (l0, k0, g0), (l1, k1, g1) = results
    scored = labels[:, -kept:][:, 1:] != -100
    assert torch.allclose(l0[:, :-1][scored], l1[:, :-1][scored], atol=1e-5)
    assert torch.allclose(k0, k1, rtol=1e-6)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
