"""The shared loop on a 2-layer random Llama: every method trains, resume is exact, NaN stops safely."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unlearn
from conftest import write_jsonl
from unlearn.config import PromptConfig, TrainConfig
from unlearn.data import Example
from unlearn.errors import TrainingDiverged, UnlearnError
from unlearn.methods import METHODS, build_params, get_method
from unlearn.methods.base import Method
from unlearn.prompts import PromptFormatter, collate, tokenize_examples
from unlearn.train.loop import TrainJob, latest_checkpoint, plan_steps, retain_stream, train
from unlearn.train.nll_check import mean_nll

FAST = ["train.progress=false", "train.batch_size=2"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


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


# For each method: the forget-sequence NLL must rise (unlearning) or fall (fine-tuning), and every
# parameter tensor must change; or the reason this run says nothing about the method. Every
# registered method must be here: a new one fails test_direction_table_names_every_method.
DIRECTION: dict[str, int | str] = {
    "grad_ascent": +1,
    "grad_diff": +1,
    "npo": +1,
    "simnpo": +1,
    "undial": +1,
    "ce_u": +1,
    "wga": +1,
    "satimp": +1,
    "rmu": "trains only three blocks' down projections (tests/methods/test_rmu.py)",
    "pdu": +1,
    "uno": +1,
    "uno_s": +1,
    "whp": +1,
    "task_vector": +1,  # the fine-tune is negated after the last step
    "idk_nll": +1,  # pushed toward refusals, away from the original answers
    "dpo": +1,
    "idk_dpo": +1,
    "finetune": -1,
}
# Hyperparameters that let two steps on a half-trained tiny model show the forget term's move.
TUNING = {
    "pdu": ["method.dual_init=0"],  # the retain term alone would hide the forget term's move
    # a tiny model only half-memorises its answers: reinforce hard so labels become generic
    "whp": ["method.reinforce_steps=6", "method.reinforce_lr=1e-2", "method.alpha=20"],
}


def _without_retain_term(name: str) -> list[str]:
    """`method.alpha=0` where alpha weighs a retain term that is simply added to the forget term
    (by the declarations: alpha=0 drops the term), so that the forget term alone moves."""
    method = METHODS[name]
    needs = method.needs(method.params())
    if needs.retain is None or needs.gradients != "sum":
        return []
    try:
        dropped = not method.needs_retain(build_params(method, {"alpha": 0}))
    except UnlearnError:  # no such hyperparameter
        return []
    return ["method.alpha=0"] if dropped else []


def test_direction_table_names_every_method():
    assert set(DIRECTION) == set(METHODS)
    assert set(TUNING) <= set(METHODS)


@pytest.mark.parametrize("name", list(METHODS))
def test_two_steps_change_every_parameter_and_move_forget_loss(
    name, target_dir, qa_files, tmp_path
):
    direction = DIRECTION[name]  # a KeyError here: add the new method to DIRECTION
    if isinstance(direction, str):
        pytest.skip(direction)
    forget, retain = qa_files
    if name == "dpo":  # user-given preferred answers
        import json

        rows = [json.loads(x) for x in forget.read_text().splitlines()]
        forget = write_jsonl(
            tmp_path / "pref.jsonl", [{**r, "preferred": "I cannot say."} for r in rows]
        )
    before = _weights(target_dir)
    extra = _without_retain_term(name) + TUNING.get(name, [])
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
    assert (a - b) * direction > 0, f"{name}: forget NLL {b:.4f} -> {a:.4f}"
    if name == "idk_nll":
        assert (
            res.metrics["final_losses"]["refusal_nll"]
            < res.manifest["metrics"]["final_losses"]["loss"] + 1e-6
        )
    assert res.metrics["steps"] == 2


# The loop in memory, on the items a run would tokenize from `qa_files` (conftest).
FORGET_QA = [
    Example(
        str(i),
        "h",
        question=f"Where was person {i} born?",
        answer=f"Person {i} was born in city {i}.",
    )
    for i in range(6)
]
RETAIN_QA = [
    Example(str(i), "h", question=f"What does person {i} do?", answer=f"Person {i} is a teacher.")
    for i in range(10, 20)
]


def _loaded(model_dir: Path):
    """(model, pad id, forget items, retain items, formatter), loaded the way a run loads them."""
    from unlearn.config import ModelConfig
    from unlearn.models import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(ModelConfig(name=str(model_dir), device="cpu"))
    fmt = PromptFormatter(tok, PromptConfig())
    forget, retain = tokenize_examples(FORGET_QA, fmt), tokenize_examples(RETAIN_QA, fmt)
    return model, tok.pad_token_id, forget, retain, fmt


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_kl_retain_keeps_a_reference_and_trains(target_dir, tmp_path):
    model, pad, forget, retain, _ = _loaded(target_dir)
    method = get_method("grad_diff")
    cfg = TrainConfig(batch_size=2, lr=1e-3, max_steps=3, progress=False)
    params = build_params(method, {"retain_loss": "kl"})
    res = train(TrainJob(model, method, params, forget, cfg, tmp_path, pad, retain=retain))
    assert res.final_logs["retain_loss"] >= 0  # a KL is never negative
    assert res.final_logs["retain_loss"] > 0  # and the model has moved


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(target_dir, tmp_path):
    method = get_method("npo")
    cfg = TrainConfig(
        batch_size=2, lr=1e-3, max_steps=5, save_every=2, grad_accum=2, progress=False
    )

    def job(out, **kw):
        model, pad, forget, retain, _ = _loaded(target_dir)
        return model, TrainJob(
            model, method, method.params(), forget, cfg, out, pad, retain=retain, **kw
        )

    def boom(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(UnlearnError, match="--resume"):
        train(job(tmp_path / "a", callbacks=[boom])[1])
    assert latest_checkpoint(tmp_path / "a")[1] == 3
    resumed, resumed_job = job(tmp_path / "a", resume=True)
    assert train(resumed_job).resumed_from == 3
    plain, plain_job = job(tmp_path / "b")
    train(plain_job)
    wa, wb = _state(resumed), _state(plain)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [line for line in (tmp_path / "a" / "logs" / "train.jsonl").read_text().splitlines()]
    assert len(steps) == 5  # the log reads like one clean run


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
            TrainJob(
                model,
                broken,
                real.params(),
                items,
                TrainConfig(batch_size=1, max_steps=4, progress=False),
                tmp_path,
                tok.pad_token_id,
            )
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


# ---- bugs when things go wrong (issue 7) --------------------------------------------------------


def _tiny(tiny_model_dir, n: int = 4):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = [Example(str(i), "h", question=f"Q{i}?", answer=f"A{i} b{i}.") for i in range(n)]
    return model, tok, examples, tokenize_examples(examples, PromptFormatter(tok, PromptConfig()))


def _log(folder: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (folder / "logs" / "train.jsonl").read_text().splitlines()]


def test_resume_refuses_a_changed_config_and_applies_a_changed_lr(target_dir, qa_files, tmp_path):
    """A changed train.lr used to be silently ignored (optimizer/scheduler state restored)."""
    forget, retain = qa_files
    common = [*FAST, "train.max_steps=4", "train.save_every=2", "train.scheduler=constant"]
    args = (str(target_dir), str(forget), str(retain), "npo", str(tmp_path / "a"))

    def stop(step, logs):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(UnlearnError, match="--resume"):
        unlearn.forget(*args, overrides=[*common, "train.lr=1e-3"], callbacks=[stop])
    with pytest.raises(
        UnlearnError, match=r"method\.beta: 0\.1 -> 0\.2; train\.max_steps: 4 -> 5\)"
    ):
        unlearn.forget(
            *args,
            overrides=[*common, "train.lr=1e-3", "train.max_steps=5", "method.beta=0.2"],
            resume=True,
        )
    res = unlearn.forget(*args, overrides=[*common, "train.lr=5e-4"], resume=True)
    assert res.manifest["resumed_from_step"] == 2
    assert not (tmp_path / "a" / "checkpoints").exists()  # cleaned up after success
    log = _log(tmp_path / "a")
    assert [r["lr"] for r in log if "step" in r] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert {"event": "resume", "from_step": 2, "changed": {"train.lr": 5e-4}} in log


def test_ctrl_c_right_after_resume_keeps_the_newest_checkpoint(tiny_model_dir, tmp_path):
    """With log_every > 1 the interrupt used to be labelled with the last *logged* step."""
    model, tok, _, items = _tiny(tiny_model_dir)
    real = get_method("grad_ascent")
    cfg = TrainConfig(batch_size=1, max_steps=6, save_every=2, log_every=3, progress=False)

    def stop(step, logs):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(UnlearnError, match="after step 4"):
        train(
            TrainJob(
                model, real, real.params(), items, cfg, tmp_path, tok.pad_token_id, callbacks=[stop]
            )
        )

    def interrupted(inputs, params):
        raise KeyboardInterrupt

    broken = Method("grad_ascent", "test", real.params, interrupted, "none")
    with pytest.raises(UnlearnError, match="after step 4"):
        train(
            TrainJob(
                model, broken, real.params(), items, cfg, tmp_path, tok.pad_token_id, resume=True
            )
        )
    assert latest_checkpoint(tmp_path)[1] == 4


def test_nan_gradient_is_caught_without_clipping(tiny_model_dir, tmp_path):
    """max_grad_norm=0 used to skip the gradient check: a NaN update was applied and saved."""
    model, tok, _, items = _tiny(tiny_model_dir)
    real = get_method("grad_ascent")
    calls = {"n": 0}

    def nan_grad(inputs, params):  # finite loss, NaN gradient: 0 * d sqrt(x)/dx at x = 0
        calls["n"] += 1
        loss, logs = real.loss(inputs, params)
        if calls["n"] == 3:
            loss = loss + 0.0 * torch.sqrt(inputs.forget_logits.sum() * 0.0)
        return loss, logs

    broken = Method("nan_grad", "test", real.params, nan_grad, "none")
    cfg = TrainConfig(batch_size=1, max_steps=4, max_grad_norm=0.0, progress=False)
    with pytest.raises(TrainingDiverged, match="step 3: gradient norm is nan"):
        train(TrainJob(model, broken, real.params(), items, cfg, tmp_path, tok.pad_token_id))
    assert latest_checkpoint(tmp_path)[1] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- the method contract: each need is a declaration, provided by the loop ------------------------
# Tiny unregistered methods stand in for the real DPO / RMU / GRIN of later issues.

from dataclasses import dataclass  # noqa: E402

from unlearn import losses  # noqa: E402
from unlearn.methods.base import Needs, RetainTerm  # noqa: E402


@dataclass(frozen=True)
class _NoParams:
    pass


def _run(model, tok, items, method, tmp_path, **kw):
    cfg = TrainConfig(batch_size=2, max_steps=2, progress=False, lr=1e-2, **kw.pop("cfg", {}))
    return train(TrainJob(model, method, _NoParams(), items, cfg, tmp_path, tok.pad_token_id, **kw))


def test_cached_reference_values_come_from_the_start_without_a_second_model(
    tiny_model_dir, tmp_path, monkeypatch
):
    """sequence log-prob, per-token log-probs and logits of the starting model, in one pass."""
    import unlearn.train.setup as train_setup

    monkeypatch.setattr(train_setup, "frozen_copy", lambda *a: pytest.fail("kept a second model"))
    model, tok, _, items = _tiny(tiny_model_dir)
    seen = []

    def loss(inputs, params):
        ref, logits, labels = inputs.ref_forget, inputs.forget_logits, inputs.forget_labels
        token_logp, _ = losses.token_logprobs(logits, labels)
        assert ref["token_logp"].shape == token_logp.shape and ref["logits"].shape == logits.shape
        assert torch.equal(ref["sequence_logp"], inputs.ref_forget_logp)
        seen.append(
            (
                torch.allclose(ref["logits"], logits.detach(), atol=1e-5),
                torch.allclose(ref["token_logp"], token_logp.detach(), atol=1e-5),
                torch.allclose(ref["sequence_logp"], token_logp.detach().sum(-1), atol=1e-4),
            )
        )
        return -losses.nll(logits, labels), {}

    needs = Needs(reference=("sequence_logp", "token_logp", "logits"))
    method = Method("ref_dummy", "test", _NoParams, loss, "none", needs=lambda p: needs)
    _run(model, tok, items, method, tmp_path)
    assert seen[0] == (True, True, True)  # first batch: the model is still the reference
    assert seen[1] == (False, False, False)  # after one step: cached, not recomputed


def test_second_target_is_forwarded_with_its_own_reference_values(target_dir, tmp_path):
    """A DPO-shaped method: the hook gives each forget example a second answer; both forwarded."""
    seen = []

    def second_targets(examples, params, seed):
        return [f"I cannot say, {i}." for i in range(len(examples))]

    def loss(inputs, params):
        s_logp, _ = losses.sequence_logprob(inputs.second_logits, inputs.second_labels)
        f_logp, _ = losses.sequence_logprob(inputs.forget_logits, inputs.forget_labels)
        assert inputs.second_logits.shape[0] == inputs.forget_logits.shape[0]
        seen.append(torch.allclose(inputs.ref_second["sequence_logp"], s_logp.detach(), atol=1e-4))
        seen.append(torch.allclose(inputs.ref_forget_logp, f_logp.detach(), atol=1e-4))
        margin = (s_logp - inputs.ref_second["sequence_logp"]) - (f_logp - inputs.ref_forget_logp)
        return -torch.nn.functional.logsigmoid(margin).mean(), {}

    needs = Needs(reference=("sequence_logp",), second_target=True)
    method = Method(
        "dpo_dummy", "test", _NoParams, loss, "none", needs=lambda p: needs,
        second_targets=second_targets,
    )  # fmt: skip
    model, pad, forget, _, fmt = _loaded(target_dir)
    second = tokenize_examples(FORGET_QA, fmt, second_targets(FORGET_QA, _NoParams(), 0))
    cfg = TrainConfig(batch_size=2, max_steps=2, lr=1e-2, progress=False)
    train(TrainJob(model, method, _NoParams(), forget, cfg, tmp_path / "o", pad, second=second))
    assert seen[:2] == [True, True] and seen[2:4] != [True, True]
    with pytest.raises(UnlearnError, match="second answer"):  # the loop refuses a missing one
        train(TrainJob(model, method, _NoParams(), forget, cfg, tmp_path / "p", pad))


def test_hidden_states_and_a_custom_retain_term(tiny_model_dir, tmp_path):
    """An RMU-shaped method: named layers' hidden states from the model and a frozen reference."""
    model, tok, _, items = _tiny(tiny_model_dir, 6)
    calls = {"forget": [], "retain": []}

    def loss(inputs, params):
        h, ref = inputs.forget_hidden[1], inputs.ref_forget_hidden[1]
        assert h.shape == (*inputs.forget_labels.shape, 32) and not ref.requires_grad
        calls["forget"].append(torch.allclose(h, ref, atol=1e-5))
        return (h - torch.ones_like(h)).pow(2).mean(), {}  # towards a control vector, as RMU

    def retain_mse(inputs):
        h, ref = inputs.retain_hidden[1], inputs.ref_retain_hidden[1]
        calls["retain"].append(torch.allclose(h, ref, atol=1e-5))
        return (h - ref).pow(2).mean()

    needs = Needs(
        retain=RetainTerm(weight=2.0, kind="hidden_mse", loss=retain_mse),
        hidden_layers=(1,),
        reference_hidden_layers=(1,),
    )
    method = Method("rmu_dummy", "test", _NoParams, loss, "none", needs=lambda p: needs)
    res = _run(model, tok, items[:4], method, tmp_path, retain=items[4:])
    assert calls["forget"][0] and not calls["forget"][-1]  # frozen reference, moving model
    assert calls["retain"][0] and not calls["retain"][-1]
    assert res.final_logs["retain_loss"] > 0


def test_parameter_mask_limits_updates_decay_and_optimizer_state(tiny_model_dir, tmp_path):
    """A GRIN-shaped method: only the selected entries change, even under weight decay."""
    model, tok, _, items = _tiny(tiny_model_dir)
    name = "model.layers.0.mlp.down_proj.weight"
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    mask = torch.zeros_like(before[name], dtype=torch.bool)
    mask[:3] = True

    def pick(model, params):
        return {name: mask, "model.norm.weight": torch.zeros_like(before["model.norm.weight"])}

    ga = get_method("grad_ascent")
    method = Method("grin_dummy", "test", _NoParams, ga.loss, "none", parameter_mask=pick)
    _run(model, tok, items, method, tmp_path, cfg={"weight_decay": 0.5, "save_every": 1})
    after = dict(model.named_parameters())
    assert not torch.equal(after[name][mask], before[name][mask])
    assert torch.equal(after[name][~mask], before[name][~mask])
    assert all(torch.equal(after[k], before[k]) for k in before if k != name)
    assert all(p.requires_grad for p in model.parameters())  # frozen only while training
    state = torch.load(tmp_path / "checkpoints" / "step-1" / "optimizer.bin", weights_only=False)[
        "state"
    ]
    assert len(state) == 1  # optimizer state only for the one tensor with selected entries


def test_shards_keep_the_global_batch_mean():
    """Each rank's weight makes the ranks' average the global mean; no example is duplicated."""
    from unlearn.train.schedule import shard

    assert shard([7, 8, 9], 0, 2) == ([7, 9], 4 / 3) and shard([7, 8, 9], 1, 2) == ([8], 2 / 3)
    assert shard([5], 1, 2) == ([5], 0.0)  # takes part in the all-reduce, contributes nothing
    losses_ = {7: 1.0, 8: 2.0, 9: 6.0}
    per_rank = [
        w * sum(losses_[i] for i in m) / len(m) for m, w in (shard([7, 8, 9], r, 2) for r in (0, 1))
    ]
    assert sum(per_rank) / 2 == pytest.approx(3.0)


def test_launcher_plugins_that_do_not_fit_are_refused_in_one_line():
    """accelerate's FSDP plugin is refused for ours (train.sharding=fsdp2); its DeepSpeed plugin
    from a launcher config only with train.sharding=deepspeed (which builds its own)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from unlearn.config import TrainConfig
    from unlearn.train.setup import refuse_unsupported as _refuse_unsupported

    def acc(kind):
        return SimpleNamespace(distributed_type=DistributedType[kind])

    plain, ds = TrainConfig(), TrainConfig(sharding="deepspeed")
    with pytest.raises(UnlearnError, match=r"plugin is not supported.*train.sharding=fsdp2") as err:
        _refuse_unsupported(acc("FSDP"), plain)
    assert "\n" not in str(err.value)
    with pytest.raises(UnlearnError, match=r"set train.sharding=deepspeed") as err:
        _refuse_unsupported(acc("DEEPSPEED"), plain)
    assert "\n" not in str(err.value)
    _refuse_unsupported(acc("DEEPSPEED"), ds)
    _refuse_unsupported(acc("MULTI_CPU"), plain)


@pytest.mark.parametrize(
    ("name", "packed"),
    [("grad_diff", True), ("grad_ascent", True), ("npo", True), ("finetune", True),
     ("grad_diff", False), ("npo", False)],
)  # fmt: skip
def test_shared_prefix_and_kept_logits_change_nothing(
    name, packed, target_dir, tmp_path, monkeypatch
):
    """The loop runs a batch's common first tokens once, packs the rest without padding (or
    pads it, `packed=False`) and computes logits from the position before its first answer token
    on; the weights after training equal those of a run that feeds every row whole and computes
    logits at every position."""
    import unlearn.forward as fwd

    method = get_method(name)
    cfg = TrainConfig(batch_size=2, lr=1e-3, max_steps=3, progress=False)
    shared_calls = []
    fn = "packed_forward" if packed else "prefix_forward"
    original = getattr(fwd, fn)

    def counted(*args):
        shared_calls.append(args[2])
        return original(*args)

    monkeypatch.setattr(fwd, fn, counted)
    if not packed:
        monkeypatch.setattr(fwd, "uses_sdpa", lambda m: False)
    runs = {}
    for fast in (True, False):
        monkeypatch.setattr(fwd, "takes_logits_to_keep", lambda m, fast=fast: fast)
        monkeypatch.setattr(fwd, "takes_cache", lambda m, fast=fast: fast)
        model, pad, forget, retain, _ = _loaded(target_dir)
        base = _state(model)
        retain = None if name == "finetune" else retain  # `unlearn finetune` has no retain set
        job = TrainJob(model, method, method.params(), forget, cfg, tmp_path / f"fast-{fast}", pad)
        job.retain = retain
        train(job)
        runs[fast] = _state(model)
        if fast:
            assert shared_calls and min(shared_calls) >= 4  # the chat template's opening
            n_shared = len(shared_calls)
    assert len(shared_calls) == n_shared  # the slow run never took the shared path
    # AdamW turns rounding noise in near-zero gradient entries into updates of up to lr (1e-3)
    # per step; a wrong gradient moves weights by that much, rounding by a few hundredths of it
    for key, value in runs[True].items():
        assert torch.allclose(value, runs[False][key], atol=5e-5), (
            key,
            float((value - runs[False][key]).abs().max()),
        )
    assert any(not torch.equal(v, base[k]) for k, v in runs[True].items())


def test_shared_prefix_gives_the_kl_retain_term_and_its_gradients(tiny_model_dir):
    """A KL retain term through the shared-prefix path: same logits, KL and gradients as the
    whole batch. (Compared directly: at the start a KL's gradient is rounding noise, which AdamW
    scales to updates of ~lr/10 whichever path made it, so trained weights are no test here.)"""
    import copy

    from unlearn.forward import kept_positions
    from unlearn.forward import prefix_forward as _prefix_forward
    from unlearn.forward import shared_prefix as _shared_prefix

    model, tok, _, items = _tiny(tiny_model_dir, 3)
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():  # a model that has moved away from its reference
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = collate(items, tok.pad_token_id)
    labels = batch.pop("labels")
    kept = kept_positions(labels)
    shared = _shared_prefix(batch, kept)
    assert shared >= 4 and kept is not None
    with torch.no_grad():
        ref_logits = ref(**batch, logits_to_keep=kept).logits
    results = []
    for fast in (False, True):
        model.zero_grad()
        out = (
            _prefix_forward(model, batch, shared, {"logits_to_keep": kept})
            if fast
            else model(**batch, logits_to_keep=kept)
        )
        kl = losses.kl_to_reference(out.logits, ref_logits, labels[:, -kept:])
        kl.backward()
        results.append(
            (out.logits.detach(), kl.detach(), [p.grad.clone() for p in model.parameters()])
        )
    (l0, k0, g0), (l1, k1, g1) = results
    assert float(k0) > 1e-3
    assert torch.allclose(l0, l1, atol=1e-5) and torch.allclose(k0, k1, rtol=1e-5)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_shared_prefix_length():
    from unlearn.forward import shared_prefix as _shared_prefix

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0], [1, 2, 3, 4, 5, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1] * 8])
    batch = {"input_ids": ids, "attention_mask": mask}
    assert _shared_prefix(batch, kept=3) == 5
    assert _shared_prefix(batch, kept=4) == 4  # the kept logits' positions run in the batch
    assert _shared_prefix(batch, kept=6) == 0  # under 4 shared tokens: not worth a second call
    assert _shared_prefix(batch, kept=None) == 0
    assert _shared_prefix({k: v[:1] for k, v in batch.items()}, kept=3) == 0  # one row


def test_kept_positions_start_one_before_the_first_scored_token():
    from unlearn.forward import kept_positions

    labels = torch.tensor([[-100, -100, -100, 5, 6], [-100, -100, -100, -100, 7]])
    assert kept_positions(labels) == 3  # positions 2..4: position 2 predicts the first answer token
    assert kept_positions(torch.full((2, 4), -100)) is None
    assert kept_positions(torch.tensor([[-100, 3, 4]])) is None  # nothing worth cutting
