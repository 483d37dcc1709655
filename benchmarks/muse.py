"""MUSE-News six-way evaluation of unlearning methods on SmolLM2-135M; writes docs/results/muse.md.

MUSE's own targets are Llama-2-7B models trained on the whole News corpus, and its retain corpus
is not available here, so the experiment is rebuilt at a size a 2-core CPU can run (~75 min):
- data: the first N rows of every MUSE-News evaluation set (`--n`, default 10; 25 would take
  about 3 hours: evaluations and fine-tuning grow with N). Forget text: the N
  verbmem excerpts (prompt + " " + gt), the N privleak forget articles and the N knowmem forget
  pairs as "Question: q\\nAnswer: a" documents, so all three memorization measures have something
  to measure; retain text: the N privleak retain2 articles and the N knowmem retain2 pairs. Both
  are interleaved by kind, so each third of the forget file (a protocol stage) mixes the kinds.
  Privleak holdout articles are evaluated, never trained on.
- target: `smollm2-135m` fine-tuned on forget + retain text; retrained: the same recipe on the
  retain text only (MUSE's "retrain" reference, and privleak's reference AUC).
- every method unlearns the target with the same optimizer steps; MUSE's scalability and
  sustainability protocols run NPO over 3 stages.

    python benchmarks/muse.py [--out out/muse] [--n 10] [--only npo,rmu] [--keep-models]
    python benchmarks/muse.py --references-only     # first: did the target memorize?
    python benchmarks/muse.py --quick [--write-page]   # a smoke test: 2 rows, 1-2 steps

Each row (a fine-tune, an evaluation, an unlearning run, a protocol) runs in a child process of
its own, so its peak RSS is its own, and is cached in OUT/rows/NAME.json: a rerun resumes.
OUT/settings.json pins the settings; other settings need another --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _page import provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
NEWS = os.environ.get("MUSE_NEWS", "/work/shared/data/muse/news")
MODEL = "smollm2-135m"
METHODS = ("grad_ascent", "grad_diff", "npo", "simnpo", "rmu", "task_vector", "whp")
VOCAB = 49152  # SmolLM2's: WHP caches two float32 [tokens, vocab] logit tensors
#: (metric key, column, format); ROUGE in [0, 1], privleak in percent.
COLUMNS = (
    ("verbmem_forget_rouge_l_f1", "verbmem_f", ".3f"),
    ("knowmem_forget_rouge_l_f1", "knowmem_f", ".3f"),
    ("knowmem_retain_rouge_l_f1", "knowmem_r", ".3f"),
    ("privleak", "privleak %", ".1f"),
    ("mia_min_k_auc", "Min-40% AUC", ".3f"),
)
#: OpenUnlearning's MUSE-News table on MUSE's Llama-2-7B target (github.com/locuslab/
#: open-unlearning, docs/results.md at 8f9872c): knowmem_f, verbmem_f, privleak, knowmem_r.
PUBLISHED = (
    ("target (MUSE's)", 0.64, 0.58, -99.81, 0.55),
    ("retrain", 0.33, 0.21, 0.0, 0.56),
    ("GradAscent", 0.0, 0.0, 52.11, 0.0),
    ("GradDiff", 0.41, 0.00892, 93.23, 0.37),
    ("NPO", 0.56, 0.35, -86.00, 0.51),
    ("SimNPO", 0.54, 0.36, -86.11, 0.51),
    ("RMU", 0.67, 0.57, -99.81, 0.56),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the numbers depend on (OUT/settings.json); `--quick` shrinks it."""

    # 10, not MUSE's 100: cost grows with n (measured on 2 cores, batch 4 x 512 tokens: ~10 s a
    # fine-tuning step, twice that with a retain batch; an evaluation ~12 s per row per set)
    n: int = 10
    window: int = 512  # prompt.max_length: documents are cut into windows of this many tokens
    ft_epochs: int = 3  # target and retrained: passes over their windows
    ft_max_steps: int | None = None  # caps the fine-tunes (quick mode)
    ft_lr: float = 3e-4  # high and constant: a 135M model must memorize in 3 passes
    ft_batch: int = 4
    steps: int = 10  # unlearning: optimizer steps per method (batch 4 of windows + retain batch)
    lr: float = 5e-5  # RMU's published lr; 5x the others' 1e-5, which assumes 10 epochs
    batch: int = 4
    stages: int = 3
    protocol_steps: int = 5  # per protocol stage
    seed: int = 0

    def common(self) -> list[str]:
        return [f"prompt.max_length={self.window}", f"train.seed={self.seed}",
                "train.nll_check=false", "train.progress=false"]  # fmt: skip

    def finetune(self) -> list[str]:
        cap = [f"train.max_steps={self.ft_max_steps}"] if self.ft_max_steps else []
        return [*self.common(), f"train.epochs={self.ft_epochs}", f"train.lr={self.ft_lr}",
                f"train.batch_size={self.ft_batch}", "train.scheduler=constant_with_warmup",
                "train.warmup_ratio=0.05", *cap]  # fmt: skip

    def unlearn(self, method: str, steps: int) -> list[str]:
        out = [*self.common(), f"train.max_steps={steps}", f"train.lr={self.lr}",
               f"train.batch_size={self.batch}"]  # fmt: skip
        if method == "whp":  # its docs: ~3 passes; here the same steps, at the run's lr
            out += [f"method.reinforce_steps={steps}", f"method.reinforce_lr={self.lr}"]
        return out


# ---------------------------------------------------------------------------- data
def write_data(out: Path, n: int) -> dict[str, str]:
    """The forget and retain documents (JSON lists of strings) under OUT/data, never the repo."""
    news = Path(NEWS)

    def load(rel: str) -> list[Any]:
        return json.loads((news / rel).read_text(encoding="utf-8"))[:n]

    def qa(rows: list[dict[str, str]]) -> list[str]:
        return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]

    def interleave(*kinds: list[str]) -> list[str]:
        return [doc for group in zip(*kinds, strict=True) for doc in group]

    verbmem = [f"{r['prompt']} {r['gt']}" for r in load("verbmem/forget.json")]
    forget = interleave(verbmem, load("privleak/forget.json"), qa(load("knowmem/forget_qa.json")))
    retain = interleave(load("privleak/retain2.json"), qa(load("knowmem/retain2_qa.json")))
    files = {"forget": out / "data" / "forget.json", "retain": out / "data" / "retain.json"}
    files["forget"].parent.mkdir(parents=True, exist_ok=True)
    files["target"] = out / "data" / "target.json"
    for name, docs in (("forget", forget), ("retain", retain), ("target", forget + retain)):
        files[name].write_text(json.dumps(docs), encoding="utf-8")
    return {k: str(v) for k, v in files.items()}


# ---------------------------------------------------------------------------- child processes
def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM); a child per row makes it that row's."""
    m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    return (
        int(m.group(1)) / 1024 if m else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )


def _whp_refusal(spec: dict[str, Any]) -> str | None:
    """WHP caches the start's and the reinforced copy's logits over every forget token in float32:
    on whole articles that can exceed the machine's memory, so it is checked before it starts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    docs = json.loads(Path(spec["forget"]).read_text())
    tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    need = 2 * tokens * VOCAB * 4 / 2**30
    avail = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    if need > 0.5 * avail / 2**20:
        return (f"its two cached float32 logit tensors over the {tokens:,} forget tokens need "
                f"{need:.0f} GiB, over half of this machine's {avail / 2**20:.0f} GiB available")  # fmt: skip
    return None


def child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One row: fine-tune, evaluate, unlearn or run a protocol; return what the page needs."""
    import unlearn
    from unlearn.errors import UnlearnError

    t0 = time.perf_counter()
    out: dict[str, Any] = {"status": "ok"}
    if kind == "finetune":
        model = Path(spec["output"])
        if not (model / "unlearn.json").is_file():
            unlearn.finetune(MODEL, spec["data"], str(model), overrides=spec["overrides"],
                             overwrite=True)  # fmt: skip
        manifest = json.loads((model / "unlearn.json").read_text())
        out |= {"steps": manifest["steps"], "windows": manifest["data"]["forget_sequences"]}
    elif kind == "eval":
        res = unlearn.evaluate(
            spec["model"], spec["output"], benchmark="muse", split="news", data_dir=NEWS,
            limit=spec["n"], reference=spec.get("reference"), privleak=spec.get("privleak", True),
            name=spec["name"], overwrite=True, progress=False,
        )  # fmt: skip
        out |= {"metrics": {k: res["metrics"].get(k) for k, _, _ in COLUMNS}, "notes": res["notes"]}
    elif kind == "unlearn":
        reason = _whp_refusal(spec) if spec["method"] == "whp" else None
        if reason:
            return {"status": "not run", "reason": reason}
        try:
            res = unlearn.forget(spec["model"], spec["forget"], spec["retain"], spec["method"],
                                 spec["output"], overrides=spec["overrides"], overwrite=True)  # fmt: skip
        except UnlearnError as exc:  # e.g. a method that needs question/answer data
            return {"status": "not run", "reason": str(exc).splitlines()[0]}
        m = res.manifest
        out |= {"steps": m["steps"], "windows": m["data"]["forget_sequences"],
                "phases": m["seconds"], "hyperparameters": m["hyperparameters"],
                "final_losses": res.metrics.get("final_losses")}  # fmt: skip
    elif kind == "protocol":
        out["state"] = unlearn.api.protocol(
            spec["kind"], spec["model"], spec["forget"], spec["retain"], "npo", spec["output"],
            stages=spec["stages"], overrides=spec["overrides"], progress=False, benchmark="muse",
            data_dir=NEWS, split="news", limit=spec["n"], reference=spec["reference"],
        )  # fmt: skip
    return out | {"wall_seconds": round(time.perf_counter() - t0, 1),
                  "peak_rss_mb": round(_peak_rss_mb(), 1)}  # fmt: skip


# ---------------------------------------------------------------------------- the parent
class Experiment:
    def __init__(self, out: Path, s: Settings, keep_models: bool) -> None:
        self.out, self.s, self.keep = out, s, keep_models
        self.rows: dict[str, dict[str, Any]] = {}
        pinned = out / "settings.json"
        mine = {**dataclasses.asdict(s), "data": NEWS}
        if pinned.is_file() and json.loads(pinned.read_text()) != mine:
            sys.exit(f"{out} holds a run with other settings ({pinned}); use another --out")
        out.mkdir(parents=True, exist_ok=True)
        pinned.write_text(json.dumps(mine, indent=2))
        self.data = write_data(out, s.n)
        self.target, self.retrained = out / "models" / "target", out / "models" / "retrained"
        self.retrain_eval = out / "evals" / "retrained"

    def row(self, name: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Run one row in a child process unless OUT/rows/NAME.json has it; a failed child is
        recorded (not cached), so the page says so and a rerun retries it."""
        cache = self.out / "rows" / f"{name}.json"
        if cache.is_file():
            self.rows[name] = json.loads(cache.read_text())
            return self.rows[name]
        cache.parent.mkdir(parents=True, exist_ok=True)
        spec_file = cache.with_suffix(".spec.json")
        spec_file.write_text(json.dumps(spec, indent=2))
        print(f"[muse] {name} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", kind, str(spec_file), str(cache)]
        )
        took = time.perf_counter() - t0
        if proc.returncode != 0 or not cache.is_file():
            self.rows[name] = {"status": "failed", "reason": f"child exited with {proc.returncode}"}
        else:
            self.rows[name] = json.loads(cache.read_text()) | {"process_seconds": round(took, 1)}
            cache.write_text(json.dumps(self.rows[name], indent=2))
        print(f"[muse] {name}: {self.rows[name].get('status')} in {took:.0f} s", flush=True)
        return self.rows[name]

    def evaluate(self, name: str, model: Path, **extra: Any) -> dict[str, Any]:
        spec = {"model": str(model), "output": str(self.out / "evals" / name), "n": self.s.n,
                "name": name, **extra}  # fmt: skip
        return self.row(f"eval-{name}", "eval", spec)

    def references(self) -> None:
        s = self.s
        for name, data, folder in (("retrained", "retain", self.retrained),
                                   ("target", "target", self.target)):  # fmt: skip
            spec = {"data": self.data[data], "output": str(folder), "overrides": s.finetune()}
            self.row(f"finetune-{name}", "finetune", spec)
        # The retrained model is privleak's reference: its own evaluation leaves privleak out, and
        # its privleak is 0 by definition on the page.
        self.evaluate("retrained", self.retrained, privleak=False)
        self.evaluate("target", self.target, reference=str(self.retrain_eval))

    def method(self, method: str) -> None:
        model = self.out / "runs" / method
        spec = {"method": method, "model": str(self.target), "forget": self.data["forget"],
                "retain": self.data["retain"], "output": str(model),
                "overrides": self.s.unlearn(method, self.s.steps)}  # fmt: skip
        if self.row(f"unlearn-{method}", "unlearn", spec).get("status") != "ok":
            return
        done = self.evaluate(method, model, reference=str(self.retrain_eval))
        if done.get("status") == "ok" and not self.keep:  # 0.5 GB each; the page needs the eval
            for f in model.glob("*.safetensors"):
                f.unlink()

    def protocol(self, kind: str) -> None:
        """Stage 0 is the target's evaluation, and sustainability's stage 1 is scalability's
        (same rows, start model and settings): both are copied in, not recomputed."""
        folder = self.out / "protocols" / kind
        seeds = [(self.out / "evals" / "target", folder / "stage_0" / "eval")]
        scal = self.out / "protocols" / "scalability" / "stage_1"
        if kind == "sustainability" and (scal / "eval" / "results.json").is_file():
            seeds += [(scal / "model", folder / "stage_1" / "model"),
                      (scal / "eval", folder / "stage_1" / "eval")]  # fmt: skip
        for src, dst in seeds:
            if src.is_dir() and not dst.exists():
                shutil.copytree(src, dst)
        spec = {"kind": kind, "model": str(self.target), "forget": self.data["forget"],
                "retain": self.data["retain"], "output": str(folder), "stages": self.s.stages,
                "overrides": self.s.unlearn("npo", self.s.protocol_steps), "n": self.s.n,
                "reference": str(self.retrain_eval)}  # fmt: skip
        self.row(f"protocol-{kind}", "protocol", spec)


# ---------------------------------------------------------------------------- the page
def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _metric_row(label: str, metrics: dict[str, Any], cost: list[str]) -> str:
    cells = [label, *(_fmt(metrics.get(k), f) for k, _, f in COLUMNS), *cost]
    return "| " + " | ".join(cells) + " |"


def _protocol_section(exp: Experiment, kind: str, images: Path) -> list[str]:
    row = exp.rows.get(f"protocol-{kind}", {})
    if row.get("status") != "ok":
        return [f"### {kind.capitalize()}", "", f"Not run: {row.get('reason', 'not reached')}.", ""]
    png = exp.out / "protocols" / kind / "protocol.png"
    shutil.copyfile(png, images / f"muse_{kind}.png")
    head = ["stage", "forget docs", *(c for _, c, _ in COLUMNS[:4]), "unlearning wall s"]
    lines = [
        f"### {kind.capitalize()}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for st in row["state"]["stages"]:
        manifest = Path(st["model"]) / "unlearn.json"
        wall = json.loads(manifest.read_text())["wall_seconds"] if st["stage"] else None
        cells = [str(st["stage"]), str(st["forget_n"]),
                 *(_fmt(st["metrics"].get(k), f) for k, _, f in COLUMNS[:4]),
                 _fmt(wall, ".0f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", f"![{kind}](muse_{kind}.png)", ""]


def write_page(exp: Experiment, argv: list[str], page: Path) -> str:
    s, rows = exp.s, exp.rows
    ft = rows.get("finetune-target", {})
    unl = [rows.get(f"unlearn-{m}", {}) for m in METHODS]
    windows = next((r["windows"] for r in unl if r.get("windows")), "?")
    total = sum(r.get("process_seconds", 0) for r in rows.values())
    lines = [
        "# MUSE-News on SmolLM2-135M", "", *provenance("benchmarks/muse.py", argv), "",
        f"Setup: `{MODEL}` (SmolLM2-135M-Instruct from its PyPI GGUF, float32 on CPU). The subset: "
        f"the first {s.n} rows of every MUSE-News evaluation set (verbmem forget, knowmem forget "
        "and retain2 with their 10 in-context examples, privleak forget and holdout), evaluated "
        "with `unlearn.evaluate(benchmark='muse', split='news', limit=N)`. Forget text "
        f"({3 * s.n} documents): the {s.n} verbmem excerpts (prompt + ' ' + gt), the {s.n} privleak "
        f"forget articles and the {s.n} knowmem forget pairs written as 'Question: q / Answer: a' "
        f"documents. Retain text ({2 * s.n} documents): the {s.n} privleak retain2 articles and the "
        f"{s.n} knowmem retain2 pairs, written alike. The {s.n} privleak holdout articles are never "
        "trained on. MUSE's News retain corpus is not available, so the retrained model is the "
        "base model fine-tuned on the retain text only. Target: the base fine-tuned on forget + "
        f"retain text ({ft.get('windows', '?')} windows of {s.window} tokens, {s.ft_epochs} epochs, "
        f"batch {s.ft_batch}, lr {s.ft_lr:g} constant after 5% warm-up: {ft.get('steps', '?')} "
        "steps); retrained: the same recipe. Unlearning: every method starts from the target with "
        f"forget = the forget text ({windows} windows), retain = the retain text, {s.steps} optimizer "
        f"steps of batch {s.batch} (+ a retain batch where the method has a retain term), lr {s.lr:g} "
        "(RMU's published rate, 5x the 1e-5 the others publish for 10 epochs), each method's "
        "default hyperparameters (WHP: reinforce_steps and reinforce_lr set to the same steps and "
        "lr). Privleak compares each model's Min-40% AUC (forget vs holdout) with the retrained "
        "model's on the same rows; MUSE's published retrained AUC is for the whole data and does "
        "not apply to a subset. Cost columns: the run's wall seconds (fine-tuning for target and "
        "retrained, unlearning for the methods; evaluation not included) and its process's peak "
        f"RSS. All child processes together took {total / 60:.0f} min.",
        "",
        "## Six-way table", "",
        "| model | " + " | ".join(c for _, c, _ in COLUMNS) + " | wall s | peak RSS MB |",
        "|" + "---|" * (len(COLUMNS) + 3),
    ]  # fmt: skip
    not_run = []
    for name, label, cost in (("target", "target", "finetune-target"),
                              ("retrained", "retrained", "finetune-retrained"),
                              *((m, f"`{m}`", f"unlearn-{m}") for m in METHODS)):  # fmt: skip
        ev, run = rows.get(f"eval-{name}", {}), rows.get(cost, {})
        if ev.get("status") != "ok" or run.get("status") != "ok":
            why = run if run.get("status") != "ok" else ev
            not_run.append(f"- `{name}`: not run: {why.get('reason', 'not reached')}")
            continue
        metrics = dict(ev["metrics"])
        if name == "retrained":
            metrics["privleak"] = 0.0  # the reference itself, by definition
        wall = [_fmt(run.get("wall_seconds"), ".0f"), _fmt(run.get("peak_rss_mb"), ".0f")]
        lines.append(_metric_row(label, metrics, wall))
    lines += ["", *not_run, ""] if not_run else [""]
    lines += [
        "## Published, for context (not run here)", "",
        "OpenUnlearning's MUSE-News results on MUSE's Llama-2-7B target (github.com/locuslab/"
        "open-unlearning, docs/results.md at 8f9872c; the whole News data, lr 1e-5, 10 epochs): "
        "a 7B model trained on the whole corpus, not comparable number for number.", "",
        "| model | knowmem_f | verbmem_f | privleak % | knowmem_r |", "|---|---|---|---|---|",
        *(f"| {n} | {a:.3g} | {b:.3g} | {c:.2f} | {d:.3g} |" for n, a, b, c, d in PUBLISHED), "",
        "## Protocols (NPO)", "",
        f"MUSE's scalability (the first k of {s.stages} parts of the forget text, each unlearned "
        "from the target) and sustainability (part k unlearned from stage k-1's model), "
        f"{s.protocol_steps} optimizer steps per stage, otherwise the NPO row's settings; stage 0 "
        "is the target. Parts are cut from the interleaved forget file, so each mixes the kinds.",
        "",
    ]  # fmt: skip
    for kind in ("scalability", "sustainability"):
        lines += _protocol_section(exp, kind, page.parent)
    lines += [
        "## How to read", "",
        "- verbmem_f / knowmem_f: ROUGE-L F1 of the model's continuation / answer on forget rows; "
        "lower is more forgotten, the retrained model's value is what never having seen them "
        "gives. knowmem_r: the same on retain questions; it should stay near the target's.",
        "- privleak: the relative difference between the model's Min-40% AUC and the retrained "
        "model's. Near 0: the forget articles look like unseen ones, as for the retrained model; "
        "strongly negative: still detectably memorized; strongly positive: over-unlearned (the "
        "forget articles now look less likely than unseen text, itself a detectable trace).",
        f"- With {s.n} rows per set, one row moves a ROUGE mean by up to {1 / s.n:.2f}, and the "
        f"AUC is over {s.n} x {s.n} pairs: small differences are noise.",
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    page.write_text(text)
    return text


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, spec_file, result_file = sys.argv[2:5]
        result = child(kind, json.loads(Path(spec_file).read_text()))
        tmp = Path(result_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(result_file)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="default out/muse (out/muse-quick with --quick)")
    parser.add_argument("--n", type=int, default=Settings.n, help="rows per evaluation set")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--ft-epochs", type=int, default=Settings.ft_epochs)
    parser.add_argument("--ft-lr", type=float, default=Settings.ft_lr)
    parser.add_argument(
        "--references-only",
        action="store_true",
        help="stop after the target and retrained models and their evaluations (to check the "
        "target memorized before spending the rest; a rerun without it continues)",
    )
    parser.add_argument("--only", help="comma-separated methods (default: all)")
    parser.add_argument("--no-protocols", action="store_true")
    parser.add_argument("--keep-models", action="store_true", help="keep unlearned weights")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rows, 1-2 steps")
    parser.add_argument("--write-page", action="store_true", help="with --quick: write docs/")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    s = Settings(n=args.n, steps=args.steps, ft_epochs=args.ft_epochs, ft_lr=args.ft_lr)
    if args.quick:
        s = Settings(n=2, ft_epochs=1, ft_max_steps=2, steps=1, stages=2, protocol_steps=1)
    out = Path(args.out or ("out/muse-quick" if args.quick else "out/muse"))
    methods = [m.strip() for m in args.only.split(",")] if args.only else list(METHODS)
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    exp = Experiment(out, s, args.keep_models)
    t0 = time.perf_counter()
    exp.references()
    if args.references_only:  # no page: it would list every method as not reached
        for name in ("target", "retrained"):
            print(f"[muse] {name}: {exp.rows[f'eval-{name}'].get('metrics')}")
        return
    for m in methods:
        exp.method(m)
    if not args.no_protocols:
        for kind in ("scalability", "sustainability"):
            exp.protocol(kind)
    for cache in sorted((out / "rows").glob("*.json")):  # rows of earlier runs, for the page
        if not cache.name.endswith(".spec.json"):
            exp.rows.setdefault(cache.stem, json.loads(cache.read_text()))
    page = RESULTS / "muse.md" if not args.quick or args.write_page else out / "muse.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    print(write_page(exp, sys.argv[1:], page))
    print(f"[muse] {page} written; this run took {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
