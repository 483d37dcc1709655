"""Our MUSE-News evaluation against OpenUnlearning's, on the same model, data and CPU threads.

Why: MUSE's evaluation is mostly generation (verbmem 128 tokens, knowmem 32 tokens after a 10-shot
prompt) plus one scoring pass over whole documents (privleak). This measures what a user waits for
and how much memory each evaluation needs, and shows that both compute the same numbers.

The job: SmolLM2-135M-Instruct (the float32 folder unlearn converts `smollm2-135m` into), float32,
CPU, the first N rows of each MUSE-News set in /work/shared/data/muse/news (all 10 in-context
pairs of each knowmem set). Both sides read the same N-row files, written in the hub's layout to
OUT/data-N (privleak documents as {"text": ...} rows, as on the hub; knowmem/retain_qa* from the
local retain2_* files), so OpenUnlearning can load them with `datasets`' json builder.

- ours: `unlearn.evaluate(model, OUT/ours, benchmark="muse", split="news", data_dir=OUT/data-N,
  retrain_auc=0.4772)` in a child process (this file with --ours-child).
- theirs: OpenUnlearning's `src/eval.py experiment=eval/muse/default` (commit and venv from
  benchmarks/openunlearning.py --setup, transformers 4.45.1) with hydra overrides only: our model
  (the 4.45-readable view `ou_model_view` links), float32, sdpa, CPU, the local json files, its own
  batch sizes (knowmem 16, verbmem 8, Min-K 8), overwrite on, extraction_strength dropped (ours
  does not compute it), and privleak's ref_value set to 1 - 0.4772 so its privleak uses MUSE's
  published retrained AUC as ours does (the default, 0.5, stands in for a missing retain run).
  The command is printed and recorded in the JSON.

Each side is one child process; wall = its start to its exit (imports, model and data loading
included), peak = its ru_maxrss from os.wait4. Both get OMP_NUM_THREADS/MKL_NUM_THREADS=--threads
(default 1: on a shared 2-core machine spinning OpenMP threads make generation erratic) and the
hub offline. Goal: wall ours / theirs <= 0.5.

Known differences in what is computed (why values may differ):
- ROUGE-L: ours unstemmed (MUSE's code); OpenUnlearning stems.
- verbmem: ours compares with the first 128 tokens of `gt` (MUSE); OpenUnlearning with all of it
  (up to 2,048 tokens), which lowers its F1. It also inserts a space between prompt and gt.
- generation: OpenUnlearning left-pads fixed batches (padding can change a greedy answer in float
  arithmetic); ours decodes each prompt unpadded in a continuous batch.
- knowmem: OpenUnlearning cuts the 10-shot prompt to 512 tokens and stops via its own criteria.
- privleak Min-40%: OpenUnlearning cuts documents to 2,048 tokens and drops the last token's
  log-prob; ours scores whole documents (capped at 4,096 tokens), as MUSE does.

    python benchmarks/muse_speed.py [--limit 25] [--threads 1] [--out out/muse_speed]
        [--page docs/results/muse_speed.md] [--skip-theirs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # benchmarks/openunlearning.py and _page.py

import openunlearning as ou  # noqa: E402  (stdlib-only top level)

MUSE = ROOT.parent / "shared" / "data" / "muse" / "news"
RETRAIN_AUC = 0.4772  # MUSE's published retrained-model Min-40% AUC on News (its orientation)
GOAL = 0.5
#: hub layout name -> (local file, documents given as bare strings)
FILES = {
    "knowmem/forget_qa": ("knowmem/forget_qa", False),
    "knowmem/forget_qa_icl": ("knowmem/forget_qa_icl", False),
    "knowmem/retain_qa": ("knowmem/retain2_qa", False),
    "knowmem/retain_qa_icl": ("knowmem/retain2_qa_icl", False),
    "verbmem/forget": ("verbmem/forget", False),
    "privleak/forget": ("privleak/forget", True),
    "privleak/holdout": ("privleak/holdout", True),
}
#: row label -> (our results.json metric, OpenUnlearning MUSE_EVAL.json key, our per-example set)
METRICS = {
    "verbmem_f (ROUGE-L F1)": (
        "verbmem_forget_rouge_l_f1",
        "forget_verbmem_ROUGE",
        "verbmem_forget",
    ),
    "knowmem_f (ROUGE-L F1)": (
        "knowmem_forget_rouge_l_f1",
        "forget_knowmem_ROUGE",
        "knowmem_forget",
    ),
    "knowmem_r (ROUGE-L F1)": (
        "knowmem_retain_rouge_l_f1",
        "retain_knowmem_ROUGE",
        "knowmem_retain",
    ),
    "Min-40% AUC forget vs holdout": ("mia_min_k_auc", "mia_min_k", ""),
    f"privleak (%, retrain AUC {RETRAIN_AUC})": ("privleak", "privleak", ""),
}


def write_data(folder: Path, n: int) -> Path:
    """The first n rows of each set (every in-context pair) as JSON arrays in the hub's layout."""
    for name, (src, bare) in FILES.items():
        rows = json.loads((MUSE / f"{src}.json").read_text(encoding="utf-8"))
        rows = rows if name.endswith("_icl") else rows[:n]
        if bare:
            rows = [{"text": r} for r in rows]
        path = folder / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return folder


def ou_overrides(data: Path, model: str, out: Path) -> list[str]:
    """OpenUnlearning's MUSE eval, pointed at our model and the local files by hydra overrides."""
    m = "eval.muse.metrics"
    ov = [
        "experiment=eval/muse/default",
        f"model.model_args.pretrained_model_name_or_path={model}",
        f"model.tokenizer_args.pretrained_model_name_or_path={model}",
        "model.model_args.attn_implementation=sdpa",  # its config asks for flash_attention_2
        "model.model_args.torch_dtype=float32",
        "model.model_args.device_map=cpu",
        "task_name=muse_speed",
        f"paths.output_dir={out}",
        "eval.muse.overwrite=true",
        f"~{m}.extraction_strength",
        f"{m}.privleak.ref_value={1 - RETRAIN_AUC:.4f}",
    ]
    # (metric config prefix, dataset key, hf_args key, file)
    sets = [
        (f"{m}.forget_knowmem_ROUGE", "MUSE_forget_knowmem", "hf_args", "knowmem/forget_qa"),
        (f"{m}.forget_knowmem_ROUGE", "MUSE_forget_knowmem", "few_shot_dataset_hf_args",
         "knowmem/forget_qa_icl"),
        (f"{m}.retain_knowmem_ROUGE", "MUSE_retain_knowmem", "hf_args", "knowmem/retain_qa"),
        (f"{m}.retain_knowmem_ROUGE", "MUSE_retain_knowmem", "few_shot_dataset_hf_args",
         "knowmem/retain_qa_icl"),
        (f"{m}.forget_verbmem_ROUGE", "MUSE_forget_verbmem", "hf_args", "verbmem/forget"),
        (f"{m}.privleak.pre_compute.mia_min_k", "MUSE_MIA_forget", "hf_args", "privleak/forget"),
        (f"{m}.privleak.pre_compute.mia_min_k", "MUSE_MIA_holdout", "hf_args", "privleak/holdout"),
    ]  # fmt: skip
    for prefix, ds, hf, name in sets:
        key = f"{prefix}.datasets.{ds}.args.{hf}"
        ov += [f"{key}.path=json", f"~{key}.name", f"+{key}.data_files={data / name}.json",
               f"{key}.split=train"]  # fmt: skip
    return ov


def run_child(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict[str, Any]:
    """Run one side; its wall time and peak RSS (ru_maxrss of this child alone, via wait4)."""
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[1]} exited {proc.returncode} (log {log}):\n{tail}")
    return {"wall_s": wall, "peak_mib": usage.ru_maxrss / 1024}


def ours_child(model: str, data: str, out: str) -> None:
    """Inside the child: our MUSE-News evaluation through the public API."""
    import unlearn

    unlearn.evaluate(
        model, out, benchmark="muse", split="news", data_dir=data, retrain_auc=RETRAIN_AUC,
        overrides=["model.dtype=float32", "model.device=cpu"], overwrite=True, progress=False,
    )  # fmt: skip


def read_ours(out: Path) -> dict[str, Any]:
    res = json.loads((out / "results.json").read_text())
    vals = {k: res["metrics"].get(ours) for k, (ours, _, _) in METRICS.items()}
    rows = {s: res["per_example"].get(s, {}).get("rouge_l_f1") for *_, s in METRICS.values() if s}
    return {"values": vals, "rows": rows, "in_process_s": res.get("seconds")}


def read_theirs(out: Path) -> dict[str, Any]:
    logs = json.loads((out / "MUSE_EVAL.json").read_text())
    vals = {k: (logs.get(key) or {}).get("agg_value") for k, (_, key, _) in METRICS.items()}
    rows = {}
    for _, key, s in METRICS.values():
        by_index = (logs.get(key) or {}).get("value_by_index") if s else None
        if by_index:
            rows[s] = [by_index[i]["rougeL_f1"] for i in sorted(by_index, key=int)]
    return {"values": vals, "rows": rows}


def differing_rows(ours: list[float] | None, theirs: list[float] | None) -> str:
    """How many examples' ROUGE-L F1 differ by more than 0.01 (same rows, same order)."""
    if not ours or not theirs or len(ours) != len(theirs):
        return "-"
    return f"{sum(abs(a - b) > 0.01 for a, b in zip(ours, theirs, strict=True))}/{len(ours)}"


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report(rec: dict[str, Any]) -> list[str]:
    """The comparison as markdown lines (printed and written to the page)."""
    ours, theirs = rec["ours"], rec.get("theirs")
    lines = [
        f"SmolLM2-135M-Instruct, float32, CPU, {rec['threads']} thread(s), MUSE-News first "
        f"{rec['limit']} rows of each set.",
        "",
        "| | ours | OpenUnlearning | ours / theirs |",
        "|---|---:|---:|---:|",
    ]
    if theirs:
        ratio = ours["wall_s"] / theirs["wall_s"]
        mark = "met" if ratio <= GOAL else "MISSED"
        lines += [
            f"| wall time (s) | {ours['wall_s']:.1f} | {theirs['wall_s']:.1f} | "
            f"**{ratio:.2f}** (goal <= {GOAL}: {mark}) |",
            f"| peak RSS (MiB) | {ours['peak_mib']:.0f} | {theirs['peak_mib']:.0f} | "
            f"{ours['peak_mib'] / theirs['peak_mib']:.2f} |",
        ]
    else:
        lines += [
            f"| wall time (s) | {ours['wall_s']:.1f} | (skipped) | - |",
            f"| peak RSS (MiB) | {ours['peak_mib']:.0f} | (skipped) | - |",
        ]
    lines += [
        "",
        f"Ours spent {fmt(ours.get('in_process_s'), 1)} s inside `evaluate` (the rest of its wall "
        "time is imports and start-up).",
        "",
        "| metric | ours | OpenUnlearning | rows differing > 0.01 |",
        "|---|---:|---:|---:|",
    ]
    for label, (*_, s) in METRICS.items():
        t = theirs["values"][label] if theirs else None
        diff = differing_rows(ours["rows"].get(s), theirs["rows"].get(s)) if theirs and s else "-"
        lines.append(f"| {label} | {fmt(ours['values'][label])} | {fmt(t)} | {diff} |")
    lines += [
        "",
        "AUCs are P(a forget document looks more like a member than a holdout one) on both sides "
        "(OpenUnlearning's `mia_min_k` agg_value; our `mia_min_k_auc`).",
        "Why values may differ: ROUGE stemming (OpenUnlearning stems, ours follows MUSE's "
        "unstemmed code); verbmem ground truth (OpenUnlearning the whole `gt`, ours its first 128 "
        "tokens, as MUSE); OpenUnlearning's left-padded generation batches; documents cut to 2,048 "
        "tokens and the last token dropped in OpenUnlearning's Min-K (ours: whole documents).",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=25, help="rows of each set (default 25)")
    ap.add_argument("--out", default="out/muse_speed", help="working folder (data, outputs, logs)")
    ap.add_argument("--page", default="docs/results/muse_speed.md", help="generated page")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads on both sides")
    ap.add_argument("--skip-theirs", action="store_true", help="run ours only")
    ap.add_argument(
        "--ours-child", nargs=3, metavar=("MODEL", "DATA", "OUT"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.ours_child:
        ours_child(*args.ours_child)
        return
    if args.limit < 2:
        sys.exit("--limit must be at least 2 (an AUC needs two documents)")
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = write_data(out / f"data-{args.limit}", args.limit)
    model = ou.model_folder()
    threads = str(args.threads)
    env = {**os.environ, **ou.HF_OFFLINE, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    rec: dict[str, Any] = {"limit": args.limit, "threads": args.threads, "model": model}

    ours_cmd = [sys.executable, str(Path(__file__).resolve()), "--ours-child", model, str(data),
                str(out / "ours")]  # fmt: skip
    print(f"ours: {' '.join(ours_cmd)}", flush=True)
    rec["ours"] = run_child(ours_cmd, env, ROOT, out / "ours.log")
    rec["ours"] |= read_ours(out / "ours")
    rec["ours_command"] = ours_cmd
    print(f"ours: {rec['ours']['wall_s']:.1f} s, {rec['ours']['peak_mib']:.0f} MiB", flush=True)

    if not args.skip_theirs:
        if not ou._ready():
            sys.exit("OpenUnlearning is not set up: python benchmarks/openunlearning.py --setup")
        their_cmd = [str(ou.OU_PY), "src/eval.py",
                     *ou_overrides(data, ou.ou_model_view(model), out / "theirs")]  # fmt: skip
        print(f"theirs (cwd {ou.OU_DIR}): {' '.join(their_cmd)}", flush=True)
        with tempfile.TemporaryDirectory(prefix="hf-datasets-", dir=out) as cache:
            their_env = {**env, "HF_DATASETS_CACHE": cache}  # json -> Arrow inside their time
            for key in ("PYTHONPATH", "VIRTUAL_ENV"):
                their_env.pop(key, None)
            rec["theirs"] = run_child(their_cmd, their_env, ou.OU_DIR, out / "theirs.log")
        rec["theirs"] |= read_theirs(out / "theirs")
        rec["theirs_command"] = {"cwd": str(ou.OU_DIR), "argv": their_cmd}
        print(f"theirs: {rec['theirs']['wall_s']:.1f} s, {rec['theirs']['peak_mib']:.0f} MiB")

    lines = report(rec)
    print("\n".join(lines))
    (out / "muse_speed.json").write_text(json.dumps(rec, indent=2))
    from _page import provenance

    page = ROOT / args.page
    page.parent.mkdir(parents=True, exist_ok=True)
    head = ["# MUSE-News evaluation: ours against OpenUnlearning", "",
            *provenance("benchmarks/muse_speed.py", sys.argv[1:]), ""]  # fmt: skip
    their_cmd_text = (
        f"\n\nOpenUnlearning's command (cwd `{rec['theirs_command']['cwd']}`):\n\n```\n"
        + " \\\n    ".join(rec["theirs_command"]["argv"])
        + "\n```"
        if "theirs_command" in rec
        else ""
    )
    page.write_text("\n".join([*head, *lines]) + their_cmd_text + "\n")
    print(f"wrote {page} and {out / 'muse_speed.json'}")


if __name__ == "__main__":
    main()
