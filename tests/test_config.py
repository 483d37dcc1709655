"""Config: YAML + dotted overrides, typed, unknown keys rejected with the valid ones listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlearn.api import resolve_config
from unlearn.config import TrainConfig, validate_train
from unlearn.errors import UnlearnError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_yaml_then_arguments_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "model: {name: a}\nforget: {path: f.json}\nmethod: {name: npo, beta: 0.5}\n"
        "train: {lr: 2.0e-5, epochs: 2}\noutput: out\n"
    )
    cfg = resolve_config(cfg_file, ["method.beta=0.2", "train.epochs=3"], model="b")
    assert cfg.model.name == "b"  # argument beats the file
    assert cfg.method == {"name": "npo", "beta": 0.2}  # override beats the file
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == pytest.approx(2e-5)


def test_string_values_are_coerced_and_typed():
    cfg = resolve_config(None, ["train.lr=1e-4", "train.max_steps=null", "train.progress=false"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.max_steps is None and cfg.train.progress is False


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trian.lr=1", "unknown config section 'trian'"),
        ("train.lrr=1", "valid keys in 'train': epochs"),
        ("train.lr=abc", "bad value for 'train.lr'"),
        ("prompt.template=fancy", "bad value for 'prompt.template'"),
        ("nonsense", "key=value"),
        ("a.b.c=1", "section.key"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(UnlearnError, match=None) as info:
        resolve_config(None, [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_top_level_key_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("modle: {name: x}\n")
    with pytest.raises(UnlearnError, match="unknown config key 'modle'"):
        resolve_config(f)


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(UnlearnError, match="not valid YAML"):
        resolve_config(f)
    with pytest.raises(UnlearnError, match="config file not found"):
        resolve_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("lr", 0.0, "train.lr must be positive"),
        ("lr", -1e-5, "train.lr must be positive"),
        ("batch_size", 0, "batch_size"),
        ("grad_accum", 0, "grad_accum"),
        ("warmup_ratio", 1.5, "warmup_ratio"),
        ("warmup_ratio", -0.1, "warmup_ratio"),
        ("warmup_steps", -1, "warmup_steps must be >= 0"),
    ],
)
def test_validate_train(field, value, fragment):
    with pytest.raises(UnlearnError, match=fragment):
        validate_train(TrainConfig(**{field: value}))


def test_warmup_over_the_whole_run_and_warmup_steps():
    # TOFU's recipe warms up over a whole epoch: a ratio of 1.0 must be accepted (it was refused)
    cfg = resolve_config(None, ["train.warmup_ratio=1.0", "train.epochs=1"])
    validate_train(cfg.train)
    assert cfg.train.num_warmup_steps(10) == 10
    steps = resolve_config(None, ["train.warmup_ratio=0.5", "train.warmup_steps=3"]).train
    validate_train(steps)
    assert steps.warmup_steps == 3 and steps.num_warmup_steps(10) == 3  # steps win over the ratio
    assert TrainConfig(warmup_ratio=0.25).num_warmup_steps(10) == 2
    assert TrainConfig(warmup_steps=0, warmup_ratio=0.5).num_warmup_steps(10) == 0


def test_warmup_that_would_do_nothing_is_refused(qa_files, tmp_path):
    with pytest.raises(UnlearnError, match=r"constant ignores warm-up.*constant_with_warmup"):
        validate_train(TrainConfig(scheduler="constant", warmup_ratio=0.1))
    validate_train(TrainConfig(scheduler="constant_with_warmup", warmup_steps=2))
    from unlearn.api import forget

    forget_file, retain_file = qa_files
    args = dict(model="org/m", forget=str(forget_file), retain=str(retain_file), output="o")
    with pytest.raises(UnlearnError, match=r"warmup_steps=9 is more than the run's 2 optimizer"):
        forget(**args, overrides=["train.warmup_steps=9"], dry_run=True)  # 6 examples / 4 = 2
    plan = forget(**args, overrides=["train.warmup_steps=2"], dry_run=True)
    assert plan.describe()["train"]["warmup_steps"] == 2


def test_nll_check_is_a_train_setting():
    assert TrainConfig().nll_check is True
    assert resolve_config(None, ["train.nll_check=false"]).train.nll_check is False


def test_switching_method_drops_other_methods_hyperparameters(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: {name: npo, beta: 0.3}\n")
    cfg = resolve_config(f, method="grad_ascent")
    assert cfg.method == {"name": "grad_ascent"}


def test_every_example_config_parses():
    # eval_*.yaml are `unlearn eval` configs, parsed in test_evaluation.py
    files = sorted(f for f in EXAMPLES.glob("*.yaml") if not f.name.startswith("eval_"))
    assert files, "examples/ must hold at least one config"
    from unlearn.methods import build_params, get_method

    for f in files:
        cfg = resolve_config(f)
        method = dict(cfg.method)
        build_params(get_method(method.pop("name")), method)
