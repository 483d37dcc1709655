"""The gradient combinations (`Needs.gradients`) against plain autograd on whole batches:
GradDiff's PCGrad option, UNO's penalised descent and UNO-S's surgery step, each through the real
loop on the tiny Llama; cosines and projections of masked runs use the masked gradients."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from unlearn import losses
from unlearn.config import PromptConfig, TrainConfig
from unlearn.data import Example
from unlearn.errors import UnlearnError
from unlearn.methods import get_method
from unlearn.methods.base import Method, Needs
from unlearn.methods.grad_diff import GradDiffParams
from unlearn.methods.uno import UNOParams
from unlearn.methods.uno_s import UNOSParams
from unlearn.prompts import PromptFormatter, collate, tokenize_examples
from unlearn.train import gradients, optim
from unlearn.train.loop import TrainJob, train


def _data(tiny_model_dir, n: int = 2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fmt = PromptFormatter(tok, PromptConfig())
    forget_ex = [Example(str(i), "h", question=f"Q{i}?", answer=f"A{i} b{i}.") for i in range(n)]
    retain_ex = [Example(f"r{i}", "h", question=f"R{i}?", answer=f"Ret {i} x.") for i in range(n)]
    forget = tokenize_examples(forget_ex, fmt)
    second = tokenize_examples(forget_ex, fmt, ["I do not know." for _ in forget_ex])
    retain = tokenize_examples(retain_ex, fmt)
    return model, tok, forget, second, retain


def _nll(model, items, pad):
    batch = collate(items, pad)
    labels = batch.pop("labels")
    return losses.nll(model(**batch).logits, labels)


def _spy(monkeypatch):
    """Each step's gradients and the weights they were computed at, as the update sees them."""
    seen = []
    original = optim.apply_update

    def spy(run):
        params = run.trainable()
        seen.append(
            (
                [p.grad.detach().clone() for p in params],
                [p.detach().clone() for p in params],
            )
        )
        original(run)

    monkeypatch.setattr(optim, "apply_update", spy)
    return seen


def _run(model, method, params, forget, out, tok, steps=1, **kw):
    cfg = TrainConfig(
        batch_size=len(forget), max_steps=steps, progress=False, lr=1e-2, max_grad_norm=0.0
    )
    return train(TrainJob(model, method, params, forget, cfg, out, tok.pad_token_id, **kw))


def _set(model, weights):
    with torch.no_grad():
        for p, w in zip([p for p in model.parameters() if p.requires_grad], weights, strict=True):
            p.copy_(w)


def _close(got, want):
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())


def test_pcgrad_projects_the_forget_gradient_off_the_retain_gradient_on_conflict(
    tiny_model_dir, tmp_path, monkeypatch
):
    model, tok, forget, _, retain = _data(tiny_model_dir)
    pad, params = tok.pad_token_id, [p for p in model.parameters()]
    g_f = torch.autograd.grad(-_nll(model, forget, pad), params)
    g_r = torch.autograd.grad(0.5 * _nll(model, retain, pad), params)
    dot = sum((a * b).sum() for a, b in zip(g_f, g_r, strict=True))
    nr = sum(b.pow(2).sum() for b in g_r)
    coef = float(dot / nr) if float(dot) < 0 else 0.0
    want = [a - coef * b + b for a, b in zip(g_f, g_r, strict=True)]
    seen = _spy(monkeypatch)
    res = _run(
        model, get_method("grad_diff"), GradDiffParams(alpha=0.5, combine="pcgrad"), forget,
        tmp_path, tok, retain=retain,
    )  # fmt: skip
    _close(seen[0][0], want)
    nf = sum(a.pow(2).sum() for a in g_f)
    assert res.final_logs["grad_cos"] == pytest.approx(float(dot / (nf * nr).sqrt()), abs=1e-5)


def test_pcgrad_keeps_the_sum_without_conflict():
    lin = torch.nn.Linear(2, 1, bias=False)
    run = SimpleNamespace(model=lin, masks=[], trainable=lambda: [lin.weight])
    lin.weight.grad = torch.tensor([[1.0, 1.0]])  # g_r, g_f . g_r > 0
    gradients.project(run, [torch.tensor([[1.0, 0.0]])])
    assert torch.equal(lin.weight.grad, torch.tensor([[2.0, 1.0]]))


def test_cosine_and_projection_use_the_masked_gradients():
    """Entries a mask leaves out never move, so they must not decide whether or how much the
    gradients conflict: here they alone make g_f and g_r conflict."""
    lin = torch.nn.Linear(2, 1, bias=False)
    mask = torch.tensor([[1.0, 0.0]])
    run = SimpleNamespace(
        model=lin, masks=[optim.Masked(lin.weight, mask)], trainable=lambda: [lin.weight]
    )
    lin.weight.grad = torch.tensor([[1.0, 5.0]])  # g_r
    cos = gradients.project(run, [torch.tensor([[1.0, -9.0]])])  # unmasked: dot < 0
    assert cos == pytest.approx(1.0)  # masked: [1, 0] and [1, 0]
    assert torch.equal(lin.weight.grad, torch.tensor([[2.0, 0.0]]))  # no projection


def _uno_expected(model, forget, second, retain, pad, lam, gamma, alpha):
    params = [p for p in model.parameters()]
    with sdpa_kernel([SDPBackend.MATH]):
        probe = _nll(model, forget, pad)
        descent = gamma * _nll(model, second, pad) + alpha * _nll(model, retain, pad)
    g_p = torch.autograd.grad(probe, params, create_graph=True)
    g_d = torch.autograd.grad(descent, params, create_graph=True)
    dot = sum((a * b).sum() for a, b in zip(g_p, g_d, strict=True))
    n_p = sum(a.pow(2).sum() for a in g_p)
    n_d = sum(b.pow(2).sum() for b in g_d)
    penalty = dot.pow(2) / (n_p * n_d + 1e-12)
    g_pen = torch.autograd.grad(penalty, params)
    want = [(a + lam * c).detach() for a, c in zip(g_d, g_pen, strict=True)]
    return want, float((dot / (n_p * n_d).sqrt()).detach())


def test_uno_descends_substitute_and_retain_with_the_penalty_on_the_forget_gradient(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The authors' UNO (pinakm9/forget modules/imagenet/ortho.py): no ascent on the forget
    answers; their NLL's gradient only enters the squared cosine."""
    model, tok, forget, second, retain = _data(tiny_model_dir)
    want, cos = _uno_expected(model, forget, second, retain, tok.pad_token_id, 3.0, 0.5, 2.0)
    seen = _spy(monkeypatch)
    params = UNOParams(lam=3.0, gamma=0.5, alpha=2.0)
    res = _run(
        model, get_method("uno"), params, forget, tmp_path, tok, retain=retain, second=second
    )
    _close(seen[0][0], want)
    logs = res.final_logs
    assert logs["grad_cos"] == pytest.approx(cos, abs=1e-5)
    assert logs["orthogonal_penalty"] == pytest.approx(cos**2, rel=1e-4)
    assert logs["probe_loss"] == pytest.approx(logs["forget_nll"], rel=1e-5)


def test_uno_s_alternates_uno_and_surgery_steps(tiny_model_dir, tmp_path, monkeypatch):
    """Step 1 is a UNO step; step 2 follows the descent gradient projected off the forget
    gradient, whatever the sign of their dot product (modules/imagenet/surgery.py)."""
    model, tok, forget, second, retain = _data(tiny_model_dir)
    pad = tok.pad_token_id
    seen = _spy(monkeypatch)
    params = UNOSParams(lam=3.0, gamma=0.5, alpha=2.0)
    res = _run(
        model, get_method("uno_s"), params, forget, tmp_path, tok, steps=2, retain=retain,
        second=second,
    )  # fmt: skip
    assert [h["surgery"] for h in res.history] == [0.0, 1.0]
    from transformers import AutoModelForCausalLM

    hand = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    first_want, _ = _uno_expected(hand, forget, second, retain, pad, 3.0, 0.5, 2.0)
    _close(seen[0][0], first_want)
    _set(hand, seen[1][1])  # the weights after step 1
    weights = [p for p in hand.parameters()]
    g_p = torch.autograd.grad(_nll(hand, forget, pad), weights)
    descent = 0.5 * _nll(hand, second, pad) + 2.0 * _nll(hand, retain, pad)
    g_d = torch.autograd.grad(descent, weights)
    dot = sum((a * b).sum() for a, b in zip(g_p, g_d, strict=True))
    n_p = sum(a.pow(2).sum() for a in g_p)
    want = [b - (dot / n_p) * a for a, b in zip(g_p, g_d, strict=True)]
    _close(seen[1][0], want)
    after = sum((a * b).sum() for a, b in zip(g_p, seen[1][0], strict=True))
    assert abs(float(after)) < 1e-4 * float(n_p.sqrt())  # orthogonal to the forget gradient


def test_uno_without_substitute_is_the_vae_form(tiny_model_dir, tmp_path, monkeypatch):
    """substitute=none: L = alpha * L_r + lam * cos^2(g_f, g_r), no second answers needed."""
    model, tok, forget, _, retain = _data(tiny_model_dir)
    pad = tok.pad_token_id
    params_list = [p for p in model.parameters()]
    with sdpa_kernel([SDPBackend.MATH]):
        g_p = torch.autograd.grad(_nll(model, forget, pad), params_list, create_graph=True)
        g_d = torch.autograd.grad(_nll(model, retain, pad), params_list, create_graph=True)
    dot = sum((a * b).sum() for a, b in zip(g_p, g_d, strict=True))
    pen = dot.pow(2) / (sum(a.pow(2).sum() for a in g_p) * sum(b.pow(2).sum() for b in g_d) + 1e-12)
    want = [
        (a + 5.0 * c).detach()
        for a, c in zip(g_d, torch.autograd.grad(pen, params_list), strict=True)
    ]
    seen = _spy(monkeypatch)
    params = UNOParams(lam=5.0, substitute="none")
    assert not get_method("uno").needs(params).second_target
    _run(model, get_method("uno"), params, forget, tmp_path, tok, retain=retain)
    _close(seen[0][0], want)


def test_uno_modes_need_a_probe_and_pcgrad_a_retain_term(tiny_model_dir, tmp_path):
    model, tok, forget, _, _ = _data(tiny_model_dir)

    def loss(inputs, params):
        return -losses.nll(inputs.forget_logits, inputs.forget_labels), {}

    method = Method("p", "t", GradDiffParams, loss, "-", needs=lambda p: Needs(gradients="uno"))
    with pytest.raises(UnlearnError, match="no probe loss"):
        _run(model, method, GradDiffParams(), forget, tmp_path, tok)
    with pytest.raises(UnlearnError, match="needs a retain term"):
        params = GradDiffParams(alpha=0.0, combine="pcgrad")
        _run(model, get_method("grad_diff"), params, forget, tmp_path, tok)
