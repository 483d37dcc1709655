"""DPO: the loss against hand values and OpenUnlearning's formula, which answer moves which way
in the real loop, cached reference values for both answers, and the data's `preferred` column.

Tiny sequences of tests/method_inputs.py (vocabulary 3, logit rows [ln 2, 0, 0] -> softmax
[1/2, 1/4, 1/4]): A has log pi(y|x) = -3 ln 2 (2 answer tokens), B has -2 ln 2 (1 token).
IdkDPO, the same loss with refusals as the preferred answers: tests/methods/test_idk_dpo.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import unlearn
from conftest import write_jsonl
from method_inputs import LN2, close, dpo_inputs, log_sigmoid
from unlearn import losses
from unlearn.cli import main
from unlearn.config import DataConfig, PromptConfig, TrainConfig
from unlearn.data import Example, load_examples
from unlearn.errors import UnlearnError
from unlearn.methods import build_params, get_method
from unlearn.methods.base import LossInputs
from unlearn.methods.dpo import DPOParams, dpo_loss
from unlearn.methods.retain import objective
from unlearn.prompts import PromptFormatter, collate, tokenize_examples
from unlearn.train.loop import TrainJob, train

FAST = ["train.progress=false", "train.batch_size=2", "train.max_steps=2", "train.nll_check=false"]


# ---- the loss ------------------------------------------------------------------------------------


def test_dpo_loss_from_hand_log_ratios() -> None:
    """Rejected [A, B], preferred [B, A]; log-ratios l = [1, -2], w = [-0.5, 1]: margins
    w - l = [-1.5, 3], forget = -(2/beta) * mean(log sigmoid(-1.5 beta), log sigmoid(3 beta))."""
    beta = 0.1
    inputs = dpo_inputs("AB", "BA", [1.0, -2.0], [-0.5, 1.0])
    loss, logs = dpo_loss(inputs, DPOParams(beta=beta, alpha=0.0))
    forget = -(2 / beta) * (log_sigmoid(-1.5 * beta) + log_sigmoid(3 * beta)) / 2
    close(loss, forget)
    close(logs["forget_loss"], forget)
    close(logs["win_log_ratio"], 0.25)
    close(logs["lose_log_ratio"], -0.5)
    close(logs["forget_nll"], 5 * LN2 / 3)  # (3 ln 2 + 2 ln 2) over 3 answer tokens
    # gamma and alpha weight the two terms; retain B's NLL is 2 ln 2.
    inputs = dpo_inputs("AB", "BA", [1.0, -2.0], [-0.5, 1.0], retain="B")
    loss, logs = objective(get_method("dpo"), inputs, DPOParams(beta=beta, gamma=2.0, alpha=0.5))
    close(loss, 2 * forget + 0.5 * 2 * LN2)
    close(logs["retain_loss"], 2 * LN2)


def _openunlearning_dpo(win, lose, ref_win, ref_lose, beta):
    """OpenUnlearning's compute_dpo_loss / compute_batch_nll (src/trainer/utils.py), transcribed:
    full-sequence logits and labels, shifted inside, per-sequence summed cross-entropy."""

    def batch_nll(logits, labels):
        ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
        return ce(logits[..., :-1, :].transpose(-1, -2), labels[..., 1:]).sum(dim=-1)

    win_log_ratio = -(batch_nll(*win) - batch_nll(*ref_win))
    lose_log_ratio = -(batch_nll(*lose) - batch_nll(*ref_lose))
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def test_dpo_matches_openunlearning_formula_on_random_logits() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([[-100, -100, 3, 1, 4], [-100, 2, 2, 0, -100]])
    win_labels = torch.tensor([[-100, -100, 0, 0, -100], [-100, 1, 4, 4, 3]])
    lose, ref_lose, win, ref_win = (torch.randn(2, 5, 6) * 3 for _ in range(4))
    beta = 0.3
    expected = _openunlearning_dpo(
        (win, win_labels), (lose, labels), (ref_win, win_labels), (ref_lose, labels), beta
    )
    inputs = LossInputs(
        lose,
        labels,
        ref_forget_logp=losses.sequence_logprob(ref_lose, labels)[0],
        second_logits=win,
        second_labels=win_labels,
        ref_second={"sequence_logp": losses.sequence_logprob(ref_win, win_labels)[0]},
    )
    loss, _ = dpo_loss(inputs, DPOParams(beta=beta, alpha=0.0))
    close(loss, float(expected))


def test_dpo_at_the_start_is_two_over_beta_log_two() -> None:
    """model == reference: both log-ratios are 0, log sigmoid(0) = -ln 2, forget = (2/beta) ln 2."""
    for beta in (0.1, 0.5):
        _, logs = dpo_loss(
            dpo_inputs("AB", "BA", [0.0, 0.0], [0.0, 0.0]), DPOParams(beta=beta, alpha=0)
        )
        close(logs["forget_loss"], (2 / beta) * LN2)


def test_dpo_without_its_inputs_fails() -> None:
    inputs = dpo_inputs("A", "B", [0.0], [0.0])
    no_second = dataclasses.replace(inputs, second_logits=None, ref_second={})
    with pytest.raises(ValueError, match="second"):
        dpo_loss(no_second, DPOParams(alpha=0))
    with pytest.raises(ValueError, match="ref_forget_logp"):
        dpo_loss(dataclasses.replace(inputs, ref_forget_logp=None), DPOParams(alpha=0))


def test_defaults_and_validation() -> None:
    assert DPOParams() == DPOParams(beta=0.1, gamma=1.0, alpha=1.0, retain_loss="nll")
    with pytest.raises(UnlearnError, match="beta"):
        build_params("dpo", {"beta": "0"})
    with pytest.raises(UnlearnError, match="gamma"):
        build_params("dpo", {"gamma": "-1"})


def test_no_reference_model_and_both_answers_cached_by_declaration() -> None:
    method = get_method("dpo")
    needs = method.needs(method.params())
    assert needs.second_target and needs.reference == ("sequence_logp",)
    assert not method.needs_reference_model(method.params())
    assert method.needs_reference_model(build_params(method, {"retain_loss": "kl"}))
    assert not method.needs_retain(build_params(method, {"alpha": "0"}))
    assert method.forget_targets is None  # the data's answer is the rejected one
    assert method.second_targets is not None


# ---- the second targets --------------------------------------------------------------------------


def test_second_targets_are_the_preferred_answers() -> None:
    qa = [
        Example(str(i), "h", question=f"Q{i}?", answer=f"A{i}.", preferred=f"P{i}.") for i in (0, 1)
    ]
    dpo = get_method("dpo")
    assert dpo.second_targets(qa, dpo.params(), 0) == ["P0.", "P1."]
    doc = [Example("d", "h", text="a document")]
    with pytest.raises(UnlearnError, match="'d' is a document"):
        dpo.second_targets(doc, dpo.params(), 0)


def test_missing_preferred_answer_is_one_line_naming_the_column() -> None:
    qa = [
        Example("0", "h", question="Q?", answer="A.", preferred="P."),
        Example("q7", "h", question="Q?", answer="A."),
    ]
    with pytest.raises(UnlearnError) as err:
        get_method("dpo").second_targets(qa, DPOParams(), 0)
    msg = str(err.value)
    assert "\n" not in msg
    assert "'q7' has no preferred answer" in msg and "'preferred' column" in msg
    assert "forget.preferred_key=" in msg and "idk_dpo" in msg


# ---- data -----------------------------------------------------------------------------------------


def test_loader_reads_the_preferred_column(tmp_path) -> None:
    rows = [
        {"question": "Q0?", "answer": "A0.", "preferred": "P0."},
        {"question": "Q1?", "answer": "A1.", "preferred": None},
        {"question": "Q2?", "answer": "A2.", "preferred": "  "},
        {"question": "Q3?", "answer": "A3."},
    ]
    ex = load_examples(DataConfig(path=str(write_jsonl(tmp_path / "f.jsonl", rows))), "forget")
    assert [e.preferred for e in ex] == ["P0.", None, None, None]
    plain = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    same = load_examples(DataConfig(path=str(write_jsonl(tmp_path / "p.jsonl", plain))))
    assert [e.sha256 for e in ex] == [e.sha256 for e in same]  # the preferred answer is not hashed
    renamed = [{"q": "Q?", "a": "A.", "better": "B."}]
    cfg = DataConfig(
        path=str(write_jsonl(tmp_path / "r.jsonl", renamed)),
        question_key="q",
        answer_key="a",
        preferred_key="better",
    )
    assert load_examples(cfg)[0].preferred == "B."


def test_loader_preferred_from_csv_blank_cell_and_bad_value(tmp_path) -> None:
    csv = tmp_path / "f.csv"
    csv.write_text("question,answer,preferred\nQ0?,A0.,P0.\nQ1?,A1.,\n")
    assert [e.preferred for e in load_examples(DataConfig(path=str(csv)))] == ["P0.", None]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"question": "Q?", "answer": "A.", "preferred": 3}])
    with pytest.raises(UnlearnError, match="row 0 has a non-text value in 'preferred'") as err:
        load_examples(DataConfig(path=str(bad)), "forget")
    assert "\n" not in str(err.value)


# ---- the real loop --------------------------------------------------------------------------------


def _tiny(tiny_model_dir, n: int = 4):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = [
        Example(
            str(i),
            "h",
            question=f"Where was person {i} born?",
            answer=f"Person {i} was born in city {i}.",
            preferred="I do not know the answer to that question.",
        )
        for i in range(n)
    ]
    fmt = PromptFormatter(tok, PromptConfig())
    rejected = tokenize_examples(examples, fmt)
    preferred = tokenize_examples(examples, fmt, [e.preferred for e in examples])
    return model, tok, rejected, preferred


def _sequence_logp(model, items, pad_id) -> torch.Tensor:
    batch = collate(items, pad_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        return losses.sequence_logprob(model(**batch).logits, labels)[0]


def test_one_step_moves_preferred_up_and_rejected_down_with_cached_references(
    tiny_model_dir, tmp_path, monkeypatch
) -> None:
    """One optimizer step of `dpo` in the real loop, no retain term: every rejected answer's summed
    log-prob falls, every preferred one's rises. The loss sees the starting model's log-probs for
    both answers, cached before step 1 (equal to the model's own at step 1, not at step 2),
    and no frozen copy of the model is made."""
    import unlearn.train.setup as train_setup

    monkeypatch.setattr(train_setup, "frozen_copy", lambda *a: pytest.fail("kept a second model"))
    model, tok, rejected, preferred = _tiny(tiny_model_dir)
    pad = tok.pad_token_id
    lose0, win0 = _sequence_logp(model, rejected, pad), _sequence_logp(model, preferred, pad)
    seen = []

    def checking_loss(inputs, params):
        lose = losses.sequence_logprob(inputs.forget_logits, inputs.forget_labels)[0].detach()
        win = losses.sequence_logprob(inputs.second_logits, inputs.second_labels)[0].detach()
        seen.append(
            (
                torch.allclose(inputs.ref_forget_logp, lose, atol=1e-4),
                torch.allclose(inputs.ref_second["sequence_logp"], win, atol=1e-4),
            )
        )
        return dpo_loss(inputs, params)

    method = dataclasses.replace(get_method("dpo"), loss=checking_loss)
    cfg = TrainConfig(batch_size=4, max_steps=1, lr=1e-3, progress=False, weight_decay=0.0)
    train(
        TrainJob(
            model,
            method,
            DPOParams(alpha=0.0),
            rejected,
            cfg,
            tmp_path / "a",
            pad,
            second=preferred,
        )
    )
    lose1, win1 = _sequence_logp(model, rejected, pad), _sequence_logp(model, preferred, pad)
    assert seen == [(True, True)]
    assert (lose1 < lose0 - 0.1).all() and (win1 > win0 + 0.1).all()  # each moves by ~1 nat

    seen.clear()  # two steps of 2: step 2's references are the start's, not the moved model's
    model, tok, rejected, preferred = _tiny(tiny_model_dir)
    cfg = dataclasses.replace(cfg, batch_size=2, max_steps=2, lr=1e-2)
    train(
        TrainJob(
            model,
            method,
            DPOParams(alpha=0.0),
            rejected,
            cfg,
            tmp_path / "b",
            pad,
            second=preferred,
        )
    )
    assert seen == [(True, True), (False, False)]


# ---- end to end -----------------------------------------------------------------------------------


@pytest.fixture
def preferred_files(qa_files, tmp_path) -> tuple[Path, Path, Path]:
    """qa_files' forget set with and without a "preferred" column, and its retain set."""
    forget, retain = qa_files
    rows = [json.loads(line) for line in forget.read_text().splitlines()]
    with_pref = [
        {**r, "preferred": f"Sorry, I cannot say where person {i} was born."}
        for i, r in enumerate(rows)
    ]
    return write_jsonl(tmp_path / "pref.jsonl", with_pref), forget, retain


def test_forget_end_to_end(tiny_model_dir, preferred_files, tmp_path):
    with_pref, _, retain = preferred_files
    res = unlearn.forget(
        str(tiny_model_dir), str(with_pref), str(retain), "dpo", str(tmp_path / "out"),
        overrides=[*FAST, "train.lr=1e-3"],
    )  # fmt: skip
    assert res.metrics["steps"] == 2
    final = res.metrics["final_losses"]
    for key in ("forget_loss", "win_log_ratio", "lose_log_ratio", "preferred_nll"):
        assert math.isfinite(final[key])
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_dpo_without_preferred_column_is_one_line(tiny_model_dir, preferred_files, tmp_path):
    _, plain, retain = preferred_files
    with pytest.raises(UnlearnError) as err:
        unlearn.forget(
            str(tiny_model_dir), str(plain), str(retain), "dpo", str(tmp_path / "out"),
            overrides=FAST,
        )  # fmt: skip
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("method 'dpo' needs a preferred answer for every forget example")
    assert "example '0' has no preferred answer" in msg and "'preferred' column" in msg


def test_cli_lists_the_defaults(capsys) -> None:
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    dpo = next(line for line in lines if line.startswith("dpo:"))
    assert "beta=0.1" in dpo and "alpha=1.0" in dpo and "retain_loss=nll" in dpo
