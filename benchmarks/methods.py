"""Every registered unlearning method at its defaults on the demo's setup; writes
docs/results/methods.md.

Setup (`unlearn.demo.prepare`, cached): the demo's SmolLM2-135M-Instruct target (fine-tuned on 12
built-in fictitious people) unlearns the 4 forget people with every method in
`unlearn.methods.METHODS` (but `finetune`) at the method's default hyperparameters, on the demo's
schedule (3 epochs, batch 5, lr 1.5e-5: the same optimizer steps for every method), and every model
is evaluated with the demo's `people` suite against the demo's retain model. The target and retain
models' own rows come from the demo's cached evaluations.

Each row runs in a child process of its own (peak RSS only grows) and is cached in
OUT/rows/<method>.json under a key made of the method's defaults, the overrides, the demo's
settings, the data and models, and a hash of the code the row runs (the method's module and what
it imports, the training loop, the evaluation), so a rerun only runs missing or outdated rows.

    python benchmarks/methods.py [--out out/methods] [--only npo,rmu] [--force] [--threads N]
        [--retain-weight 5] [--with-openunlearning [--ou-steps 10]] [--no-run] [--keep-models]

The page is rewritten at the end from every cached row of a registered method (`--no-run`: only
that). Timings need the machine to itself: another torch process on the same cores makes steps
many times slower (OpenMP threads spin while they wait), which the page's CPU-per-wall-second and
load-average columns show. `--with-openunlearning` adds `benchmarks/openunlearning.py`'s
comparison (its own job; cached in OUT/openunlearning.json, `--force` remeasures).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from _page import cpu_name, git_commit

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PAGE = ROOT / "docs" / "results" / "methods.md"
#: Bump when what a row measures changes (the cached rows are then rerun).
ROW_VERSION = 2
#: The issue's goal for the time a run spends outside its training loop.
OUTSIDE_GOAL_S = 15.0
#: Registered methods this page does not run, and why.
SKIP = {
    "finetune": "not an unlearning method (it makes the target and retain models)",
    "dpo": "needs a preferred answer for every forget example, which the demo's data does not "
    "have; DPO with refusals as the preferred answers is `idk_dpo`, which has a row",
}
#: Method overrides for methods that cannot run on the demo's setup at their defaults.
NEEDED_OVERRIDES: dict[str, list[str]] = {}
#: The methods `benchmarks/openunlearning.py` compares with OpenUnlearning's trainers.
OU_METHODS = ["npo", "grad_diff", "grad_ascent"]
#: (metric key, column, format): the evaluation numbers on the page.
METRICS = (
    ("forget_quality", "forget quality", ".2e"),
    ("model_utility", "model utility", ".3f"),
    ("forget_rouge_l_recall", "forget ROUGE-L", ".3f"),
    ("privleak", "privleak", ".1f"),
    ("forget_extraction_strength", "extraction strength", ".3f"),
)


# ---------------------------------------------------------------------------- the cache key
def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str) -> set[str]:
    """The `unlearn` modules a file imports, at any depth of the file (function bodies too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # submodules, if they are files
    return {m for m in found if m.startswith("unlearn.") and _module_file(m)}


def code_hash(roots: list[str]) -> str:
    """A hash of the files `roots` import within `unlearn`, transitively. The package roots
    (`unlearn`, `unlearn.methods`: they import everything, the registry every method) are left
    out, so a row's key changes with the code it runs, not with another method's file."""
    skip = {"unlearn", "unlearn.methods"}
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or name in skip or path is None:
            continue
        seen[name] = path
        parents = name.split(".")
        todo += [".".join(parents[:i]) for i in range(2, len(parents))]  # package __init__s
        todo += sorted(_imports(path, name))
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(name.encode() + b"\0" + seen[name].read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def row_key(method: str, overrides: list[str], setup: Any, settings: Any) -> dict[str, Any]:
    """Everything a row's numbers depend on; its hash names the cached row."""
    import torch
    import transformers

    import unlearn
    from unlearn.methods import build_params, get_method

    m = get_method(method)
    return {
        "row_version": ROW_VERSION,
        "method": method,
        "defaults": dataclasses.asdict(build_params(m, {})),
        "overrides": overrides,
        "settings": dataclasses.asdict(settings),
        "target": str(setup.target),
        "retain_eval": str(setup.eval_retain),
        "data": {"forget": _file_hash(setup.forget), "retain": _file_hash(setup.retain)},
        "code": code_hash(
            [
                m.loss.__module__,
                "unlearn.train.recipe",
                "unlearn.eval.run",
                "unlearn.eval.suites.builders",
            ]
        ),
        "versions": {
            "unlearn": unlearn.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- the child
def _rss_peak_mb() -> float:
    """The process's peak RSS since start or since the last `_reset_rss_peak` (VmHWM)."""
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class LoopMeter:
    """Times the training loop's optimizer steps and measures its peak memory, by wrapping the
    loop's one-step function. Only the outermost `train` call's steps count: a method's own
    training before the loop (WHP's reinforced model runs `train` inside `train`) is set-up, timed
    apart. Without the one-step function (a changed loop) it falls back to the step callback,
    which only sees step ends."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.rss_before_loop_mb: float | None = None  # peak of the run before the first step
        self.loop_rss_mb: float | None = None
        self.loop_gpu_mb: float | None = None
        self.nested_train_seconds = 0.0
        self.cpu_start = self.cpu_end = 0.0
        self.wrapped = False
        self.reset_ok = False

    def install(self) -> None:
        import unlearn.train.loop as loop
        import unlearn.train.recipe as recipe

        one_step, train = getattr(loop, "one_step", None), getattr(loop, "train", None)
        if one_step is None or train is None or getattr(recipe, "train", None) is not train:
            return
        self.wrapped = True
        depth = [0]

        def counted_train(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return train(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0]:
                    self.nested_train_seconds += time.perf_counter() - t0

        def timed(*args: Any, **kwargs: Any) -> Any:
            if depth[0] != 1:
                return one_step(*args, **kwargs)
            if not self.starts:
                self.rss_before_loop_mb = _rss_peak_mb()
                self.reset_ok = _reset_rss_peak()
                self._gpu_reset()
            if not self.starts:
                self.cpu_start = _cpu_seconds()
            self.starts.append(time.perf_counter())
            out = one_step(*args, **kwargs)
            self.ends.append(time.perf_counter())
            self.cpu_end = _cpu_seconds()
            if self.reset_ok:
                self.loop_rss_mb = _rss_peak_mb()
            self.loop_gpu_mb = self._gpu_peak()
            return out

        loop.one_step, loop.train, recipe.train = timed, counted_train, counted_train

    def callback(self, step: int, logs: dict[str, Any]) -> None:
        if not self.wrapped:
            self.ends.append(time.perf_counter())

    @staticmethod
    def _gpu_reset() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def _gpu_peak() -> float | None:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.max_memory_allocated() / 2**20

    def summary(self) -> dict[str, Any]:
        n = len(self.ends)
        if self.wrapped and self.starts:
            loop_s = self.ends[-1] - self.starts[0]
            step_s = [e - s for s, e in zip(self.starts, self.ends, strict=True)]
        elif n >= 2:  # step ends only: the first step's duration is unknown
            step_s = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
            loop_s = sum(step_s) / len(step_s) * n
        else:
            return {"steps_timed": n}
        return {
            "steps_timed": n,
            "loop_seconds": round(loop_s, 2),
            "seconds_per_step": round(loop_s / n, 3),
            "step_seconds_median": round(statistics.median(step_s), 3),
            "step_seconds_min": round(min(step_s), 3),
            "step_seconds_max": round(max(step_s), 3),
            "nested_train_seconds": round(self.nested_train_seconds, 2),
            # CPU seconds per wall second in the loop: ~ the thread count when the process had
            # the cores to itself, less when other work shared them
            "loop_cpu_per_wall": round((self.cpu_end - self.cpu_start) / loop_s, 2)
            if self.wrapped and loop_s > 0
            else None,
            "timed_by": "step function" if self.wrapped else "step callback",
        }


def child_row(spec: dict[str, Any], t_start: float) -> dict[str, Any]:
    """One method: unlearn (timed and measured), evaluate, summarise."""
    import torch

    import unlearn
    from unlearn.demo import DemoSettings, prepare
    from unlearn.errors import UnlearnError

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    settings = DemoSettings(**spec["settings"])
    setup = prepare(Path(spec["demo"]), settings)
    out = Path(spec["output"])
    meter = LoopMeter()
    meter.install()
    load_before = os.getloadavg()[0]
    import_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    try:
        res = unlearn.forget(
            str(setup.target),
            setup.forget,
            setup.retain,
            spec["method"],
            str(out / "model"),
            overwrite=True,
            overrides=[*setup.train_overrides, *spec["overrides"], "train.progress=false"],
            callbacks=[meter.callback],
        )
    except UnlearnError as exc:  # the method cannot run on this setup: a result, cached
        return {"status": "error", "error": str(exc)}
    wall = time.perf_counter() - t0
    rss_after = _rss_peak_mb()  # since the reset: the loop and what followed it
    peak = max(rss_after, meter.rss_before_loop_mb or 0.0)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    loop = meter.summary()
    manifest = res.manifest
    phases = dict(manifest.get("seconds", {}))
    outside = round(wall - loop["loop_seconds"], 2) if "loop_seconds" in loop else None
    # Inside `train` but outside the loop: optimizer, frozen copies, reference pass, a method's own
    # training before the loop, finalize.
    setup_s = None
    if "loop_seconds" in loop and manifest.get("train_seconds") is not None:
        setup_s = round(manifest["train_seconds"] - loop["loop_seconds"], 2)
    t_eval = time.perf_counter()
    results = unlearn.evaluate(
        str(out / "model"),
        str(out / "eval"),
        reference=str(setup.eval_retain),
        name=spec["method"],
        suite=setup.suite,
        overrides=setup.eval_overrides,
        progress=False,
        overwrite=True,
    )
    eval_s = time.perf_counter() - t_eval
    if not spec.get("keep_model"):
        for f in (out / "model").iterdir():
            if f.suffix in (".safetensors", ".bin") or f.name == "checkpoints":
                shutil.rmtree(f) if f.is_dir() else f.unlink()
    return {
        "status": "ok",
        "metrics": results["metrics"],
        "steps": manifest.get("steps"),
        "hyperparameters": manifest.get("hyperparameters"),
        "final_losses": res.metrics.get("final_losses"),
        "run_seconds": round(wall, 2),
        **loop,
        "outside_loop_seconds": outside,
        "phases": phases,  # the manifest's wall seconds per phase ("reference" is within "train")
        "train_seconds": manifest.get("train_seconds"),
        "train_setup_seconds": setup_s,  # train() outside the loop, the reference pass included
        "import_seconds": round(import_s, 2),
        "eval_seconds": round(eval_s, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_rss_before_loop_mb": meter.rss_before_loop_mb and round(meter.rss_before_loop_mb, 1),
        "loop_peak_rss_mb": meter.loop_rss_mb and round(meter.loop_rss_mb, 1),
        "peak_gpu_mb": gpu_peak and round(gpu_peak, 1),
        "loop_peak_gpu_mb": meter.loop_gpu_mb and round(meter.loop_gpu_mb, 1),
        "device": manifest.get("device"),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "threads": torch.get_num_threads(),
    }


def child_main(spec_file: str, result_file: str, t_start: float) -> None:
    spec = json.loads(Path(spec_file).read_text())
    result = child_row(spec, t_start)
    result.update(
        key=spec["key"],
        key_parts=spec["key_parts"],
        method=spec["method"],
        overrides=spec["overrides"],
        date=_now(),
    )
    tmp = Path(result_file).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(result_file)


# ---------------------------------------------------------------------------- the parent
class Bench:
    def __init__(
        self, out: Path, retain_weight: float | None, keep_models: bool, threads: int | None = None
    ) -> None:
        from unlearn.demo import DemoSettings, prepare

        self.out = out
        self.settings = DemoSettings()
        self.retain_weight = retain_weight
        self.keep_models = keep_models
        self.threads = threads
        self.setup = prepare(out / "demo", self.settings)
        self.target = json.loads((self.setup.eval_target / "results.json").read_text())["metrics"]
        self.retain = json.loads((self.setup.eval_retain / "results.json").read_text())["metrics"]
        self.failed: dict[str, str] = {}

    def methods(self) -> list[str]:
        from unlearn.methods import METHODS

        return [m for m in METHODS if m != "finetune"]

    def overrides(self, method: str) -> list[str]:
        from unlearn.demo import method_overrides

        given = NEEDED_OVERRIDES.get(method, [])
        return method_overrides(method, given, self.retain_weight)

    def cache_file(self, method: str) -> Path:
        return self.out / "rows" / f"{method}.json"

    def cached(self, method: str) -> dict[str, Any] | None:
        f = self.cache_file(method)
        return json.loads(f.read_text()) if f.is_file() else None

    def current_key(self, method: str) -> tuple[str, dict[str, Any]]:
        parts = row_key(method, self.overrides(method), self.setup, self.settings)
        if self.threads:  # the default (torch's) leaves the key as it was
            parts["threads"] = self.threads
        return _digest(parts), parts

    def run(self, method: str, force: bool) -> None:
        key, parts = self.current_key(method)
        row = self.cached(method)
        if row and row.get("key") == key and not force:
            print(f"[methods] {method}: cached", flush=True)
            return
        spec = {
            "method": method,
            "overrides": self.overrides(method),
            "settings": dataclasses.asdict(self.settings),
            "demo": str(self.out / "demo"),
            "output": str(self.out / "runs" / method),
            "keep_model": self.keep_models,
            "threads": self.threads,
            "key": key,
            "key_parts": parts,
        }
        cache = self.cache_file(method)
        spec_file = cache.with_suffix(".spec.json")
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(spec, indent=2))
        print(f"[methods] {method}: running", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_file), str(cache)])
        if proc.returncode != 0:
            self.failed[method] = f"the child process exited with {proc.returncode}"
            print(f"[methods] {method}: FAILED ({self.failed[method]})", flush=True)
            return
        row = json.loads(cache.read_text())
        took = time.perf_counter() - t0
        if row["status"] == "ok":
            m = row["metrics"]
            print(
                f"[methods] {method}: {took:.0f} s in all; forget quality "
                f"{m['forget_quality']:.2e}, utility {m['model_utility']:.3f}, "
                f"{row.get('seconds_per_step', float('nan')):.2f} s/step, outside the loop "
                f"{row.get('outside_loop_seconds')} s, peak RSS {row['peak_rss_mb']:.0f} MiB",
                flush=True,
            )
        else:
            print(f"[methods] {method}: cannot run: {row['error']}", flush=True)

    def openunlearning(self, run: bool, force: bool, steps: int) -> dict[str, Any] | None:
        """`benchmarks/openunlearning.py`'s `measure` (ours vs OpenUnlearning), cached."""
        cache = self.out / "openunlearning.json"
        old = json.loads(cache.read_text()) if cache.is_file() else None
        if not run or (old and old.get("steps") == steps and not force):
            return old
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        try:
            from openunlearning import measure  # type: ignore[import-not-found]
        except ImportError as exc:
            self.failed["openunlearning"] = f"benchmarks/openunlearning.py: {exc}"
            print(f"[methods] OpenUnlearning comparison not run: {exc}", flush=True)
            return old
        print(f"[methods] OpenUnlearning comparison: {', '.join(OU_METHODS)}", flush=True)
        try:
            rows = measure(list(OU_METHODS), steps)
        except (ValueError, RuntimeError) as exc:  # not set up, or a method it does not know
            self.failed["openunlearning"] = str(exc)
            print(f"[methods] OpenUnlearning comparison failed: {exc}", flush=True)
            return old
        result = {
            "steps": steps,
            "methods": OU_METHODS,
            "rows": rows,
            "date": _now(),
        }
        cache.write_text(json.dumps(result, indent=2) + "\n")
        return result


# ---------------------------------------------------------------------------- the page
def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "–" if value is None else str(value)


def _defaults(row: dict[str, Any]) -> str:
    params = row.get("hyperparameters") or row.get("key_parts", {}).get("defaults") or {}
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "(none)"


def write_page(bench: Bench, argv: list[str], ou: dict[str, Any] | None) -> str:
    import torch

    methods = bench.methods()
    t_util = bench.target["model_utility"]
    rows: dict[str, dict[str, Any]] = {}
    stale: set[str] = set()
    for m in methods:
        row = bench.cached(m)
        if m in SKIP or row is None:
            continue
        rows[m] = row
        if row.get("key") != bench.current_key(m)[0]:
            stale.add(m)
    ok = {m: r for m, r in rows.items() if r["status"] == "ok"}
    steps = sorted({r["steps"] for r in ok.values()})
    dates = sorted(r["date"] for r in rows.values())
    s = bench.settings
    alpha = (
        "each method's own default retain weight"
        if bench.retain_weight is None
        else f"retain weight alpha = {bench.retain_weight:g} for methods that have one"
    )
    gpu = any(r.get("peak_gpu_mb") for r in ok.values())
    lines = [
        "# Every method at its defaults, on the demo's setup",
        "",
        "Generated by `benchmarks/methods.py`; do not edit by hand.",
        "",
        f"- command: `python benchmarks/methods.py {' '.join(argv)}`".rstrip(),
        f"- date: {_now()}" + (f" (rows measured {dates[0]} to {dates[-1]})" if dates else ""),
        f"- machine: {platform.machine()}, {cpu_name()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}, float32",
        f"- commit: {git_commit()}",
        "",
        "Setup: the demo's (`unlearn demo`, docs/demo.md): SmolLM2-135M-Instruct fine-tuned on 12 "
        "built-in fictitious people (target), a retain model fine-tuned on the 8 retain people "
        f"only; the target unlearns 4 forget people (40 training examples) in "
        f"{'/'.join(map(str, steps)) or '?'} optimizer steps ({s.unlearn_epochs} epochs, batch "
        f"{s.unlearn_batch}, lr {s.unlearn_lr:g}, the same for every method) with every registered "
        f"method at its default hyperparameters ({alpha}), and is evaluated on the `people` suite "
        "against the retain model. Forget quality: KS-test p-value of the forget truth ratios "
        "against the retain model's (higher: closer to a model that never saw the forget people). "
        "Model utility: harmonic mean over retain, real people and world facts; x target: its "
        "ratio to the target's. Forget ROUGE-L: recall of the generated answers. Privleak: the "
        "min-k MIA AUC's relative difference to the retain model's (0 is the retain model; -100: "
        "the forget people are fully exposed). Extraction strength: share of an answer the model "
        "must be given before it completes the rest (lower: less memorised).",
        "",
        "Cost columns: s/step is the training loop's wall time divided by its optimizer steps; "
        "outside loop is the `unlearn.forget` call's wall time (load, tokenize, reference pass, "
        f"optimizer set-up, save) minus the loop's (the goal: <= {OUTSIDE_GOAL_S:g} s); peak RSS "
        "is the process's, up to the end of the unlearning run (the evaluation after it not "
        "included), loop peak RSS the peak during the training loop only. Each row ran alone in "
        "a process of its own; rows are cached, so a page may combine rows measured at different "
        "times, and other work on the machine inflates the times (the load average during each "
        "row is in the last table).",
        "",
    ]
    head = ["model", *(c for _, c, _ in METRICS[:2]), "x target", *(c for _, c, _ in METRICS[2:])]
    head += ["s/step", "outside loop s", "peak RSS MiB", "loop peak RSS MiB"]
    if gpu:
        head += ["peak GPU MiB", "loop peak GPU MiB"]
    lines += ["## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def metric_cells(m: dict[str, Any]) -> list[str]:
        cells = [_fmt(m.get(k), f) for k, _, f in METRICS]
        util = m.get("model_utility")
        cells.insert(2, _fmt(util / t_util if util is not None else None, ".3f"))
        return cells

    for name, metrics in (("target (before unlearning)", bench.target),
                          ("retain model (never saw the forget people)", bench.retain)):  # fmt: skip
        lines.append(
            "| " + " | ".join([name, *metric_cells(metrics), *[""] * (len(head) - 7)]) + " |"
        )
    for m, r in ok.items():
        cells = [f"`{m}`" + (" (stale)" if m in stale else ""), *metric_cells(r["metrics"])]
        cells += [
            _fmt(r.get("seconds_per_step"), ".2f"),
            _fmt(r.get("outside_loop_seconds"), ".1f"),
            _fmt(r.get("peak_rss_mb"), ".0f"),
            _fmt(r.get("loop_peak_rss_mb"), ".0f"),
        ]
        if gpu:
            cells += [_fmt(r.get("peak_gpu_mb"), ".0f"), _fmt(r.get("loop_peak_gpu_mb"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if stale:
        lines += [
            "(stale): measured with other code, settings or defaults than the current ones; "
            "rerun with `--only " + ",".join(sorted(stale)) + "`.",
            "",
        ]

    # Not run.
    notes = []
    for m in methods:
        if m in SKIP:
            notes.append(f"- `{m}`: skipped: {SKIP[m]}.")
        elif m in rows and rows[m]["status"] != "ok":
            notes.append(f"- `{m}`: cannot run at its defaults: {rows[m]['error']}")
        elif m in bench.failed:
            notes.append(f"- `{m}`: failed in this run: {bench.failed[m]}.")
        elif m not in rows:
            notes.append(f"- `{m}`: not run yet (`--only {m}`).")
    if notes:
        lines += ["Not in the table:", "", *notes, ""]

    # Outside the loop.
    over = [m for m, r in ok.items() if (r.get("outside_loop_seconds") or 0) > OUTSIDE_GOAL_S]
    lines += [
        "## Time outside the training loop",
        "",
        "The `unlearn.forget` call's phases (the manifest's wall seconds): load the model, "
        "tokenize, train outside the loop (inside `train` but before the first step or after "
        "the last: optimizer, frozen copies, the reference pass and a method's own training "
        "before the loop, such as WHP's reinforced model, the last two also shown apart; a "
        "method's finalize step, such as task vectors'), save, and other (the rest: NLL "
        "check, localization, config files). Steps: the training loop's steps, median (fastest "
        "to slowest) seconds. Process start-up (Python, torch and `unlearn` imports, the demo's "
        "data) is not part of the call and not counted; it is shown last.",
        "",
        "| method | run s | loop s | outside loop s | load | tokenize | train outside loop | of it "
        "reference pass | of it method's own training | save | other | steps: s | threads | loop "
        "CPU s per s | load average | process start-up s |",
        "|" + "---|" * 16,
    ]
    for m, r in ok.items():
        ph = r.get("phases", {})
        load = r.get("load_average") or [None, None]
        parts = [ph.get("load"), ph.get("tokenize"), r.get("train_setup_seconds"), ph.get("save")]
        other = None
        if r.get("outside_loop_seconds") is not None and None not in parts:
            other = r["outside_loop_seconds"] - sum(parts)
        cells = [
            f"`{m}`",
            *(
                _fmt(v, ".1f")
                for v in (
                    r.get("run_seconds"),
                    r.get("loop_seconds"),
                    r.get("outside_loop_seconds"),
                    ph.get("load"),
                    ph.get("tokenize"),
                    r.get("train_setup_seconds"),
                    ph.get("reference"),
                    r.get("nested_train_seconds"),
                    ph.get("save"),
                    other,
                )
            ),
            f"{r.get('steps_timed', '?')}: {_fmt(r.get('step_seconds_median'), '.2f')} "
            f"({_fmt(r.get('step_seconds_min'), '.2f')}-{_fmt(r.get('step_seconds_max'), '.2f')})",
            _cell(r.get("threads")),
            _fmt(r.get("loop_cpu_per_wall"), ".2f"),
            f"{_fmt(load[0], '.1f')} / {_fmt(load[1], '.1f')}",
            _fmt(r.get("import_seconds"), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if ok:
        lines.append(
            f"Over the goal of {OUTSIDE_GOAL_S:g} s: "
            + (", ".join(f"`{m}`" for m in over) if over else "none")
            + ". Loop CPU s per s: the process's CPU seconds per wall second in the training "
            "loop (about its thread count when it had the cores to itself). Load average: the "
            f"1-minute load before and after the unlearning run ({os.cpu_count()} cores)."
        )
        lines.append("")

    # OpenUnlearning.
    if ou and ou.get("rows"):
        cols: list[str] = []
        for r in ou["rows"]:
            cols += [k for k, v in r.items() if k not in cols and not isinstance(v, dict | list)]
        lines += [
            "## Against OpenUnlearning",
            "",
            f"`benchmarks/openunlearning.py`'s `measure({ou['methods']}, {ou['steps']})`, measured "
            f"{ou['date']}: the same job run by unlearn and by OpenUnlearning. It is not the "
            "job of the table above: its data, batch and what is timed are in that file's "
            "docstring (the full records are in the output folder's openunlearning.json).",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "---|" * len(cols),
        ]
        for r in ou["rows"]:
            lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
        lines.append("")

    # Defaults.
    lines += [
        "## Hyperparameters",
        "",
        "Each row's method hyperparameters, as its run recorded:",
        "",
    ]
    for m, r in ok.items():
        extra = [o for o in r.get("overrides", []) if o.startswith("method.")]
        lines.append(
            f"- `{m}`: {_defaults(r)}" + (f" (set here: {', '.join(extra)})" if extra else "")
        )
    text = "\n".join(lines) + "\n"
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    return text


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        try:
            child_main(sys.argv[2], sys.argv[3], T_START)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/methods")
    parser.add_argument("--only", help="comma-separated methods to run (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun the rows even if cached")
    parser.add_argument(
        "--retain-weight",
        type=float,
        help="method.alpha for methods that have one (the demo uses 5; default: the method's)",
    )
    parser.add_argument(
        "--with-openunlearning",
        action="store_true",
        help="also run benchmarks/openunlearning.py's measure() (ours vs OpenUnlearning)",
    )
    parser.add_argument(
        "--ou-steps", type=int, default=10, help="optimizer steps per OpenUnlearning comparison run"
    )
    parser.add_argument("--no-run", action="store_true", help="only rewrite the page")
    parser.add_argument("--keep-models", action="store_true", help="keep the unlearned weights")
    parser.add_argument("--threads", type=int, help="torch threads per row (default: torch's)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bench = Bench(Path(args.out), args.retain_weight, args.keep_models, args.threads)
    todo = bench.methods()
    if args.only:
        todo = [m.strip() for m in args.only.split(",") if m.strip()]
        unknown = [m for m in todo if m not in bench.methods()]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; registered: {', '.join(bench.methods())}")
    if not args.no_run:
        for m in todo:
            if m in SKIP:
                print(f"[methods] {m}: skipped: {SKIP[m]}", flush=True)
                continue
            bench.run(m, args.force)
    ou = bench.openunlearning(
        args.with_openunlearning and not args.no_run, args.force, args.ou_steps
    )
    print(write_page(bench, sys.argv[1:], ou))
    if bench.failed:
        print(f"[methods] failed: {bench.failed}", file=sys.stderr)
        sys.exit(1)


T_START = time.perf_counter()

if __name__ == "__main__":
    main()
