"""The shared loop on a 2-layer random Llama: every method trains, resume is exact, NaN stops safely."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unlearn
from unlearn.config import PromptConfig, TrainConfig
from unlearn.data import Example
from unlearn.errors import TrainingDiverged, UnlearnError
from unlearn.methods import METHODS, get_method
from unlearn.methods.base import Method
from unlearn.prompts import PromptFormatter, tokenize_examples
from unlearn.train.loop import latest_checkpoint, plan_steps, retain_stream, train
from unlearn.train.run import mean_nll

FAST = ["train.progress=false", "train.batch_size=2"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def target_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model fine-tuned on forget + retain, so there is something to unlearn."""
    root = tmp_path_factory.mktemp("target")
    rows = [
        {"question": f"Where was person {i} born?", "answer": f"Person {i} was born in city {i}."}
        for i in range(6)
    ] + [
        {"question": f"What does person {i} do?", "answer": f"Person {i} is a teacher."}
        for i in range(10, 20)
    ]
    from conftest import write_jsonl

    data = write_jsonl(root / "all.jsonl", rows)
    unlearn.finetune(
        str(tiny_model_dir),
        str(data),
        str(root / "model"),
        overrides=[*FAST, "train.lr=3e-3", "train.epochs=12", "train.batch_size=4"],
    )
    return root / "model"


def test_plan_is_deterministic_and_covers_every_example():
    cfg = TrainConfig(batch_size=2, grad_accum=2, epochs=2, seed=3)
    a, b = plan_steps(7, cfg), plan_steps(7, cfg)
    assert a == b
    first_epoch = [i for step in a[:2] for micro in step for i in micro]
    assert sorted(first_epoch) == list(range(7))
    assert plan_steps(7, TrainConfig(batch_size=2, seed=4)) != plan_steps(
        7, TrainConfig(batch_size=2, seed=3)
    )
    assert len(plan_steps(7, TrainConfig(batch_size=2, max_steps=10))) == 10
    stream = retain_stream(5, 4, 3, seed=0)
    assert [len(s) for s in stream] == [3, 3, 3, 3] and {i for s in stream for i in s} == set(
        range(5)
    )


# For each method: the forget-sequence NLL must rise (unlearning) or fall (fine-tuning, and
# IdkNLL's refusal targets, checked separately), and every parameter tensor must change.
DIRECTION = {"grad_ascent": +1, "grad_diff": +1, "npo": +1, "simnpo": +1, "finetune": -1}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_steps_change_every_parameter_and_move_forget_loss(
    name, target_dir, qa_files, tmp_path
):
    forget, retain = qa_files
    before = _weights(target_dir)
    extra = ["method.alpha=0"] if name in ("grad_diff", "npo", "simnpo", "idk_nll") else []
    res = unlearn.forget(
        str(target_dir),
        str(forget),
        str(retain),
        name,
        str(tmp_path / "out"),
        overrides=[*FAST, "train.lr=1e-3", "train.max_steps=2", *extra],
    )
    after = _weights(tmp_path / "out")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{name} left parameters unchanged: {unchanged}"
    b, a = res.metrics["nll_before"]["forget_nll"], res.metrics["nll_after"]["forget_nll"]
    if name == "idk_nll":
        assert a > b  # pushed toward refusals, away from the original answers
        assert (
            res.metrics["final_losses"]["refusal_nll"]
            < res.manifest["metrics"]["final_losses"]["loss"] + 1e-6
        )
    else:
        assert (a - b) * DIRECTION[name] > 0, f"{name}: forget NLL {b:.4f} -> {a:.4f}"
    assert res.metrics["steps"] == 2


def test_idk_nll_lowers_refusal_loss(target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    res = unlearn.forget(
        str(target_dir),
        str(forget),
        str(retain),
        "idk_nll",
        str(tmp_path / "o"),
        overrides=[*FAST, "train.lr=3e-3", "train.epochs=4"],
    )
    import json

    log = [
        json.loads(x) for x in (tmp_path / "o" / "logs" / "train.jsonl").read_text().splitlines()
    ]
    first, last = log[:3], log[-3:]  # one epoch (3 steps of 2) each: every refusal target once
    mean = lambda rows: sum(r["refusal_nll"] for r in rows) / len(rows)  # noqa: E731
    assert mean(last) < mean(first) - 0.5
    assert res.metrics["steps"] == 12


def test_kl_retain_keeps_a_reference_and_trains(target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    res = unlearn.forget(
        str(target_dir),
        str(forget),
        str(retain),
        "grad_diff",
        str(tmp_path / "o"),
        overrides=[*FAST, "train.lr=1e-3", "train.max_steps=3", "method.retain_loss=kl"],
    )
    assert res.metrics["final_losses"]["retain_loss"] >= 0  # a KL is never negative
    assert res.metrics["final_losses"]["retain_loss"] > 0  # and the model has moved


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    common = [
        *FAST,
        "train.lr=1e-3",
        "train.max_steps=5",
        "train.save_every=2",
        "train.grad_accum=2",
    ]

    def boom(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(UnlearnError, match="--resume"):
        unlearn.forget(
            str(target_dir),
            str(forget),
            str(retain),
            "npo",
            str(tmp_path / "a"),
            overrides=common,
            callbacks=[boom],
        )
    assert latest_checkpoint(tmp_path / "a")[1] == 3
    res = unlearn.forget(
        str(target_dir),
        str(forget),
        str(retain),
        "npo",
        str(tmp_path / "a"),
        overrides=common,
        resume=True,
    )
    assert res.manifest["resumed_from_step"] == 3
    unlearn.forget(
        str(target_dir), str(forget), str(retain), "npo", str(tmp_path / "b"), overrides=common
    )
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [line for line in (tmp_path / "a" / "logs" / "train.jsonl").read_text().splitlines()]
    assert len(steps) == 5  # the log reads like one clean run
    assert not (tmp_path / "a" / "checkpoints").exists()  # cleaned up after success


def test_input_model_files_are_unchanged(target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    before = _tree_hash(target_dir)
    unlearn.forget(
        str(target_dir),
        str(forget),
        str(retain),
        "npo",
        str(tmp_path / "o"),
        overrides=[*FAST, "train.max_steps=1"],
    )
    assert _tree_hash(target_dir) == before
    with pytest.raises(UnlearnError, match="input model"):
        unlearn.forget(
            str(target_dir),
            str(forget),
            str(retain),
            "npo",
            str(target_dir / "sub"),
            overrides=[*FAST, "train.max_steps=1"],
        )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    items = tokenize_examples(
        [Example(str(i), "h", question=f"Q{i}?", answer=f"A{i}.") for i in range(4)],
        PromptFormatter(tok, PromptConfig()),
    )
    real = get_method("grad_ascent")
    calls = {"n": 0}

    def flaky(inputs, params):
        calls["n"] += 1
        loss, logs = real.loss(inputs, params)
        return (loss * float("nan") if calls["n"] == 3 else loss), logs

    broken = Method("flaky", "test", real.params, flaky, "none")
    with pytest.raises(TrainingDiverged, match="step 3: loss is nan") as info:
        train(
            model,
            broken,
            real.params(),
            items,
            TrainConfig(batch_size=1, max_steps=4, progress=False),
            tmp_path,
            tok.pad_token_id,
        )
    ckpt, step = latest_checkpoint(tmp_path)
    assert step == 2 and str(ckpt) in str(info.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nll_check_helper_matches_a_hand_loop(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    items = tokenize_examples(
        [Example("0", "h", question="Q?", answer="A b c.")], PromptFormatter(tok, PromptConfig())
    )
    ids = torch.tensor([items[0].input_ids])
    labels = torch.tensor([items[0].labels])
    with torch.no_grad():
        hf = model(input_ids=ids, labels=labels).loss.item()  # HF's own shifted mean NLL
    assert mean_nll(model, items, tok.pad_token_id) == pytest.approx(hf, rel=1e-5)


def test_output_folder_rules(target_dir, qa_files, tmp_path):
    forget, retain = qa_files
    out = tmp_path / "o"
    args = (str(target_dir), str(forget), str(retain), "grad_ascent", str(out))
    unlearn.forget(*args, overrides=[*FAST, "train.max_steps=1"])
    with pytest.raises(UnlearnError, match="not empty; pass --overwrite"):
        unlearn.forget(*args, overrides=[*FAST, "train.max_steps=1"])
    unlearn.forget(*args, overrides=[*FAST, "train.max_steps=1"], overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(UnlearnError, match="refusing to --overwrite"):
        unlearn.forget(
            *args[:4], str(foreign), overrides=[*FAST, "train.max_steps=1"], overwrite=True
        )
    assert (foreign / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ["grad_diff", "npo", "simnpo", "idk_nll"])
def test_deferred_retain_pass_adds_up_to_the_joint_loss(name):
    """The loop's two backward passes (forget, then alpha*retain) equal one on the joint loss."""
    from unlearn.methods.base import LossInputs
    from unlearn.train.loop import _retain_loss

    torch.manual_seed(0)
    f_logits, r_logits = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    f_labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 5]])
    r_labels = torch.tensor([[-100, 6, 2, 3], [-100, 1, 1, 5]])
    method = get_method(name)
    params = method.params()
    ref = torch.tensor([-9.0, -8.0])
    joint, _ = method.loss(LossInputs(f_logits, f_labels, r_logits, r_labels, ref), params)
    forget_part, _ = method.loss(
        LossInputs(f_logits, f_labels, ref_forget_logp=ref, defer_retain=True), params
    )
    retain_part = _retain_loss(params, r_logits, r_labels, None, {})
    assert float(forget_part + retain_part) == pytest.approx(float(joint), rel=1e-6)
    assert float(retain_part) != 0
