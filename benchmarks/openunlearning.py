"""unlearn against OpenUnlearning: seconds per step and peak memory of the same job, same run.

The job: SmolLM2-135M-Instruct (the float32 HF folder unlearn caches for `smollm2-135m`), TOFU
forget01 + retain99 rows from ../shared/data/tofu, batch 4 forget + 4 retain, `--steps` optimizer
steps, lr 1e-5, weight decay 0.01, warm-up over the whole run (TOFU's one warm-up epoch), float32,
CPU, no evaluation, no saving inside the measured window. Methods: NPO, GradDiff, GradAscent.

Each run is its own subprocess, because peak RSS only grows. Both sides are measured the same way:
a callback after every optimizer step records time.perf_counter() and the process's peak RSS
(resource.getrusage ru_maxrss). Seconds/step is the mean interval between step callbacks, so the
first step (model load, data, NPO's reference pass) is excluded; peak memory is ru_maxrss at the
last step callback (before either side saves anything). `peak_mib_exit` in the JSON is the peak at
process exit, which includes unlearn saving its output (OpenUnlearning's save is skipped).

Goals (ours / OpenUnlearning): seconds/step <= 0.75, peak memory <= 0.70.
Reference OpenUnlearning figures measured earlier on this kind of machine (2 CPU cores, 10 steps):
NPO 7.48 s/step 4,679 MiB; GradDiff 6.40 s/step 4,118 MiB; GradAscent 3.55 s/step 3,396 MiB.

OpenUnlearning (commit d3d7cf9, hydra entry point src/train.py, its experiment
unlearn/tofu/default) runs from a work tree and venv under ~/.cache/unlearn/openunlearning/
(`$UNLEARN_CACHE/openunlearning`), built by `--setup` from the bare snapshot in $OU_GIT_DIR
(default /work/.mirror/locuslab+open-unlearning/repo): its pinned requirements with the CPU
torch==2.13.0 (installed first, the same torch as unlearn's), without bitsandbytes and flash-attn
(GPU-only; the optimizer and attention are overridden), deepspeed built with DS_BUILD_OPS=0 (rmu.py
imports it) and lm-eval==0.4.8 (its README installs `.[lm_eval]`; evals/__init__ imports it). One
line is patched: `load_trainer_args` divides by torch.cuda.device_count(), 0 on CPU, whenever
`warmup_epochs` is set (TOFU's experiment sets it). Its own settings changed for this job, all by
hydra overrides: a SmolLM2 model config (written into the cache tree: chat template, no extra
system prompt, float32, sdpa attention), local json data instead of the hub, batch 4 with no
gradient accumulation (its default is 4), optim adamw_torch (its default paged_adamw_32bit needs
bitsandbytes and a GPU), bf16 off, eval off, report_to none, logging every step, tqdm off.

What still differs between the two jobs (see also `notes` in the JSON):
- OpenUnlearning's NPO keeps a second full model as reference and runs it every step; unlearn
  computes the reference log-probs once before step 1 (outside the per-step time, inside the peak).
- Sequences: both use SmolLM2's chat template with its default system prompt and loss on the
  answer only, and the same tokenizer.json (identical ids; identical logits on identical ids).
  unlearn ends the answer at <|im_end|>; OpenUnlearning keeps the template's newline after it and
  appends another EOS, so its sequences are 2 tokens longer (both labelled), and it masks attention
  on every <|im_end|> (its pad token). Both right-pad to the longest sequence of the batch; max
  length 512 on both (nothing is truncated). `forget_tokens`/`retain_tokens` in the JSON say how
  long the sequences were on each side.
- Retain rows: OpenUnlearning draws each retain example at random from the retain file; unlearn
  walks the retain file in batches. Both files hold the same first steps*batch rows of retain99.
- OpenUnlearning tokenizes in its dataloader during training (inside the per-step time);
  unlearn tokenizes once before training. GradAscent in OpenUnlearning still loads and collates a
  retain batch each step (unused).
- Optimizer: unlearn uses torch's fused AdamW; OpenUnlearning here uses adamw_torch (not fused).

    python benchmarks/openunlearning.py --setup --setup-only     # build the tree and venv once
    python benchmarks/openunlearning.py [--steps 10] [--methods npo,grad_diff,grad_ascent]
        [--json out/openunlearning.json] [--setup]

`measure(methods, steps)` returns the rows as dicts (used by benchmarks/methods.py).
This file's top level imports only the standard library: it also runs inside OpenUnlearning's venv
as the wrapper around its entry point (`--ou-child`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
OU_COMMIT = "d3d7cf9"
OU_GIT_DIR = Path(os.environ.get("OU_GIT_DIR", "/work/.mirror/locuslab+open-unlearning/repo"))
CACHE = Path(os.environ.get("UNLEARN_CACHE", "~/.cache/unlearn")).expanduser() / "openunlearning"
OU_DIR = CACHE / "open-unlearning"
VENV = CACHE / "venv"
OU_PY = VENV / "bin" / "python"
# OpenUnlearning's requirements.txt at d3d7cf9, minus torch (installed first, below), deepspeed
# (built separately), bitsandbytes (CUDA-only, and only its paged optimizer uses it).
OU_TORCH = "torch==2.13.0"
OU_REQUIREMENTS = [
    "huggingface-hub==0.29.1",
    "transformers==4.45.1",
    "numpy==2.2.3",
    "hydra-core==1.3",
    "hydra_colorlog==1.2.0",
    "datasets==3.0.1",
    "accelerate==0.34.2",
    "rouge-score==0.1.2",
    "scipy==1.14.1",
    "tensorboard==2.18.0",
    "scikit-learn==1.5.2",
    "lm-eval==0.4.8",
]
OU_DEEPSPEED = "deepspeed==0.15.4"
READY = VENV / ".unlearn-benchmark-ready"
# load_trainer_args divides by the GPU count when warmup_epochs is set; there are none on CPU.
OU_FIX = (
    "src/trainer/__init__.py",
    "num_devices = torch.cuda.device_count()",
    "num_devices = max(torch.cuda.device_count(), 1)  # CPU: count the process as one device",
)
OU_MODEL = "SmolLM2-135M-Instruct"  # a model config written into the cache tree at run time
OU_TRAINERS = {"npo": "NPO", "grad_diff": "GradDiff", "grad_ascent": "GradAscent"}
METHODS = tuple(OU_TRAINERS)
BATCH = 4
LR = 1e-5
WEIGHT_DECAY = 0.01  # OpenUnlearning's TOFU experiment; unlearn's default too
MAX_LENGTH = 512  # OpenUnlearning's TOFU data configs
TIME_GOAL, MEM_GOAL = 0.75, 0.70
#: Our variants run against OpenUnlearning's plain trainer (it has no LoRA: its issue 179), with
#: their own peak-memory goals (issue 18: LoRA NPO at most 0.4x OpenUnlearning's NPO).
GC = "train.gradient_checkpointing=true"
VARIANTS = {
    "npo_gc": ("npo", [GC]),
    "npo_lora": ("npo", ["model.adapter=lora"]),
    "npo_lora_gc": ("npo", ["model.adapter=lora", GC]),
    "npo_chunk": ("npo", ["train.logits_chunk=256"]),
}
MEM_GOALS = {"npo_lora": 0.40, "npo_lora_gc": 0.40}
# our variants against OpenUnlearning's plain trainer of their method; not in the default list
OU_TRAINERS.update({name: OU_TRAINERS[base] for name, (base, _) in VARIANTS.items()})
HF_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
NOTES = [
    "OU NPO holds a second full model as reference and runs it every step; ours computes the "
    "reference log-probs once before step 1",
    "OU keeps the chat template's newline after <|im_end|> and appends another EOS (+2 labelled "
    "tokens per sequence) and masks attention on every <|im_end|> (its pad token); otherwise same "
    "tokenizer, chat template, default system prompt, answer-only loss, right padding to the "
    "batch's longest, max length 512",
    "OU samples retain rows at random from the same retain file; ours walks it in order",
    "OU tokenizes in its dataloader (inside step time); ours before training",
    "optimizer: ours fused AdamW, OU adamw_torch (its paged_adamw_32bit needs a GPU)",
    "OU GradAscent still collates an (unused) retain batch each step",
]


def _say(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def _run(cmd: list[str], **kw) -> None:
    _say("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def _python311() -> str:
    """An interpreter for the venv: OpenUnlearning's setup.py wants Python >= 3.11."""
    found = shutil.which("python3.11")
    if found:
        return found
    if sys.version_info >= (3, 11):
        return sys.executable
    sys.exit("OpenUnlearning needs Python >= 3.11 and no python3.11 is on PATH")


def setup() -> None:
    """Build the OpenUnlearning work tree and venv where missing; a second call changes nothing."""
    t0 = time.time()
    CACHE.mkdir(parents=True, exist_ok=True)
    if (OU_DIR / "src" / "train.py").is_file():
        _say(f"work tree present: {OU_DIR}")
    else:
        if not (OU_GIT_DIR / "HEAD").is_file():
            sys.exit(f"no OpenUnlearning snapshot at {OU_GIT_DIR} (set OU_GIT_DIR)")
        staging = Path(tempfile.mkdtemp(prefix=".ou-", dir=CACHE))
        _say(f"extracting OpenUnlearning {OU_COMMIT} from {OU_GIT_DIR} into {OU_DIR}")
        archive = subprocess.run(
            ["git", f"--git-dir={OU_GIT_DIR}", "archive", OU_COMMIT],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(staging)], input=archive, check=True)
        if OU_DIR.exists():
            shutil.rmtree(OU_DIR)
        os.replace(staging, OU_DIR)
    rel, old, new = OU_FIX
    path = OU_DIR / rel
    text = path.read_text()
    if new in text:
        _say(f"CPU fix already in {rel}")
    elif old in text:
        path.write_text(text.replace(old, new))
        _say(f"patched {rel}: `{old}` -> `{new}`")
    else:
        sys.exit(f"{rel} has neither the original line nor the fix; wrong commit?")
    wanted = "\n".join([OU_TORCH, *OU_REQUIREMENTS, OU_DEEPSPEED])
    if READY.is_file() and READY.read_text() == wanted and OU_PY.is_file():
        _say(f"venv ready: {VENV}")
    else:
        if not OU_PY.is_file():
            _run([_python311(), "-m", "venv", str(VENV)])
        pip = [str(OU_PY), "-m", "pip", "install", "-q"]
        # torch first: the CPU wheel on local disk; otherwise a dependency pulls a CUDA build
        _run([*pip, OU_TORCH])
        _run([*pip, OU_TORCH, *OU_REQUIREMENTS])
        # deepspeed builds from source against the torch above; no CUDA ops on CPU
        _run(
            [*pip, "--no-build-isolation", OU_TORCH, OU_DEEPSPEED],
            env={**os.environ, "DS_BUILD_OPS": "0"},
        )
        READY.write_text(wanted)
    _say(f"done in {time.time() - t0:.0f}s")


def _ready() -> bool:
    return (
        (OU_DIR / "src" / "train.py").is_file()
        and OU_FIX[2] in (OU_DIR / OU_FIX[0]).read_text()
        and READY.is_file()
        and OU_PY.is_file()
    )


# ------------------------------------------------------------------------------ the job


def _rows(n: int) -> tuple[list[dict], list[dict]]:
    if not TOFU.is_dir():
        sys.exit(f"TOFU data not found at {TOFU}")
    out = []
    for name in ("forget01", "retain99"):
        lines = (TOFU / f"{name}.json").read_text().splitlines()[:n]
        out.append(
            [
                {"question": json.loads(x)["question"], "answer": json.loads(x)["answer"]}
                for x in lines
            ]
        )
    return out[0], out[1]


def _write_data(folder: Path, steps: int) -> tuple[Path, Path, int]:
    forget, retain = _rows(steps * BATCH)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("forget", forget), ("retain", retain)):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths[0], paths[1], len(forget)


def model_folder() -> str:
    """The float32 HF folder unlearn converts `smollm2-135m` into (converted on first use)."""
    from unlearn.config import ModelConfig
    from unlearn.models import local_folder, resolve_model

    cfg = ModelConfig(name="smollm2-135m")
    return local_folder(resolve_model(cfg), cfg)


def ou_model_view(model: str) -> str:
    """The same weights as a folder transformers 4.45 reads, under the OpenUnlearning cache.

    unlearn's folder is written by transformers 5: `rope_parameters` instead of `rope_theta` (4.45
    would fall back to theta 10,000 instead of SmolLM2's 100,000), `dtype` instead of
    `torch_dtype`, the chat template in chat_template.jinja (4.45 reads it only from
    tokenizer_config.json) and a tokenizer class 4.45 does not know. The weights are linked, not
    copied; tokenizer.json is the same file, so both sides tokenize identically.
    """
    src = Path(model)
    view = CACHE / "models" / src.name
    view.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        link = view / name
        if (src / name).is_file() and not link.exists():
            link.symlink_to((src / name).resolve())
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        raise RuntimeError(f"{src}: rope type {rope['rope_type']} not translated for 4.45")
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    (view / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    for key in ("backend", "is_local", "local_files_only"):
        tok.pop(key, None)
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"  # reads tokenizer.json as is
    template = src / "chat_template.jinja"
    if template.is_file():
        tok["chat_template"] = template.read_text()
    (view / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return str(view)


def _write_ou_model_config(model: str) -> None:
    (OU_DIR / "configs" / "model" / f"{OU_MODEL}.yaml").write_text(
        "# written by unlearn's benchmarks/openunlearning.py\n"
        "model_args:\n"
        f"  pretrained_model_name_or_path: {json.dumps(model)}\n"
        "  attn_implementation: sdpa\n"
        "  torch_dtype: float32\n"
        "tokenizer_args:\n"
        f"  pretrained_model_name_or_path: {json.dumps(model)}\n"
        "template_args:\n"
        "  apply_chat_template: true\n"  # no system_prompt: SmolLM2's template adds its default
    )


def _ou_overrides(
    method: str, steps: int, forget: Path, retain: Path, out: Path, model: str
) -> list[str]:
    ov = [
        "--config-name=unlearn.yaml",
        "experiment=unlearn/tofu/default",
        f"model={OU_MODEL}",
        # the experiment names its own TOFU-finetuned Llama; point it (and the tokenizer) here
        f"model.model_args.pretrained_model_name_or_path={model}",
        f"model.tokenizer_args.pretrained_model_name_or_path={model}",
        f"trainer={OU_TRAINERS[method]}",
        "~eval",
        "~eval.tofu",
        f"task_name=bench_{method}",
        f"paths.output_dir={out}",
    ]
    for split, path in (("forget", forget), ("retain", retain)):
        key = f"data.{split}.TOFU_QA_{split}.args"
        ov += [
            f"{key}.hf_args.path=json",
            f"+{key}.hf_args.data_files={path}",
            f"~{key}.hf_args.name",
            f"{key}.max_length={MAX_LENGTH}",
        ]
    a = "trainer.args"
    ov += [
        f"{a}.per_device_train_batch_size={BATCH}",
        f"{a}.gradient_accumulation_steps=1",
        f"{a}.learning_rate={LR}",
        f"{a}.weight_decay={WEIGHT_DECAY}",
        f"+{a}.max_steps={steps}",
        f"{a}.bf16=false",
        f"{a}.bf16_full_eval=false",
        f"{a}.optim=adamw_torch",
        f"{a}.report_to=none",
        f"{a}.do_eval=false",
        f"{a}.eval_on_start=false",
        f"{a}.eval_strategy=no",
        f"{a}.logging_steps=1",
        f"+{a}.disable_tqdm=true",
        f"+{a}.use_cpu=true",
    ]
    return ov


def _finish(rec: dict, steps: int) -> dict:
    ends = rec.pop("ends")
    if len(ends) != steps:
        raise RuntimeError(f"expected {steps} step callbacks, got {len(ends)}")
    intervals = [b - a for a, b in itertools.pairwise(ends)]
    steady = intervals or [ends[0]]  # one step: nothing to exclude
    return {
        **rec,
        "s_per_step": sum(steady) / len(steady),
        "step_seconds": [round(x, 3) for x in [ends[0], *intervals]],
        "to_last_step_s": ends[-1],
        "peak_mib_exit": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _len_stats(lengths: list[int]) -> dict:
    return {"mean": sum(lengths) / len(lengths), "max": max(lengths), "n": len(lengths)}


def ou_child(
    method: str, steps: int, forget: Path, retain: Path, out: Path, result: Path, model: str
) -> None:
    """Inside OpenUnlearning's venv: its hydra entry point with a step callback injected."""
    t_start = time.perf_counter()
    os.chdir(OU_DIR)
    sys.path.insert(0, str(OU_DIR / "src"))
    sys.argv = [
        str(OU_DIR / "src" / "train.py"),
        *_ou_overrides(method, steps, forget, retain, out, model),
    ]
    import runpy

    import trainer as ou_trainer  # OpenUnlearning's src/trainer package
    from transformers import TrainerCallback

    rec: dict = {"ends": [], "peak_mib": 0.0}

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            rec["ends"].append(time.perf_counter() - t_start)
            rec["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        def on_train_end(self, args, state, control, **kw):
            ds = kw["train_dataloader"].dataset  # ForgetRetainDataset
            for split in ("forget", "retain"):
                part = getattr(ds, split)
                n = [len(part[i]["input_ids"]) for i in range(len(part))]
                rec[f"{split}_tokens"] = _len_stats(n)

    load_trainer = ou_trainer.load_trainer

    def with_tick(*a, **k):
        trainer, trainer_args = load_trainer(*a, **k)
        trainer.add_callback(Tick())
        trainer.save_model = lambda *a, **k: None  # no saving
        trainer.save_state = lambda *a, **k: None
        return trainer, trainer_args

    # src/train.py does `from trainer import load_trainer`; run it as a script (hydra finds its
    # configs relative to the file) after swapping in the wrapper.
    ou_trainer.load_trainer = with_tick
    runpy.run_path(str(OU_DIR / "src" / "train.py"), run_name="__main__")
    result.write_text(json.dumps(_finish(rec, steps)))


def ours_child(
    method: str, steps: int, forget: Path, retain: Path, out: Path, result: Path, model: str
) -> None:
    """unlearn's side: the Python API with a step callback, the same settings."""
    t_start = time.perf_counter()
    import unlearn
    from unlearn.config import PromptConfig
    from unlearn.prompts import PromptFormatter

    rec: dict = {"ends": [], "peak_mib": 0.0}

    def tick(step: int, logs: dict) -> None:
        rec["ends"].append(time.perf_counter() - t_start)
        rec["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n_rows = sum(1 for _ in forget.open())
    method, extra = VARIANTS.get(method, (method, []))
    unlearn.forget(
        model,
        str(forget),
        str(retain),
        method,
        str(out),
        overwrite=True,
        callbacks=[tick],
        overrides=[
            f"train.max_steps={steps}",
            f"train.epochs={math.ceil(steps * BATCH / n_rows)}",
            f"train.batch_size={BATCH}",
            "train.grad_accum=1",
            f"train.lr={LR}",
            f"train.weight_decay={WEIGHT_DECAY}",
            "train.warmup_ratio=1.0",
            "train.seed=0",
            "train.progress=false",
            "train.nll_check=false",
            f"prompt.max_length={MAX_LENGTH}",
            "model.dtype=float32",
            "model.device=cpu",
            *extra,
        ],
    )
    done = _finish(rec, steps)
    from transformers import AutoTokenizer

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(model), PromptConfig(max_length=MAX_LENGTH))
    for split, path in (("forget", forget), ("retain", retain)):
        n = []
        for line in path.read_text().splitlines():
            row = json.loads(line)
            p, a = fmt.encode_qa(row["question"], row["answer"])
            n.append(min(len(p) + len(a), MAX_LENGTH))
        done[f"{split}_tokens"] = _len_stats(n)
    result.write_text(json.dumps(done))


# ------------------------------------------------------------------------------ driver


def _child(side: str, method: str, steps: int, data: tuple[Path, Path], model: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-", dir=CACHE) as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            str(OU_PY) if side == "ou" else sys.executable,
            str(Path(__file__).resolve()),
            f"--{side}-child",
            method,
            "--steps",
            str(steps),
            "--forget",
            str(data[0]),
            "--retain",
            str(data[1]),
            "--out",
            str(Path(tmp) / "out"),
            "--result",
            str(result),
            "--model",
            model,
        ]
        env = {**os.environ, **HF_OFFLINE, "HF_DATASETS_CACHE": str(CACHE / "hf_datasets")}
        if side == "ou":
            env.pop("PYTHONPATH", None)
            env.pop("VIRTUAL_ENV", None)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(
                f"{side} {method} failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
            )
        out = json.loads(result.read_text())
        out["process_s"] = time.time() - t0
        return out


def measure(methods: list[str] | tuple[str, ...] = METHODS, steps: int = 10) -> list[dict]:
    """Run each method on both sides (ours first, then OpenUnlearning); one dict per method."""
    unknown = [m for m in methods if m not in OU_TRAINERS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(OU_TRAINERS)}")
    if steps < 2:
        raise ValueError("steps must be at least 2 (the first step is excluded from s/step)")
    if not _ready():
        raise RuntimeError("OpenUnlearning is not set up; run benchmarks/openunlearning.py --setup")
    model = model_folder()
    ou_model = ou_model_view(model)
    _write_ou_model_config(ou_model)
    data = _write_data(CACHE / "data", steps)
    rows = []
    for method in methods:
        ours = _child("ours", method, steps, data[:2], model)
        ou = _child("ou", VARIANTS.get(method, (method,))[0], steps, data[:2], ou_model)
        mem_goal = MEM_GOALS.get(method, MEM_GOAL)
        t_ratio = ours["s_per_step"] / ou["s_per_step"]
        m_ratio = ours["peak_mib"] / ou["peak_mib"]
        rows.append(
            {
                "method": method,
                "steps": steps,
                "batch_size": BATCH,
                "ours_s_per_step": ours["s_per_step"],
                "ou_s_per_step": ou["s_per_step"],
                "time_ratio": t_ratio,
                "time_goal": TIME_GOAL,
                "time_met": t_ratio <= TIME_GOAL,
                "ours_peak_mib": ours["peak_mib"],
                "ou_peak_mib": ou["peak_mib"],
                "mem_ratio": m_ratio,
                "mem_goal": mem_goal,
                "mem_met": m_ratio <= mem_goal,
                "ours": ours,
                "ou": ou,
            }
        )
    return rows


def _table(rows: list[dict]) -> str:
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    head = (
        f"{'method':<12} {'ours s/step':>11} {'OU s/step':>10} {'ratio':>6} {'':<6} "
        f"{'ours MiB':>9} {'OU MiB':>8} {'ratio':>6} {'':<6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<12} {r['ours_s_per_step']:>11.2f} {r['ou_s_per_step']:>10.2f} "
            f"{r['time_ratio']:>6.2f} {mark(r['time_met']):<6} {r['ours_peak_mib']:>9.0f} "
            f"{r['ou_peak_mib']:>8.0f} {r['mem_ratio']:>6.2f} {mark(r['mem_met']):<6}"
        )
    goals = ", ".join(f"{m} {g}" for m, g in MEM_GOALS.items())
    lines.append(
        f"goals: time ratio <= {TIME_GOAL}, peak memory ratio <= {MEM_GOAL} ({goals}) (ours / OU)"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default="out/openunlearning.json")
    ap.add_argument("--setup", action="store_true", help="build OpenUnlearning's tree and venv")
    ap.add_argument("--setup-only", action="store_true", help="with --setup: build, do not run")
    for side in ("ours", "ou"):
        ap.add_argument(f"--{side}-child", default=None, help=argparse.SUPPRESS)
    for name in ("forget", "retain", "out", "result", "model"):
        ap.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ou_child or args.ours_child:
        paths = [Path(p) for p in (args.forget, args.retain, args.out, args.result)]
        child = ou_child if args.ou_child else ours_child
        child(args.ou_child or args.ours_child, args.steps, *paths, args.model)
        return
    if args.setup:
        setup()
        if args.setup_only:
            return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        rows = measure(methods, args.steps)
    except (ValueError, RuntimeError) as exc:
        sys.exit(str(exc))
    print(
        f"SmolLM2-135M-Instruct fp32 CPU, TOFU forget01+retain99, batch {BATCH}+{BATCH}, "
        f"{args.steps} steps (s/step excludes step 1; peak = RSS at the last step)"
    )
    print(_table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "job": {
                    "model": "SmolLM2-135M-Instruct (unlearn's float32 HF conversion)",
                    "data": "TOFU forget01 + retain99, first steps*batch rows each",
                    "batch_size": BATCH,
                    "steps": args.steps,
                    "lr": LR,
                    "weight_decay": WEIGHT_DECAY,
                    "max_length": MAX_LENGTH,
                    "dtype": "float32",
                    "device": "cpu",
                    "openunlearning_commit": OU_COMMIT,
                },
                "notes": NOTES,
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
