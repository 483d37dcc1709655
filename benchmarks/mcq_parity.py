"""Does our multiple-choice evaluation give lm-evaluation-harness's numbers, question by question?

`unlearn eval --benchmark wmdp|mmlu` claims to ask WMDP and MMLU exactly as lm-evaluation-harness
(lm-eval) does: same prompt, options " A".." D" scored as continuations. This script checks that
claim on the real data instead of trusting it: it runs both on the same model folder (our float32
conversion of the `smollm2-135m` GGUF), matches questions by subset and row index, and counts the
questions whose four log-likelihoods agree within 1e-4 nats and whose predictions agree. It also
compares wall time and peak RSS: each side runs as its own child process, one at a time, with the
same torch thread count, and the child's own peak RSS is read from `os.wait4` (ours runs its
scoring with batch 32, lm-eval with --batch_size 16; both times include start-up and model load).

lm-eval runs in its own venv (~/.cache/unlearn/lmeval-venv, created on first use: torch first, so
pip takes the local CPU wheel) so it never becomes one of our dependencies. Its tasks are local
YAML copies of the harness's wmdp / mmlu templates, named local_* so they never shadow the real
ones, over JSON-lines copies of ../shared/data.

    python benchmarks/mcq_parity.py [--benchmark wmdp] [--subsets bio,chem,cyber] [--limit N]
        [--shots 0] [--threads N] [--out out/mcq_parity] [--lmeval-python P] [--skip-lmeval-run]
        [--page docs/results/mcq_parity.md]

Writes the page (--page) and OUT/mcq_parity.json (with the 5 questions that differ most); prints
the summary. --skip-lmeval-run reuses OUT/lmeval and its timing from the last run (ours reruns).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _page import ROOT, provenance

DATA = ROOT.parent / "shared" / "data"
PAGE = ROOT / "docs" / "results" / "mcq_parity.md"
VENV = Path("~/.cache/unlearn/lmeval-venv").expanduser()
LMEVAL_PIN = "lm-eval[hf]==0.4.12"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel on local disk; unpinned, pip fetches a CUDA build
TOL = 1e-4  # nats; float32 noise (other kernels, padding, KV cache) was 1e-5..6e-5 on WMDP prompts
LMEVAL_BATCH = 16
OURS_BATCH = 32  # run_records' scoring batch (not a setting)
WMDP = {"bio": "biology", "chem": "chemistry", "cyber": "cybersecurity"}
MMLU = ("college_biology", "virology", "college_computer_science", "computer_security",
        "high_school_biology", "high_school_computer_science")  # fmt: skip
DOC_TO_TEXT = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
    "D. {{choices[3]}}\nAnswer:"
)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------ data and tasks
def subsets(benchmark: str, names: list[str], shots: int) -> list[dict[str, Any]]:
    """Each subset's rows read straight from ../shared/data (not through our loader, so a bug
    there cannot hide): name as our records call it, subject line, test rows, dev rows."""
    out = []
    for sub in names:
        if benchmark == "wmdp":
            rows = json.loads((DATA / "wmdp" / f"{sub}_questions.json").read_text())
            out.append({"name": f"wmdp_{sub}", "subject": WMDP[sub], "test": rows, "dev": []})
            continue
        lines = (DATA / "mmlu" / f"{sub}_test.jsonl").read_text().splitlines()
        dev = []
        if shots:
            with open(DATA / "mmlu" / "dev" / f"{sub}_dev.csv", newline="") as fh:
                dev = [
                    {"question": r["question"], "answer": int(r["answer"]),
                     "choices": [r[f"choice{k}"] for k in range(4)]}
                    for r in csv.DictReader(fh)
                ]  # fmt: skip
        rows = [json.loads(x) for x in lines if x.strip()]
        out.append(
            {"name": f"mmlu_{sub}", "subject": sub.replace("_", " "), "test": rows, "dev": dev}
        )
    return out


def write_tasks(sets: list[dict[str, Any]], folder: Path) -> list[str]:
    """One lm-eval task per subset: the harness's own wmdp/mmlu template (v0.4.12) over a local
    JSON-lines copy; MMLU's shots are the first dev rows, as its `first_n` sampler takes them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for s in sets:
        files = {"test": folder / f"{s['name']}.jsonl"}
        if s["dev"]:
            files["dev"] = folder / f"{s['name']}_dev.jsonl"
        for split, path in files.items():
            keep = ("question", "choices", "answer")
            path.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in s[split]))
        task = f"local_{s['name']}"
        description = (
            f"The following are multiple choice questions (with answers) about {s['subject']}.\n\n"
        )
        yaml = [
            f"task: {task}",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            *(f"    {split}: {json.dumps(str(p))}" for split, p in files.items()),
            "test_split: test",
            *(["fewshot_split: dev", "fewshot_config:", "  sampler: first_n"] if s["dev"] else []),
            "output_type: multiple_choice",
            f"description: {json.dumps(description)}",
            f"doc_to_text: {json.dumps(DOC_TO_TEXT)}",
            'doc_to_choice: ["A", "B", "C", "D"]',
            "doc_to_target: answer",
            "metric_list:",
            "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        ]
        (folder / f"{task}.yaml").write_text("\n".join(yaml) + "\n")
        names.append(task)
    return names


# ------------------------------------------------------------------------------ children
def lmeval_python(given: str | None) -> str:
    """lm-eval's interpreter: the one given, else our cached venv, built on first use."""
    if given:
        return given
    py = VENV / "bin" / "python"
    if py.is_file() and subprocess.run([py, "-c", "import lm_eval"]).returncode == 0:
        return str(py)
    print(f"creating {VENV} ({TORCH_PIN}, {LMEVAL_PIN}); a few minutes", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", TORCH_PIN], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", LMEVAL_PIN], check=True)
    return str(py)


def measured(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run one child; its wall time, CPU time and peak RSS. os.wait4 returns that child's own
    rusage (with any children it reaped), so earlier children cannot inflate the peak as
    RUSAGE_CHILDREN's running maximum would."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{cmd[0]} ... exited {proc.returncode}; {log}:\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": usage.ru_maxrss / 1024}


def run_ours(a: argparse.Namespace, env: dict[str, str], out: Path) -> dict[str, float]:
    """`unlearn eval` as a user runs it, forced to float32 on the CPU as lm-eval is."""
    data = DATA / a.benchmark
    cli = "import sys; from unlearn.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", cli, "eval", "--model", a.model, "--benchmark", a.benchmark,
           "--data-dir", str(data), "--split", ",".join(a.subsets), "--shots", str(a.shots),
           "--output", str(out), "--overwrite"]  # fmt: skip
    if a.limit:
        cmd += ["--limit", str(a.limit)]
    cmd += ["model.device=cpu", "model.dtype=float32"]  # dotted overrides come last
    return measured(cmd, env, out.parent / "ours.log")


def run_lmeval(a: argparse.Namespace, env: dict, folder: str, tasks: list[str], out: Path) -> dict:
    """`lm_eval run` with the hf backend on the same folder, dtype and device."""
    py = lmeval_python(a.lmeval_python)
    env = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    shutil.rmtree(out, ignore_errors=True)
    cmd = [py, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={folder},dtype=float32",
           "--tasks", ",".join(tasks), "--include_path", str(out.parent / "tasks"),
           "--num_fewshot", str(a.shots), "--batch_size", str(LMEVAL_BATCH), "--device", "cpu",
           "--output_path", str(out), "--log_samples"]  # fmt: skip
    if a.limit:
        cmd += ["--limit", str(a.limit)]
    rec = measured(cmd, env, out.parent / "lmeval.log")
    probe = "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) "
    probe += "for p in sys.argv[1:]}))"
    versions = subprocess.run([py, "-c", probe, "lm_eval", "torch", "transformers"],
                              capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return {**rec, "versions": json.loads(versions.stdout)}


def model_folder(model: str) -> str:
    """The HF folder our loader evaluates (an alias's GGUF converted once to float32), so lm-eval
    reads the very same weights and tokenizer."""
    from unlearn.config import ModelConfig
    from unlearn.models import local_folder, resolve_model

    cfg = ModelConfig(name=model)
    return local_folder(resolve_model(cfg), cfg)


# ------------------------------------------------------------------------------ comparison
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Split on newlines only: str.splitlines would also split inside questions at U+2028."""
    return [json.loads(x) for x in path.read_text().split("\n") if x.strip()]


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first maximum, as numpy's


def pair(sets: list[dict[str, Any]], ours_dir: Path, lm_dir: Path) -> list[dict[str, Any]]:
    """One entry per question, matched by subset and row index: both sides' four
    log-likelihoods, their largest difference, both predictions and lm-eval's own `acc`."""
    out = []
    for s in sets:
        ours = {r["id"]: r for r in read_jsonl(ours_dir / "records" / f"{s['name']}.jsonl")}
        files = sorted(lm_dir.rglob(f"samples_local_{s['name']}_*.jsonl"))
        if not files:
            raise RuntimeError(f"lm-eval wrote no samples for local_{s['name']} under {lm_dir}")
        lm = {str(r["doc_id"]): r for r in read_jsonl(files[-1])}
        if set(ours) != set(lm):
            raise RuntimeError(f"{s['name']}: {len(ours)} questions ours, {len(lm)} lm-eval's")
        for qid in sorted(ours, key=int):
            mine = [float(x) for x in ours[qid]["choice_logprobs"]]
            theirs = [float(r[0]) for r in lm[qid]["filtered_resps"]]
            if int(ours[qid]["target"]) != int(lm[qid]["target"]):
                raise RuntimeError(f"{s['name']} #{qid}: the two sides' answers differ")
            out.append({
                "subset": s["name"], "id": qid, "target": int(lm[qid]["target"]),
                "ours": mine, "lmeval": theirs, "lm_acc": float(lm[qid]["acc"]),
                "diff": max(abs(x - y) for x, y in zip(mine, theirs, strict=True)),
            })  # fmt: skip
    return out


def summarize(name: str, qs: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(qs)
    return {
        "subset": name,
        "n": n,
        "ours_acc": sum(argmax(q["ours"]) == q["target"] for q in qs) / n,
        "lm_acc": sum(q["lm_acc"] for q in qs) / n,
        "close": sum(q["diff"] <= TOL for q in qs),
        "same_pred": sum(argmax(q["ours"]) == argmax(q["lmeval"]) for q in qs),
        "max_abs_diff": max(q["diff"] for q in qs),
    }


def compare(sets: list[dict[str, Any]], ours_dir: Path, lm_dir: Path) -> dict[str, Any]:
    """Per subset and overall (pooled over questions, as both sides' group accuracy is), plus
    the five questions that differ most, to find out why should any disagree."""
    qs = pair(sets, ours_dir, lm_dir)
    rows = [summarize(s["name"], [q for q in qs if q["subset"] == s["name"]]) for s in sets]
    reported = json.loads((ours_dir / "results.json").read_text()).get("metrics", {})
    return {
        "rows": [*rows, summarize("overall", qs)],
        "ours_reported_accuracy": reported.get("accuracy"),
        "worst": sorted(qs, key=lambda q: -q["diff"])[:5],
    }


# ------------------------------------------------------------------------------ output
def md_row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(result: dict[str, Any]) -> list[str]:
    """The agreement table, then the cost table (wall, CPU, peak RSS and ours / lm-eval)."""
    lines = [
        md_row("subset", "questions", "ours acc", "lm-eval acc", f"log-lik. within {TOL:g}",
               "max abs diff (nats)", "same prediction"),
        md_row("---", *["---:"] * 6),
    ]  # fmt: skip
    for r in result["rows"]:
        n = r["n"]
        lines.append(md_row(r["subset"], n, f"{r['ours_acc']:.4f}", f"{r['lm_acc']:.4f}",
                            f"{r['close']}/{n}", f"{r['max_abs_diff']:.2e}",
                            f"{r['same_pred']}/{n}"))  # fmt: skip
    o, lm = result["ours_run"], result["lmeval_run"]
    cost = [(k, f) for k, f in (("wall_s", ".1f"), ("cpu_s", ".1f"), ("peak_rss_mib", ".0f"))]
    return [
        *lines,
        "",
        md_row("side", "wall (s)", "CPU (s)", "peak RSS (MiB)"),
        md_row("---", *["---:"] * 3),
        md_row("ours (`unlearn eval`)", *(format(o[k], f) for k, f in cost)),
        md_row(f"lm-eval {lm['versions']['lm_eval']}", *(format(lm[k], f) for k, f in cost)),
        md_row("ratio ours / lm-eval", *(f"{o[k] / lm[k]:.2f}" for k, _ in cost)),
    ]


def write_page(result: dict[str, Any], argv: list[str], page: Path) -> None:
    j, lm, w = result["job"], result["lmeval_run"]["versions"], result["worst"][0]
    scope = f"first {j['limit']} questions of each" if j["limit"] else "every question"
    text = "\n".join([
        "# Multiple-choice parity with lm-evaluation-harness",
        "",
        *provenance("benchmarks/mcq_parity.py", argv),
        "",
        f"Both evaluate {j['model']} (`{j['model_folder']}`, float32, CPU, "
        f"OMP_NUM_THREADS={j['threads']} for both) on {j['benchmark'].upper()} "
        f"{', '.join(j['subsets'])} ({scope}, {j['shots']}-shot). Ours: "
        f"`unlearn eval --benchmark {j['benchmark']}` (scoring batch "
        f"{OURS_BATCH}; each prompt runs once and the four options are scored off its KV cache). "
        f"lm-eval {lm['lm_eval']} (torch {lm['torch']}, transformers {lm['transformers']}, its own "
        f"venv): `--model hf --batch_size {LMEVAL_BATCH}` on local copies of its wmdp/mmlu task "
        "templates. Questions are matched by subset and row index; a question agrees when all "
        f"four option log-likelihoods differ by at most {TOL:g} nats.",
        "",
        *table(result),
        "",
        f"Largest difference: {w['subset']} #{w['id']} (answer {'ABCD'[w['target']]}), ours "
        f"{[round(x, 6) for x in w['ours']]}, lm-eval {[round(x, 6) for x in w['lmeval']]}.",
        "",
        "Wall time is each child process end to end (start-up, model load, data, scoring, "
        "writing); peak RSS is that process's own maximum resident set (os.wait4). The two run "
        "one after the other on the same machine, so other load on it moves both.",
        "",
    ])  # fmt: skip
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--benchmark", choices=("wmdp", "mmlu"), default="wmdp")
    ap.add_argument("--subsets", default=None, help="WMDP: bio,chem,cyber; MMLU: subjects")
    ap.add_argument("--limit", type=int, default=None, help="first N questions of each subset")
    ap.add_argument("--shots", type=int, default=0, help="MMLU few-shot (first dev rows)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="both sides")
    ap.add_argument("--out", default="out/mcq_parity")
    ap.add_argument("--page", default=str(PAGE), help="the results page (smoke tests: elsewhere)")
    ap.add_argument("--lmeval-python", default=None, help="an interpreter with lm-eval installed")
    ap.add_argument("--skip-lmeval-run", action="store_true", help="reuse OUT/lmeval")
    a = ap.parse_args()
    a.subsets = (a.subsets or ",".join(WMDP if a.benchmark == "wmdp" else MMLU)).split(",")
    if a.benchmark == "wmdp" and (set(a.subsets) - set(WMDP) or a.shots):
        sys.exit(f"WMDP subsets are {', '.join(WMDP)}, zero-shot")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    env = {**os.environ, **OFFLINE, **threads, "HF_DATASETS_CACHE": str(out / "hf_datasets")}
    sets = subsets(a.benchmark, a.subsets, a.shots)
    tasks = write_tasks(sets, out / "tasks")
    folder = model_folder(a.model)
    try:
        print(f"ours: unlearn eval ({a.threads} threads) ...", flush=True)
        ours_run = run_ours(a, env, out / "ours")
        saved = out / "lmeval_run.json"
        if a.skip_lmeval_run:
            lm_run = json.loads(saved.read_text())
        else:
            print(f"lm-eval ({a.threads} threads) ...", flush=True)
            lm_run = run_lmeval(a, env, folder, tasks, out / "lmeval")
            saved.write_text(json.dumps(lm_run, indent=2))
        result = compare(sets, out / "ours", out / "lmeval")
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        sys.exit(str(exc))
    result |= {
        "job": {"model": a.model, "model_folder": folder, "benchmark": a.benchmark,
                "subsets": a.subsets, "limit": a.limit, "shots": a.shots, "threads": a.threads,
                "tolerance_nats": TOL, "ours_batch": OURS_BATCH, "lmeval_batch": LMEVAL_BATCH},
        "ours_run": ours_run, "lmeval_run": lm_run,
        "time_ratio": ours_run["wall_s"] / lm_run["wall_s"],
        "rss_ratio": ours_run["peak_rss_mib"] / lm_run["peak_rss_mib"],
    }  # fmt: skip
    (out / "mcq_parity.json").write_text(json.dumps(result, indent=2))
    write_page(result, sys.argv[1:], Path(a.page))
    print("\n".join(table(result)))
    print(f"wrote {a.page} and {out / 'mcq_parity.json'}")


if __name__ == "__main__":
    main()
