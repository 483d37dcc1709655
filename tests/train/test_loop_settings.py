"""Settings the loop must honour: dropout in training (train mode, eval mode for the passes that
read the starting model), localization settings on resume, and which model (before or after
GRIN's noise) every starting-model value comes from."""

from __future__ import annotations

import pytest
import torch
import yaml

from unlearn import api, losses
from unlearn.config import PromptConfig, TrainConfig
from unlearn.data import Example
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, get_method
from unlearn.methods.base import Method, Needs, RetainTerm
from unlearn.prompts import PromptFormatter, collate, tokenize_examples
from unlearn.train import optim
from unlearn.train.loop import TrainJob, latest_checkpoint, train

FAST = ["train.progress=false", "train.nll_check=false", "train.batch_size=2"]


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    """The tiny Llama with attention dropout 0.5 (as a checkpoint with dropout would load)."""
    from conftest import build_tiny_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-dropout")
    tok = build_tokenizer()
    model = build_tiny_model(len(tok))
    model.config.attention_dropout = 0.5
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _load(model_dir, n: int = 2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    fmt = PromptFormatter(tok, PromptConfig())
    examples = [Example(str(i), "h", question=f"Q{i}?", answer=f"A{i} b{i}.") for i in range(n)]
    return model, tok, tokenize_examples(examples, fmt)


def _cfg(steps: int = 1, **kw) -> TrainConfig:
    return TrainConfig(batch_size=2, max_steps=steps, progress=False, lr=1e-2, **kw)


def test_training_runs_in_train_mode_and_reference_passes_in_eval_mode(
    dropout_model_dir, tmp_path, monkeypatch
):
    """Models load in eval mode; a loop that never calls train() trains without dropout (unlike
    Hugging Face's Trainer and OpenUnlearning). NPO's cached reference pass must stay in eval
    mode, the training forward in train mode, and the caller's mode comes back afterwards."""
    model, tok, items = _load(dropout_model_dir)
    assert not model.training
    modes: list[bool] = []
    model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: modes.append(m.training))
    grads = []
    original = optim.apply_update

    def spy(run):
        grads.append([p.grad.detach().clone() for p in run.trainable()])
        original(run)

    monkeypatch.setattr(optim, "apply_update", spy)
    method = get_method("npo")
    params = build_params(method, {"alpha": 0})
    train(TrainJob(model, method, params, items, _cfg(), tmp_path, tok.pad_token_id))
    assert modes[0] is False  # the reference pass, before step 1
    assert True in modes[1:]  # the training forward
    assert not model.training  # restored

    # the step's gradient is not the eval-mode one: dropout acted
    fresh, _, _ = _load(dropout_model_dir)
    batch = collate(items, tok.pad_token_id)
    labels = batch.pop("labels")
    logp, _ = losses.sequence_logprob(fresh(**batch).logits, labels)
    eval_loss = (
        -(2 / params.beta)
        * torch.nn.functional.logsigmoid(-params.beta * (logp - logp.detach())).mean()
    )
    eval_grads = torch.autograd.grad(eval_loss, [p for p in fresh.parameters()])
    differs = [
        not torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], eval_grads, strict=True)
    ]
    assert any(differs)


def test_dropout_runs_are_reproducible(dropout_model_dir, tmp_path):
    weights = []
    for name in ("a", "b"):
        model, _, items = _load(dropout_model_dir)
        method = get_method("grad_ascent")
        train(TrainJob(model, method, method.params(), items, _cfg(2), tmp_path / name, 0))
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def _forget(model_dir, data, out, extra=(), **kw):
    forget, retain = data
    return api.forget(
        str(model_dir), str(forget), str(retain), "npo", str(out),
        overrides=[*FAST, "train.max_steps=4", "train.save_every=2", *extra], **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change", ["localize.top_fraction=0.2", "localize.noise_std=0.3", "localize.method=random"]
)
def test_resume_refuses_changed_localization_settings(tiny_model_dir, qa_files, tmp_path, change):
    """A resumed run reuses the saved mask: changed localize settings would be ignored while
    config.yaml recorded them. They are refused in one line, before anything is written."""
    common = ["localize.method=grin", "localize.top_fraction=0.05"]

    def boom(step, logs):
        if step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(UnlearnError, match="--resume"):
        _forget(tiny_model_dir, qa_files, out, extra=common, callbacks=[boom])
    config_before = (out / "config.yaml").read_text()
    key = change.split("=")[0]
    with pytest.raises(UnlearnError, match=key.replace(".", r"\.")) as err:
        _forget(tiny_model_dir, qa_files, out, extra=[*common, change], resume=True)
    assert "\n" not in str(err.value)
    assert (out / "config.yaml").read_text() == config_before
    assert latest_checkpoint(out)[1] == 2
    res = _forget(tiny_model_dir, qa_files, out, extra=common, resume=True)  # unchanged: resumes
    assert res.manifest["resumed_from_step"] == 2


class _P:
    pass


@pytest.mark.parametrize("reference", ["before", "after"])
def test_every_starting_model_value_comes_from_one_side_of_the_perturbation(
    tiny_model_dir, tmp_path, reference, monkeypatch
):
    """Cached log-probs, the frozen KL model and the task-vector start are all taken before the
    noise ("clean") or all after it ("noised")."""
    model, tok, items = _load(tiny_model_dir, 4)
    forget, retain = items[:2], items[2:]
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}

    def perturb(m):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05)
        return {"perturbed": True}

    noised = {n: v + 0.05 for n, v in clean.items()}
    seen = {}

    def loss(inputs, params):
        logp, _ = losses.sequence_logprob(inputs.forget_logits, inputs.forget_labels)
        seen.setdefault("ref", inputs.ref_forget_logp.clone())
        seen.setdefault("own", logp.detach().clone())
        return -losses.nll(inputs.forget_logits, inputs.forget_labels), {}

    def finalize(start, trained, params):
        seen["start"] = {n: v.clone() for n, v in start.items()}
        return trained

    method = Method(
        "probe", "t", _P, loss, "-",
        needs=lambda p: Needs(retain=RetainTerm(0.0, kind="kl"), reference=("sequence_logp",)),
        finalize=finalize,
    )  # fmt: skip
    job = TrainJob(
        model, method, _P(), forget, _cfg(), tmp_path, tok.pad_token_id, retain=retain,
        perturb=perturb, reference=reference,
    )  # fmt: skip
    from unlearn.train import setup

    real_copy = setup.frozen_copy

    def recording_copy(m, accelerator):
        seen["frozen"] = {n: p.detach().clone() for n, p in m.named_parameters()}
        return real_copy(m, accelerator)

    monkeypatch.setattr(setup, "frozen_copy", recording_copy)
    res = train(job)
    assert res.perturbed == {"perturbed": True}
    want = clean if reference == "before" else noised
    for values in (seen["start"], seen["frozen"]):
        assert all(torch.allclose(values[n], want[n]) for n in want)
    if reference == "after":  # at step 1 the model is the noised start itself
        assert torch.allclose(seen["ref"], seen["own"], atol=1e-5)
    else:
        assert not torch.allclose(seen["ref"], seen["own"], atol=1e-3)


def test_localize_reference_reaches_the_run_and_its_config(tiny_model_dir, qa_files, tmp_path):
    res = _forget(
        tiny_model_dir, qa_files, tmp_path / "n",
        extra=["localize.method=grin", "localize.noise_std=0.5", "localize.reference=noised"],
    )  # fmt: skip
    config = yaml.safe_load((tmp_path / "n" / "config.yaml").read_text())
    assert config["localize"]["reference"] == "noised"
    assert res.manifest["localization"]["noise_tensors"] > 0
    with pytest.raises(UnlearnError, match="reference") as err:
        _forget(tiny_model_dir, qa_files, tmp_path / "bad", extra=["localize.reference=later"])
    assert "\n" not in str(err.value)


def test_bf16_autocast_runs_and_stays_close_to_float32(target_dir, qa_files, tmp_path):
    """train.autocast=bf16 (on a GPU, "auto" chooses it): the reference pass and the training
    forwards run under bfloat16 autocast with float32 weights; the first step's losses are the
    float32 run's up to bfloat16 rounding (NPO's is log 2 at step 1 either way: the reference
    was computed the same way), and the manifest says which ran."""
    import json
    import math

    import unlearn

    forget, retain = qa_files
    first = {}
    for mode in ("none", "bf16"):
        res = unlearn.forget(
            str(target_dir), str(forget), str(retain), "npo", str(tmp_path / mode),
            overrides=["train.progress=false", "train.nll_check=false", "train.max_steps=2",
                       "train.batch_size=2", "train.lr=1e-3", f"train.autocast={mode}"],
        )  # fmt: skip
        assert res.manifest["autocast"] == ("bf16" if mode == "bf16" else None)
        assert res.manifest["dtype"] == "float32"
        log = (tmp_path / mode / "logs" / "train.jsonl").read_text().splitlines()
        first[mode] = json.loads(log[0])
    for key in ("forget_loss", "retain_loss"):
        assert first["bf16"][key] == pytest.approx(first["none"][key], rel=2e-2), key
    assert first["bf16"]["retain_loss"] != first["none"]["retain_loss"]  # bf16 did run
    # NPO's forget loss at step 1 is (2/beta) log 2 when the reference is the same computation
    assert first["bf16"]["forget_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-3)
