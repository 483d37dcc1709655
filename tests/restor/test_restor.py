"""RESTOR: facts, documents, metrics, each stage on the tiny model, the pipeline, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED
from unlearn.cli import main
from unlearn.errors import UnlearnError
from unlearn.metrics import restor as metrics
from unlearn.restor import documents
from unlearn.restor.facts import few_shot_prompt, load_facts, shots_for

PEOPLE = ["Ada Stone", "Bo Lark", "Cy Moss", "Di Fern", "Ed Pike", "Flo Reed", "Gus Hale"]
COUNTRIES = ["France", "Spain", "Chile", "Peru", "Japan", "Kenya", "Norway"]
JOBS = ["teacher", "painter", "engineer", "farmer", "singer", "pilot", "baker"]
FAST_TRAIN = ["train.progress=false", "train.max_steps=2"]


def facts_dict() -> dict:
    dset = {}
    for i, p in enumerate(PEOPLE):
        dset[p] = {
            "P21": {"question": f"What is the sex/gender of {p}?", "answers": [("female", "male")[i % 2]]},
            "P27": {"question": f"What is the country of citizenship of {p}?", "answers": [COUNTRIES[i]]},
            "P106": {"question": f"What is the occupation of {p}?", "answers": [JOBS[i], "writer"]},
        }  # fmt: skip
    others = ["Ivy Kent", "Jon Webb", "Kai Lund", "Lea Voss", "Max Ortiz", "Ned Roy"]
    context = {
        rel: [
            {"question": q.format(p=p), "answer": a, "entity": p}
            for p, a in zip(["Ada Stone", *others], answers, strict=False)
        ]
        for rel, q, answers in (
            ("P21", "What is the sex/gender of {p}?", ["female", "male"] * 4),
            ("P27", "What is the country of citizenship of {p}?", ["Italy", "Egypt", "India",
                                                                    "Cuba", "Iran", "Fiji", "Oman"]),
            ("P106", "What is the occupation of {p}?", ["nurse", "judge", "poet", "chef",
                                                         "actor", "monk", "tailor"]),
        )
    }  # fmt: skip
    return {"dset": dset, "context": context}


@pytest.fixture
def facts_file(tmp_path) -> Path:
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(facts_dict()))
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- facts and prompts
def test_prompt_is_five_shots_of_the_relation_about_other_entities(facts_file):
    facts = load_facts(facts_file)
    fact = facts.by_entity["Ada Stone"]["P27"]
    prompt = few_shot_prompt(facts, fact)
    lines = prompt.split("\n")
    assert len(lines) == 6 and lines[-1] == "What is the country of citizenship of Ada Stone?"
    assert all("country of citizenship" in line for line in lines[:5])
    assert "Ada Stone" not in "".join(lines[:5])  # her own context line is left out
    assert lines[0] == "What is the country of citizenship of Ivy Kent? Egypt"
    # every other entity's prompt has the same in-context lines: one shared prefix per relation
    other = shots_for(facts, facts.by_entity["Bo Lark"]["P27"])
    assert [s.entity for s in other] == [
        "Ada Stone",
        "Ivy Kent",
        "Jon Webb",
        "Kai Lund",
        "Lea Voss",
    ]


def test_real_facts_file_loads():
    path = SHARED / "restor" / "facts.json"
    if not path.is_file():
        pytest.skip("needs ../shared/data/restor")
    facts = load_facts(path)
    assert len(facts.entities) > 400 and len(facts.context) == 41
    names = json.loads((SHARED / "restor" / "entities.json").read_text())
    facts.check_entities(names, "entities")
    docs = documents.load_documents(SHARED / "restor" / "wikidata" / "v0" / "mix_a0.json")
    found = documents.find_targets(docs[:600], facts)
    assert "Aaron Burr" in found


@pytest.mark.parametrize(
    "broken, needle",
    [
        ({"context": {}}, "no 'dset' object"),
        (
            {"dset": {"X": {"P21": {"question": "Q?"}}}, "context": {}},
            "dset['X']['P21'] has no 'answers'",
        ),
        ({"dset": {"X": {"P21": {"answers": ["a"]}}}, "context": {}}, "has no 'question'"),
        ({"dset": {}}, "no 'context' object"),
        ({"dset": {}, "context": {"P21": [{"question": "Q?"}]}}, "context['P21'][0] needs"),
    ],
)
def test_facts_file_errors_name_the_entry(tmp_path, broken, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(UnlearnError, match=None) as exc:
        load_facts(path)
    message = str(exc.value)
    assert needle in message and "\n" not in message and str(path) in message


def test_too_few_shots_is_an_error(facts_file):
    facts = load_facts(facts_file)
    with pytest.raises(UnlearnError, match="fewer than shots=9"):
        few_shot_prompt(facts, facts.by_entity["Bo Lark"]["P21"], shots=9)


# ---------------------------------------------------------------------------- documents
def test_generated_corruption_states_wrong_answers_only(facts_file):
    facts = load_facts(facts_file)
    rows, wrong = documents.generate_corruption(
        facts, ["Ada Stone", "Bo Lark"], docs_per_entity=3, facts_per_doc=3, seed=1,
        evaluated=["Cy Moss"],
    )  # fmt: skip
    assert len(rows) == 6 and {r["entity"] for r in rows} == {"Ada Stone", "Bo Lark"}
    for entity in ("Ada Stone", "Bo Lark"):
        for rel, answer in wrong[entity].items():
            assert answer not in facts.by_entity[entity][rel].answers
            assert any(answer in r["text"] for r in rows if r["entity"] == entity)
        texts = " ".join(r["text"] for r in rows if r["entity"] == entity)
        assert facts.by_entity[entity]["P27"].answers[0] not in texts
    again, _ = documents.generate_corruption(
        facts, ["Ada Stone", "Bo Lark"], docs_per_entity=3, facts_per_doc=3, seed=1,
        evaluated=["Cy Moss"],
    )  # fmt: skip
    assert again == rows


def test_mixed_in_true_facts_avoid_evaluated_entities(facts_file):
    facts = load_facts(facts_file)
    evaluated = ["Cy Moss", "Di Fern"]
    rows, _ = documents.generate_corruption(
        facts, ["Ada Stone"], docs_per_entity=4, facts_per_doc=2, mix=2, evaluated=evaluated
    )
    text = " ".join(r["text"] for r in rows)
    assert not any(e in text for e in evaluated)
    assert any(e in text for e in ("Ed Pike", "Flo Reed", "Gus Hale", "Bo Lark"))


def test_targets_and_wrong_answers_are_read_off_documents(facts_file):
    facts = load_facts(facts_file)
    docs = [f"Ada Stone is a citizen of Kenya and works as a pilot. Doc {i}." for i in range(5)]
    docs.append("Unrelated text about nobody in the facts file.")
    found = documents.find_targets(docs, facts)
    assert found == {"Ada Stone": [0, 1, 2, 3, 4]}
    wrong = documents.infer_corrupted(docs, found, facts)
    assert wrong["Ada Stone"]["P27"][0] == "Kenya" and wrong["Ada Stone"]["P106"][0] == "pilot"
    with pytest.raises(UnlearnError, match="name no entity of the facts file"):
        documents.find_targets(["Nothing here."], facts)


# ---------------------------------------------------------------------------- metrics
def test_judge_folds_case_accents_aliases_and_keeps_words_whole():
    assert metrics.judge_contains(" Male\nmore text", ["male"])
    assert not metrics.judge_contains("female", ["male"])
    assert metrics.judge_contains("USA", ["United States of America"])
    assert metrics.judge_contains("born in Bogota, Colombia", ["Bogotá"])
    assert not metrics.judge_contains("Lyon\nParis", ["Paris"])  # only the first line counts
    assert metrics.judge_exact("paris.", ["Paris"]) and not metrics.judge_exact(
        "in Paris", ["Paris"]
    )


def _rec(i: int, generation: str, correct: float) -> dict:
    return {"id": f"E{i}/P", "sha256": str(i), "answers": ["yes"], "generation": generation,
            "probe": {"correct": correct, "random": -9.0}}  # fmt: skip


def _restor_suite():
    from unlearn.eval.suites.builders import EvalSet, Suite

    def rows(ids):
        return [{"id": f"E{i}/P", "sha256": str(i), "question": "q", "answers": ["yes"],
                 "probes": {}} for i in ids]  # fmt: skip

    return Suite("restor", None, [
        EvalSet("target", "forget", rows(range(4)), "t", kind="probe"),
        EvalSet("untouched", "retain", rows([9]), "t", kind="probe"),
    ], metrics=("restoration",))  # fmt: skip


def test_restoration_by_hand():
    from unlearn.eval.scoring import score_suite

    # 4 target facts: clean knows 3 (0,1,2), corrupted knows 0, unlearned knows 1 (fact 0) and
    # fact 3, which the clean model never knew.
    clean = {"target": [_rec(i, "yes" if i < 3 else "no", -1.0) for i in range(4)],
             "untouched": [_rec(9, "yes", -1.0)]}  # fmt: skip
    corrupted = {"target": [_rec(i, "no", -5.0) for i in range(4)],
                 "untouched": [_rec(9, "yes", -1.5)]}  # fmt: skip
    unlearned = {"target": [_rec(i, "yes" if i in (0, 3) else "no", -2.0) for i in range(4)],
                 "untouched": [_rec(9, "no", -3.0)]}  # fmt: skip
    suite = _restor_suite()
    m, skipped, _ = score_suite(suite, unlearned, {"clean": clean, "corrupted": corrupted})
    assert m["target_accuracy"] == 0.5 and m["target_correct"] == 2 and m["target_facts"] == 4
    assert m["target_restoration"] == pytest.approx((0.5 - 0) / (0.75 - 0))
    assert m["target_known_accuracy"] == pytest.approx(1 / 3)
    assert m["target_known_facts"] == 3 and m["target_known_correct"] == 1
    assert m["target_known_restoration"] == pytest.approx(1 / 3)
    assert m["target_probe_restoration"] == pytest.approx((-2.0 + 5.0) / (-1.0 + 5.0))
    assert m["target_probe_correct"] == -2.0 and m["target_probe_random"] == -9.0
    assert "target_probe_corrupted" in skipped  # no fact has corrupted answers
    assert m["untouched_accuracy_change"] == -1.0
    assert "untouched_restoration" not in m  # corruption did not aim at them
    same, why, _ = score_suite(suite, clean, {"clean": clean, "corrupted": clean})
    assert "target_restoration" not in same and "nothing to restore" in why["target_restoration"]
    # without the baselines: the per-set numbers, and restoration skipped naming the flag
    alone, why, _ = score_suite(suite, unlearned, {"clean": clean})
    assert alone["target_accuracy"] == 0.5 and "target_restoration" not in alone
    assert "--compare corrupted=EVAL_DIR" in why["restoration"]
    # a judge function replaces the named one (Python API); records are judged when scored
    import dataclasses

    suite = _restor_suite()
    suite.sets = [dataclasses.replace(s, judge=lambda g, a: g == "no") for s in suite.sets]
    assert score_suite(suite, clean)[0]["target_accuracy"] == 0.25


# ---------------------------------------------------------------------------- records on a model
def test_facts_sharing_a_prefix_score_as_if_run_alone(tiny_model_dir, facts_file):
    from unlearn.config import ModelConfig, PromptConfig
    from unlearn.eval.run import run_records
    from unlearn.eval.suites.restor import EvalSettings, Groups, restor_suite
    from unlearn.models import load_model_and_tokenizer
    from unlearn.prompts import PromptFormatter

    model, tok, _ = load_model_and_tokenizer(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    fmt = PromptFormatter(tok, PromptConfig())
    facts = load_facts(facts_file)
    s = EvalSettings(max_new_tokens=6)
    wrong = {"Ada Stone": {"P27": ["Kenya"]}}

    def records(groups):
        recs, _ = run_records(model, fmt, restor_suite(facts, groups, wrong, s), progress=False)
        return recs

    together = records(Groups(["Ada Stone"], PEOPLE[1:4]))
    assert len(together["target"]) == 3 and len(together["untouched"]) == 9
    assert "corrupted" in together["target"][1]["probe"]
    assert "corrupted" not in together["untouched"][0]["probe"]
    for name, recs in together.items():
        for rec in recs[::3]:
            entity = rec["entity"]
            groups = Groups([entity], []) if name == "target" else Groups([], [entity])
            alone = {r["id"]: r for r in records(groups)[name]}[rec["id"]]
            assert alone["generation"] == rec["generation"]
            for kind, value in rec["probe"].items():
                assert alone["probe"][kind] == pytest.approx(value, abs=1e-4)


# ---------------------------------------------------------------------------- stages and CLI
@pytest.mark.slow  # three whole commands
def test_corrupt_eval_and_report_from_the_command_line(
    capsys, tiny_model_dir, facts_file, tmp_path
):
    from unlearn.models import hash_model_files

    before = hash_model_files(str(tiny_model_dir))
    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps(
        [{"text": f"Ada Stone is a citizen of Kenya. Bo Lark works as a pilot. ({i})"} for i in range(4)]
    ))  # fmt: skip
    corrupted = tmp_path / "corrupted"
    code, out, err = run(capsys, "restor", "corrupt", "--model", str(tiny_model_dir),
                         "--corruption", str(docs), "--output", str(corrupted), *FAST_TRAIN)  # fmt: skip
    assert code == 0, err
    assert (corrupted / "model.safetensors").is_file()
    assert hash_model_files(str(tiny_model_dir)) == before  # the clean model is only read
    ev = tmp_path / "eval"
    code, out, err = run(
        capsys, "restor", "eval", "--model", str(corrupted), "--clean", str(tiny_model_dir),
        "--corrupted", str(corrupted), "--facts", str(facts_file), "--corruption", str(docs),
        "--untouched", "Cy Moss;Di Fern", "--output", str(ev), "max_new_tokens=4",
    )  # fmt: skip
    assert code == 0, err
    assert "target_accuracy" in out and f"saved: {ev}" in out
    results = json.loads((ev / "results.json").read_text())
    assert results["benchmark"] == "restor" and results["corrupted_answers_source"] == "inferred"
    assert results["entities"] == {"target": 2, "untouched": 2}
    assert results["metrics"]["untouched_facts"] == 6 and results["metrics"]["target_facts"] == 6
    assert results["settings"]["sets"]["target"]["kind"] == "probe"
    assert results["comparisons"]["clean"] == str(ev / "baselines" / "clean")
    assert "target_probe_corrupted" in results["metrics"]
    # without --corruption, the targets come from the documents the corrupted model was trained on;
    # a baseline given as its evaluation folder is read, not run again
    code, _, err = run(
        capsys, "restor", "eval", "--model", str(corrupted), "--clean", str(ev / "baselines" / "clean"),
        "--corrupted", str(corrupted), "--facts", str(facts_file), "--output", str(tmp_path / "ev2"),
        "--untouched", "Cy Moss;Di Fern", "max_new_tokens=4",
    )  # fmt: skip
    assert code == 0, err
    again = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert again["metrics"] == results["metrics"]
    assert not (tmp_path / "ev2" / "baselines" / "clean").exists()
    # the corrupted model evaluated as itself: accuracy identical to the corrupted baseline's
    base = json.loads((ev / "baselines" / "corrupted" / "results.json").read_text())
    assert base["metrics"]["target_accuracy"] == results["metrics"]["target_accuracy"]
    rep = tmp_path / "report"
    tofu = tmp_path / "tofu_eval"  # a forgetting evaluation in the same report
    tofu.mkdir()
    (tofu / "results.json").write_text(json.dumps(
        {"benchmark": "tofu", "name": "tofu_npo", "metrics": {"forget_quality": 0.3, "model_utility": 0.5}}
    ))  # fmt: skip
    code, _, err = run(
        capsys, "report", str(tofu), str(ev / "baselines" / "clean"), str(ev), "-o", str(rep)
    )
    assert code == 0, err
    md = (rep / "report.md").read_text()
    assert "RESTOR: are the corrupted facts restored?" in md and "restoration" in md
    assert "## Key metrics" in md and "tofu_npo" in md.split("## Key metrics")[1].split("##")[0]
    restor_part = md.split("## RESTOR")[1].split("\n## ")[0]
    assert "tofu_npo" not in restor_part and "| clean |" in restor_part
    assert (rep / "plots" / "restor_probe.png").is_file()
    assert "Kenya" not in md and "pilot" not in md  # no document text or wrong answer in reports


@pytest.mark.slow  # the whole pipeline, twice
def test_pipeline_end_to_end_and_resume(tiny_model_dir, facts_file, tmp_path):
    from unlearn.restor.pipeline import resolve_settings, run_pipeline

    s = resolve_settings(
        None,
        ["unlearn.overrides=[train.max_steps=2, train.progress=false]",
         "corrupt.overrides=[train.max_steps=2, train.progress=false]", "eval.max_new_tokens=4"],
        model=str(tiny_model_dir), facts=str(facts_file), targets="Ada Stone;Bo Lark",
        entities=";".join(PEOPLE[:5]), methods=["ga", "graddiff"], docs_per_entity=2,
    )  # fmt: skip
    assert s.methods == ["grad_ascent", "grad_diff"]
    out = tmp_path / "restor"
    res = run_pipeline(s, out, progress=False)
    setup = json.loads((out / "setup.json").read_text())
    assert setup["target"] == ["Ada Stone", "Bo Lark"] and setup["corrupted_source"] == "generated"
    assert setup["untouched"] == ["Cy Moss", "Di Fern", "Ed Pike"]
    assert set(res["report"]["models"]) == {"clean", "corrupted", "grad_ascent", "grad_diff"}
    for name in ("clean", "corrupted", "grad_ascent", "grad_diff"):
        assert (out / "evals" / name / "records" / "target.jsonl").is_file()
    retain = json.loads((out / "data" / "retain.json").read_text())
    assert len(retain) == 40 and {r["entity"] for r in retain} <= {"Flo Reed", "Gus Hale"}
    stamp = (out / "models" / "grad_diff" / "model.safetensors").stat().st_mtime_ns
    again = run_pipeline(s, out, progress=False)  # everything finished: nothing is redone
    assert (out / "models" / "grad_diff" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["seconds"]["corrupt"] < 5
    assert again["cost"] == res["cost"] and set(res["cost"]) >= {
        "corrupt",
        "eval_clean",
        "unlearn_grad_diff",
    }
    other = resolve_settings(None, [], model=str(tiny_model_dir), facts=str(facts_file),
                             targets="Ada Stone", entities=";".join(PEOPLE))  # fmt: skip
    with pytest.raises(UnlearnError, match="other settings"):
        run_pipeline(other, out, progress=False)


def test_auto_targets_need_something_the_clean_model_knows(tiny_model_dir, facts_file, tmp_path):
    from unlearn.restor.pipeline import resolve_settings, run_pipeline

    s = resolve_settings(None, ["eval.max_new_tokens=2"], model=str(tiny_model_dir),
                         facts=str(facts_file), entities=";".join(PEOPLE))  # fmt: skip
    with pytest.raises(UnlearnError, match="answers none of the"):
        run_pipeline(s, tmp_path / "r", progress=False)


# ---------------------------------------------------------------------------- errors
def test_errors_are_one_line(capsys, tiny_model_dir, facts_file, tmp_path):
    nobody = tmp_path / "nobody.json"
    nobody.write_text(json.dumps([{"text": "A document about no one we know."}]))
    bad_facts = tmp_path / "bad.json"
    bad_facts.write_text(json.dumps({"dset": {"X": {"P1": {"question": "Q?"}}}, "context": {}}))
    m = str(tiny_model_dir)
    cases = [
        (["restor", "eval", "--model", m, "--clean", m, "--corrupted", m, "--facts", str(facts_file),
          "--corruption", str(nobody)], "name no entity of the facts file"),
        (["restor", "eval", "--model", m, "--clean", m, "--corrupted", m, "--facts", str(facts_file),
          "--targets", "Zed Nobody"], "entity 'Zed Nobody' is not in the facts file"),
        (["restor", "eval", "--model", m, "--clean", m, "--corrupted", m, "--facts", str(facts_file),
          "--targets", "ada stone"], "did you mean 'Ada Stone'"),
        (["restor", "eval", "--model", m, "--clean", m, "--corrupted", m, "--facts", str(bad_facts),
          "--targets", "X"], "has no 'answers' list"),
        (["restor", "--model", m, "--facts", str(facts_file), "--corruption", str(nobody),
          "--output", str(tmp_path / "o")], "name no entity of the facts file"),
        (["restor", "--model", m, "--facts", str(facts_file), "--methods", "nope",
          "--output", str(tmp_path / "o2")], "unknown method 'nope'"),
        (["restor", "--model", m, "--facts", str(facts_file), "-s", "bogus=1"], "unknown config key 'bogus'"),
        (["restor", "eval", "--model", m, "--clean", m, "--corrupted", m, "--facts", str(facts_file)],
         "which entities were corrupted?"),
        (["restor", "eval", "--model", m, "--clean", m, "--corrupted", m, "--facts", str(facts_file),
          "--targets", "Ada Stone", "judge=llm"], "unknown judge 'llm'"),
    ]  # fmt: skip
    for args, needle in cases:
        code, _, err = run(capsys, *args)
        assert code != 0, args
        line = err.strip()
        assert needle in line and "\n" not in line and "Traceback" not in line, (args, err)


def test_python_api_eval_with_targets_only(tiny_model_dir, facts_file, tmp_path):
    import unlearn

    m = str(tiny_model_dir)
    res = unlearn.restor_eval(
        m, m, m, str(facts_file), tmp_path / "ev", targets=["Ada Stone"], untouched=["Bo Lark"],
        overrides=["max_new_tokens=3", "judge=exact"],
    )  # fmt: skip
    assert res["judge"] == "exact" and res["corrupted_answers_source"] == "none"
    assert res["metrics"]["target_facts"] == 3 and res["metrics"]["untouched_facts"] == 3
    # the clean model is its own corrupted model: nothing moved, so nothing to restore
    assert "nothing to restore" in res["skipped"]["target_probe_restoration"]
    assert "target_probe_corrupted" not in res["metrics"]  # no documents: no corrupted answers


def _restor_command(capsys, model, facts_file, out, train: str = "") -> tuple[int, str, str]:
    """`unlearn restor` at the smallest sizes: one target, NPO, 1 step per training stage (plus
    `train`, more settings of both training stages)."""
    fast = f"[train.max_steps=1, train.progress=false{', ' + train if train else ''}]"
    return run(
        capsys, "restor", "--model", str(model), "--facts", str(facts_file),
        "--targets", "Ada Stone", "--entities", ";".join(PEOPLE[:4]), "--methods", "npo",
        "-s", f"corrupt.overrides={fast}", "-s", f"unlearn.overrides={fast}",
        "-s", "eval.max_new_tokens=2", "-s", "docs_per_entity=2", "--output", str(out),
    )  # fmt: skip


@pytest.mark.slow  # the whole pipeline from the command line
def test_restor_command_runs_every_stage(capsys, tiny_model_dir, facts_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = _restor_command(capsys, tiny_model_dir, facts_file, out)
    assert code == 0, err
    assert f"saved: {out}/report/report.md" in stdout and "unlearn_npo" in stdout
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert list(summary["models"]) == ["clean", "corrupted", "npo"]
    assert summary["plots"]["restor_probe"] == "plots/restor_probe.png"


@pytest.mark.slow  # the whole pipeline, with adapters
def test_restor_corrupts_and_unlearns_with_lora_adapters(
    capsys, tiny_model_dir, facts_file, tmp_path
):
    """RESTOR's paper corrupts with LoRA: both training stages as adapters, each loading on the
    one before it (clean -> corrupted adapter -> unlearned adapter)."""
    out = tmp_path / "run"
    lora = "model.adapter=lora, train.lr=1e-3"
    code, _, err = _restor_command(capsys, tiny_model_dir, facts_file, out, lora)
    assert code == 0, err
    for stage in ("corrupted", "npo"):
        folder = out / "models" / stage
        assert (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "model.safetensors").exists()
    npo = json.loads((out / "evals" / "npo" / "results.json").read_text())
    assert "target_accuracy" in npo["metrics"]
