"""`unlearn attack`: quantization round trips through bitsandbytes' quantizers (CPU), prompt
rewrites of the forget questions, relearning, recovery against the target, and the command end
to end on the tiny models (the unlearned model's folder is only read)."""

from __future__ import annotations

import json

import pytest
import torch

from unlearn.attacks.prompts import JAILBREAK, attack_suite
from unlearn.attacks.quantize import SCHEMES, quantize_dequantize, quantize_model
from unlearn.attacks.run import recovery
from unlearn.errors import UnlearnError
from unlearn.eval.suites.builders import custom_suite, people_suite

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantization_round_trips_are_close_and_on_a_grid(scheme):
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02
    q = quantize_dequantize(w, scheme)
    assert q.shape == w.shape and q.dtype == w.dtype and not torch.equal(q, w)
    rel = float((q - w).abs().mean() / w.abs().mean())
    assert rel < (0.02 if scheme == "int8" else 0.2), rel
    # a second round trip changes (almost) nothing: the values sit on the quantizer's grid
    again = quantize_dequantize(q, scheme)
    assert float((again - q).abs().max()) <= 1e-3 * float(w.abs().max())
    # the 4-bit grids hold 16 values per block; far fewer distinct values than the weights
    if scheme != "int8":
        assert len(torch.unique(q[0, :64])) <= 16


def test_a_move_smaller_than_the_grid_is_rounded_away():
    """The mechanism Zhang et al. describe: unlearning's small weight changes vanish under 4-bit
    rounding, so the quantized unlearned weights equal the quantized original ones."""
    g = torch.Generator().manual_seed(1)
    w = quantize_dequantize(torch.randn(8, 128, generator=g), "rtn4")  # on the grid
    step = float(w.abs().amax(dim=1).min()) / 7
    nudge = (torch.rand(w.shape, generator=g) - 0.5) * 0.2 * step  # unlearning's small move
    nudge[w.abs() == w.abs().amax(dim=1, keepdim=True)] = 0  # (each group's scale stays)
    moved = w + nudge
    assert not torch.equal(moved, w)
    assert torch.equal(quantize_dequantize(moved, "rtn4"), w)


def test_quantize_model_changes_the_block_linears_only(target_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = quantize_model(model, "nf4")
    assert 0 < info["relative_change"] < 0.5
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        in_block_linear = ".layers." in n and n.endswith("proj.weight")
        assert changed == in_block_linear, n


def test_prompt_attacks_rewrite_only_the_forget_questions():
    suite = people_suite()
    forget = next(s for s in suite.sets if s.role == "forget")
    others = {s.name: s.rows for s in suite.sets if s.role != "forget"}
    para = attack_suite(suite, "paraphrase")
    rows = next(s for s in para.sets if s.role == "forget").rows
    assert [r["question"] for r in rows] == [r["paraphrased_question"] for r in forget.rows]
    assert [r["answer"] for r in rows] == [r["answer"] for r in forget.rows]
    assert {s.name: s.rows for s in para.sets if s.role != "forget"} == others
    few = next(s for s in attack_suite(suite, "fewshot", shots=2).sets if s.role == "forget").rows
    for mine, orig in zip(few, forget.rows, strict=True):
        assert mine["question"].endswith(orig["question"])
        shown = mine["question"][: -len(orig["question"])]
        assert sum(r["question"] in shown for r in forget.rows if r is not orig) == 2
    assert (
        few
        == next(s for s in attack_suite(suite, "fewshot", shots=2).sets if s.role == "forget").rows
    )  # seeded
    jb = next(s for s in attack_suite(suite, "jailbreak").sets if s.role == "forget").rows
    assert all(r["question"].startswith(JAILBREAK) for r in jb)


def test_paraphrase_without_paraphrased_questions_is_one_line(tmp_path):
    f = tmp_path / "f.jsonl"
    f.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2", "answer": "a2"}\n')
    suite = custom_suite(str(f), str(f), None)
    with pytest.raises(UnlearnError, match="paraphrased_question") as err:
        attack_suite(suite, "paraphrase")
    assert "\n" not in str(err.value)


def test_recovery_is_the_share_of_the_gap_brought_back():
    unlearned = {"forget_rouge": 0.2, "forget_prob": 0.5, "forget_same": 0.7}
    target = {"forget_rouge": 1.0, "forget_prob": 0.1, "forget_same": 0.7}
    attacked = {"forget_rouge": 0.6, "forget_prob": 0.4, "forget_same": 0.9}
    out = recovery(attacked, unlearned, target, sorted(unlearned))
    assert out["recovery"]["forget_rouge"] == pytest.approx(0.5)
    assert out["recovery"]["forget_prob"] == pytest.approx(0.25)  # lower is the target's side
    assert out["not_moved"] == ["forget_same"] and "forget_same" not in out["recovery"]
    assert out["mean_recovery"] == pytest.approx(0.375)
    assert out["median_recovery"] == pytest.approx(0.375)
    # one barely-moved metric's huge ratio moves the mean, not the median
    unlearned["forget_tr"], target["forget_tr"], attacked["forget_tr"] = 0.5, 0.502, 0.3
    out = recovery(attacked, unlearned, target, sorted(unlearned))
    assert out["recovery"]["forget_tr"] == pytest.approx(-100)
    assert out["median_recovery"] == pytest.approx(0.25) and out["mean_recovery"] < -30


def test_attack_from_the_command_line(target_dir, qa_files, tmp_path, capsys):
    """Unlearn the tiny target, attack it: every attack writes its evaluation (and its model,
    for weight attacks) under the output folder, names the unlearned model "before", reports
    recovery and utility; the unlearned model's files are untouched."""
    pytest.importorskip("bitsandbytes")
    import unlearn
    from unlearn.cli import main
    from unlearn.models import hash_model_files

    forget, retain = qa_files
    unlearned = tmp_path / "unlearned"
    unlearn.forget(
        str(target_dir), str(forget), str(retain), "grad_ascent", str(unlearned),
        overrides=["train.max_steps=2", "train.lr=1e-3", "train.progress=false",
                   "train.nll_check=false"],
    )  # fmt: skip
    before = hash_model_files(str(unlearned))
    ref = tmp_path / "retain_eval"  # the tiny model stands in for the retain model
    unlearn.evaluate(str(target_dir), str(ref), benchmark="people", limit=4, progress=False,
                     overrides=["generation.max_new_tokens=4"])  # fmt: skip
    out = tmp_path / "attack"
    code = main([
        "attack", "--model", str(unlearned), "--target", str(target_dir), "--benchmark", "people",
        "--limit", "4", "--attacks", "quant8,quant4_rtn,relearn_split,paraphrase,fewshot",
        "--reference", str(ref), "--output", str(out), "generation.max_new_tokens=4",
        "attack.relearn_steps=2", "attack.relearn_lr=1e-3",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "attack.json").read_text())
    assert list(summary["attacks"]) == [
        "quant8", "quant4_rtn", "relearn_split", "paraphrase", "fewshot"
    ]  # fmt: skip
    assert summary["forget_metrics"] and "forget_rouge_l_recall" in summary["forget_metrics"]
    for name, a in summary["attacks"].items():
        assert (out / "attacks" / name / "eval" / "results.json").is_file(), name
        res = json.loads((out / "attacks" / name / "eval" / "results.json").read_text())
        assert "before" in res["comparisons"] and "target" in res["comparisons"]
        # the retain evaluation scored every forget row; relearn_split measures half of them
        assert ("retain" in res["comparisons"]) == (name != "relearn_split"), name
        assert a["recovery"] or a["not_moved"], name
        assert a["utility"], name
    # the attacked weights were evaluated, then deleted (attack.keep_models=false, the default)
    assert summary["attacks"]["quant8"]["model_deleted"] is True
    assert not (out / "attacks" / "quant8" / "model").exists()
    assert summary["attacks"]["quant8"]["scheme"] == "int8"
    assert summary["attacks"]["relearn_split"]["relearned_rows"] >= 1
    assert summary["attacks"]["paraphrase"]["model"] is None  # the prompts change, not the model
    assert hash_model_files(str(unlearned)) == before
    assert "| quant8 |" in printed and (out / "attack.md").is_file()
    report = (out / "report" / "report.md").read_text()  # the report's attacks section
    assert "## Attacks" in report and "quant4_rtn" in report


def test_attack_without_a_target_or_with_an_unknown_attack_is_one_line(target_dir, tmp_path):
    import unlearn

    for kwargs, needle in (
        ({"target": None}, "needs --target"),
        ({"target": str(target_dir), "attacks": "quant9"}, "unknown attack 'quant9'"),
    ):
        with pytest.raises(UnlearnError, match=needle) as err:
            unlearn.attack(str(target_dir), output=str(tmp_path / "o"), benchmark="people",
                           **kwargs)  # fmt: skip
        assert "\n" not in str(err.value)


def test_quantization_without_bitsandbytes_or_into_the_model_folder_is_one_line(
    target_dir, monkeypatch
):
    import builtins

    import unlearn

    real = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(UnlearnError, match="pip install bitsandbytes") as err:
        quantize_dequantize(torch.ones(4, 8), "nf4")
    assert "\n" not in str(err.value)
    assert quantize_dequantize(torch.ones(4, 128), "rtn4").shape == (4, 128)  # needs nothing
    monkeypatch.setattr(builtins, "__import__", real)
    with pytest.raises(UnlearnError, match="must not be a model folder"):
        unlearn.attack(str(target_dir), str(target_dir), str(target_dir), benchmark="people")


def test_relearning_with_nothing_to_relearn_is_one_line(tmp_path):
    from unlearn.attacks.run import _relearn
    from unlearn.config import AttackSettings

    with pytest.raises(UnlearnError, match=r"attack\.relearn_data") as err:
        _relearn("unused", [], AttackSettings(), tmp_path / "m", None)
    assert "\n" not in str(err.value)
