"""RMU: both activation terms against plain-float hand computations, the fixed control vector, which
parameters it trains, a real 2-step run on the tiny Llama, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import unlearn
from conftest import build_tiny_mixtral
from unlearn.cli import main
from unlearn.config import PromptConfig
from unlearn.data import Example
from unlearn.errors import UnlearnError
from unlearn.methods import METHODS, build_params, rmu
from unlearn.methods.base import LossInputs
from unlearn.methods.retain import objective
from unlearn.methods.rmu import (
    RMUParams,
    activation_mse,
    control_vector,
    retain_activation_term,
    rmu_loss,
    trainable_names,
)
from unlearn.prompts import PromptFormatter, collate, tokenize_examples

FAST = ["train.progress=false", "train.batch_size=2"]


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """Resolve "rmu" by name whether or not the registry lists it yet (same object once it does)."""
    monkeypatch.setitem(METHODS, "rmu", rmu.METHOD)


def hidden_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [3, 4, 3]: row 0 has 3 answer tokens, row 1 one, row 2 none."""
    h = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(seed)) * 2
    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, -100, 9], [-100, -100, -100, -100]])
    return h, labels


def hand_mse(h: torch.Tensor, target, labels: torch.Tensor) -> float:
    """mean over rows with answer tokens of: mean over those tokens of mean_k (h_k - target_k)^2."""
    rows = []
    for b in range(h.shape[0]):
        per_token = []
        for t in range(h.shape[1]):
            if int(labels[b, t]) == -100:
                continue
            goal = [float(v) for v in (target(b, t) if callable(target) else target)]
            diffs = [(float(x) - g) ** 2 for x, g in zip(h[b, t], goal, strict=True)]
            per_token.append(sum(diffs) / len(diffs))
        if per_token:
            rows.append(sum(per_token) / len(per_token))
    return sum(rows) / len(rows)


def hand_norm(h: torch.Tensor, labels: torch.Tensor) -> float:
    norms = [
        math.sqrt(sum(float(x) ** 2 for x in h[b, t]))
        for b in range(h.shape[0])
        for t in range(h.shape[1])
        if int(labels[b, t]) != -100
    ]
    return sum(norms) / len(norms)


# ---- the loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("coeff", "gamma", "seed"), [(6.5, 1.0, 0), (2.0, 3.0, 5)])
def test_forget_term_matches_hand_computation(coeff, gamma, seed):
    h, labels = hidden_batch(0)
    params = RMUParams(layer=4, steering_coeff=coeff, gamma=gamma, seed=seed, alpha=0.0)
    loss, logs = rmu_loss(LossInputs(None, labels, forget_hidden={4: h}), params)
    cu = control_vector(3, coeff, seed)
    assert logs["forget_loss"] == pytest.approx(hand_mse(h, cu, labels), rel=1e-6)
    assert float(loss) == pytest.approx(gamma * hand_mse(h, cu, labels), rel=1e-6)
    assert logs["forget_activation_norm"] == pytest.approx(hand_norm(h, labels), rel=1e-6)
    assert "retain_loss" not in logs


def test_retain_term_matches_hand_computation_and_is_added_unless_deferred():
    f, f_labels = hidden_batch(0)
    h, labels = hidden_batch(1)
    ref, _ = hidden_batch(2)
    ref.requires_grad_(True)
    x = h.clone().requires_grad_(True)
    inputs = LossInputs(
        None, f_labels, retain_labels=labels, forget_hidden={1: f},
        retain_hidden={1: x}, ref_retain_hidden={1: ref},
    )  # fmt: skip
    term = retain_activation_term(inputs, 1)
    expected = hand_mse(h, lambda b, t: ref[b, t].detach(), labels)
    assert float(term.detach()) == pytest.approx(expected, rel=1e-6)
    term.backward()
    assert ref.grad is None and x.grad is not None  # the frozen start is a constant
    assert float(x.grad[2].abs().sum()) == 0.0  # a row without answer tokens carries no loss

    params = RMUParams(layer=1, alpha=7.0, gamma=2.0)
    joint, logs = objective(rmu.METHOD, inputs, params)
    assert float(joint.detach()) == pytest.approx(2 * logs["forget_loss"] + 7 * expected, rel=1e-6)
    assert logs["retain_loss"] == pytest.approx(expected, rel=1e-6)
    alone, _ = rmu_loss(inputs, params)  # the method's loss is its forget term only
    assert float(alone.detach()) == pytest.approx(2 * logs["forget_loss"], rel=1e-6)
    declared = rmu.METHOD.needs(params).retain
    assert float(declared.loss(inputs).detach()) == pytest.approx(expected, rel=1e-6)


def test_activation_mse_reduces_in_float32_and_ignores_empty_rows():
    h, labels = hidden_batch(3)
    target = torch.zeros(3)
    value = activation_mse(h.to(torch.bfloat16), target, labels)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(hand_mse(h.to(torch.bfloat16), target, labels), rel=1e-6)
    none = torch.full_like(labels, -100)
    assert float(activation_mse(h, target, none)) == 0.0  # no answer tokens: no NaN


def test_control_vector_is_fixed_by_its_seed_with_norm_c():
    torch.manual_seed(123)
    a = control_vector(64, 6.5, 0)
    after = torch.rand(3)
    torch.manual_seed(999)
    b = control_vector(64, 6.5, 0)
    assert torch.equal(a, b)  # independent of the global RNG ...
    torch.manual_seed(123)
    control_vector(64, 6.5, 0)
    assert torch.equal(torch.rand(3), after)  # ... and leaves it untouched
    assert float(a.norm()) == pytest.approx(6.5, rel=1e-6)
    assert bool((a >= 0).all()) and a.dtype == torch.float32  # a uniform [0, 1) direction
    assert not torch.allclose(a, control_vector(64, 6.5, 1))
    torch.testing.assert_close(control_vector(64, 2.0, 0) / 2, a / 6.5)
    h, labels = hidden_batch(0)  # the same target on every batch
    params = RMUParams(layer=0, alpha=0.0)
    first = rmu_loss(LossInputs(None, labels, forget_hidden={0: h}), params)[0]
    assert float(first) == float(
        rmu_loss(LossInputs(None, labels, forget_hidden={0: h}), params)[0]
    )


def test_needs_declare_one_block_and_no_logits():
    needs = rmu.METHOD.needs(RMUParams(layer=3, alpha=5.0))
    assert needs.hidden_layers == (3,) and needs.reference_hidden_layers == (3,)
    assert needs.logits is False
    assert needs.retain.weight == 5.0 and needs.retain.kind == "rmu_activation"
    alone = rmu.METHOD.needs(RMUParams(alpha=0.0))
    assert alone.retain is None and alone.reference_hidden_layers == ()  # no frozen copy
    assert not rmu.METHOD.needs_retain(RMUParams(alpha=0.0))


# ---- which parameters train --------------------------------------------------------------------


def test_auto_trains_the_down_projections_of_three_blocks():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=5, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                   bos_token_id=0, eos_token_id=0)
    )  # fmt: skip
    assert trainable_names(gpt2, RMUParams(layer=3)) == [
        f"transformer.h.{i}.mlp.c_proj.weight" for i in (1, 2, 3)
    ]  # GPT-2's attention output is also called c_proj: not picked
    mixtral = build_tiny_mixtral()
    names = trainable_names(mixtral, RMUParams(layer=0))
    assert names and all(n.startswith("model.layers.0.") and "down_proj" in n for n in names)
    mask = rmu.METHOD.parameter_mask(gpt2, RMUParams(layer=1, trainable=r".*\.h\.1\.mlp\..*"))
    assert sorted(mask) == sorted(
        n for n, _ in gpt2.named_parameters() if n.startswith("transformer.h.1.mlp.")
    )
    assert all(m.dtype == torch.bool and bool(m.all()) for m in mask.values())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            RMUParams(layer=40),
            "rmu layer 40 is past the model's 5 decoder blocks; set method.layer between 0 and 4",
        ),
        (RMUParams(layer=5), "set method.layer between 0 and 4"),
        (RMUParams(layer=2, trainable=r"model\.layers\.2\..*"), "matches no parameter"),
    ],
)
def test_bad_layer_or_regex_is_one_line(params, message):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=5, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                   bos_token_id=0, eos_token_id=0)
    )  # fmt: skip
    with pytest.raises(UnlearnError) as err:
        rmu.METHOD.parameter_mask(gpt2, params)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"steering_coeff": "0"}, "steering_coeff"),
        ({"steering_coeff": -6.5}, "steering_coeff"),
        ({"steering_coeff": "nan"}, "steering_coeff"),
        ({"steering_coeff": "inf"}, "steering_coeff"),
        ({"alpha": -1}, "alpha"),
        ({"gamma": "nan"}, "gamma"),
        ({"layer": -1}, "layer"),
        ({"layer": "1.5"}, "layer"),
        ({"trainable": "model.(layers"}, "trainable"),
    ],
)
def test_invalid_hyperparameters_are_one_line(overrides, field):
    with pytest.raises(UnlearnError) as err:
        build_params("rmu", overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "rmu" in msg


# ---- training ----------------------------------------------------------------------------------


def block_output(model, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """What a forward hook on block `layer` sees (HF's last hidden state has the final norm)."""
    seen = []
    hook = model.model.layers[layer].register_forward_hook(
        lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    return seen[0]


def forget_mse(folder, forget_file, params: RMUParams) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    rows = [json.loads(x) for x in forget_file.read_text().splitlines()]
    examples = [
        Example(str(i), "h", question=r["question"], answer=r["answer"]) for i, r in enumerate(rows)
    ]
    batch = collate(tokenize_examples(examples, PromptFormatter(tok, PromptConfig())), 0)
    h = block_output(model, batch, params.layer)
    target = control_vector(h.shape[-1], params.steering_coeff, params.seed)
    return float(activation_mse(h, target, batch["labels"]))


def test_two_steps_train_only_the_masked_weights_and_approach_the_control_vector(
    target_dir, qa_files, tmp_path, one_torch_thread
):
    forget, retain = qa_files
    res = unlearn.forget(
        str(target_dir), str(forget), str(retain), "rmu", str(tmp_path / "out"),
        overrides=[*FAST, "train.lr=1e-2", "train.max_steps=2", "method.layer=1",
                   "method.steering_coeff=1"],
    )  # fmt: skip
    assert res.metrics["steps"] == 2
    before, after = (
        load_file(str(target_dir / "model.safetensors")),
        load_file(str(tmp_path / "out" / "model.safetensors")),
    )
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    params = RMUParams(layer=1, steering_coeff=1.0)
    start, end = (
        forget_mse(target_dir, forget, params),
        forget_mse(tmp_path / "out", forget, params),
    )
    assert end < start, f"forget activation MSE to c*u {start:.4f} -> {end:.4f}"
    final = res.metrics["final_losses"]
    assert final["retain_loss"] > 0 and final["forget_activation_norm"] > 0


def test_missing_retain_data_names_the_fix(target_dir, qa_files, tmp_path):
    forget, _ = qa_files
    with pytest.raises(UnlearnError) as err:
        unlearn.forget(
            str(target_dir), str(forget), None, "rmu", str(tmp_path / "out"),
            overrides=[*FAST, "method.layer=1"],
        )  # fmt: skip
    msg = str(err.value)
    assert "\n" not in msg and "--retain" in msg and "method.alpha=0" in msg


def test_cli_refuses_a_layer_past_the_model_in_one_line(capsys, target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    code = main(
        [
            "forget",
            "--model",
            str(target_dir),
            "--forget",
            str(forget),
            "--retain",
            str(retain),
            "--method",
            "rmu",
            "--output",
            str(tmp_path / "out"),
            *FAST,
            "train.max_steps=1",
        ]
    )  # fmt: skip  (default layer 7 on a 2-block model)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("unlearn: error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err
    assert "past the model's 2 decoder blocks" in lines[0] and "between 0 and 1" in lines[0]


def test_wmdp_corpora_are_documents_from_a_file_or_the_hub(
    tiny_model_dir, tmp_path, monkeypatch, one_torch_thread
):
    """WMDP's forget and retain corpora (hub `cais/wmdp-corpora`, configs `cyber-forget-corpus`,
    `cyber-retain-corpus`, ...; the gated bio forget corpus downloads as JSON lines of {"text"})
    load as documents, from the hub spec or the downloaded file, and RMU trains on them."""
    import datasets

    articles = [f"Article {i}: " + "the exploit chains a heap overflow " * 12 for i in range(4)]
    retain_text = [f"Note {i}: " + "a patch bounds-checks the buffer " * 12 for i in range(4)]
    calls = []

    def fake_load(repo, config=None, split=None):
        calls.append((repo, config, split))
        return [{"text": t} for t in (articles if "forget" in config else retain_text)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    forget_file = tmp_path / "bio-forget-corpus.jsonl"
    forget_file.write_text("".join(json.dumps({"title": "t", "text": t}) + "\n" for t in articles))
    for forget in ("hub:cais/wmdp-corpora:cyber-forget-corpus", str(forget_file)):
        out = tmp_path / ("hub" if forget.startswith("hub:") else "file")
        res = unlearn.forget(
            str(tiny_model_dir), forget, "hub:cais/wmdp-corpora:cyber-retain-corpus", "rmu",
            str(out), overrides=[*FAST, "train.max_steps=1", "method.layer=1",
                                 "prompt.max_length=32"],
        )  # fmt: skip
        data = res.manifest["data"]
        assert data["forget"]["kind"] == "text" and data["forget"]["n"] == 4
        assert data["forget_sequences"] > 4  # each article cut into 32-token windows
    assert ("cais/wmdp-corpora", "cyber-forget-corpus", "train") in calls
    assert ("cais/wmdp-corpora", "cyber-retain-corpus", "train") in calls
