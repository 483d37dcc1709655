"""Every registered method with LoRA adapters on the real SmolLM2-135M-Instruct, from the command
line: one optimizer step each on the demo's forget/retain people; checks that the run finishes,
writes only an adapter, and that its B matrices moved (they start at zero).

    python benchmarks/lora_methods.py [--steps 2] [--methods npo,rmu,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Settings a method needs beyond its defaults to run in a couple of steps.
EXTRA = {"whp": ["method.reinforce_steps=2"]}


def main() -> None:
    from unlearn.demo import DemoSettings, _training_rows
    from unlearn.eval.suites.builders import people_suite
    from unlearn.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    s = DemoSettings()
    suite = people_suite(seed=s.seed, n_forget=s.n_forget, n_retain=s.n_retain,
                         n_holdout=s.n_holdout, qa_per_person=s.qa_per_person)  # fmt: skip
    from safetensors.torch import load_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        for name in ("forget", "retain"):
            recs = _training_rows(suite.get(name).rows, False)
            if name == "forget":  # dpo's preferred answer; every other method ignores it
                recs = [{**r, "preferred": "I don't know."} for r in recs]
            data[name] = Path(tmp) / f"{name}.jsonl"
            data[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
        for method in args.methods.split(","):
            out = Path(tmp) / method
            cmd = [sys.executable, "-m", "unlearn.cli", "forget", "--model", s.model,
                   "--forget", str(data["forget"]), "--retain", str(data["retain"]),
                   "--method", method, "--output", str(out), "model.adapter=lora",
                   f"train.max_steps={args.steps}", "train.batch_size=4", "train.lr=1e-3",
                   "prompt.max_length=96", "train.nll_check=false", "train.progress=false",
                   *EXTRA.get(method, [])]  # fmt: skip
            t0 = time.time()
            done = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.time() - t0
            ok = done.returncode == 0 and (out / "adapter_model.safetensors").is_file()
            moved = None
            if ok:
                weights = load_file(str(out / "adapter_model.safetensors"))
                moved = all(bool((v != 0).any()) for k, v in weights.items() if "lora_B" in k)
                ok = moved and not (out / "model.safetensors").exists()
            error = "" if ok else (done.stderr.strip().splitlines() or ["?"])[-1][:160]
            rows.append((method, ok, moved, seconds, error))
            print(f"{method:<12} {'ok' if ok else 'FAILED':<7} B moved: {moved}  "
                  f"{seconds:5.1f} s  {error}", flush=True)  # fmt: skip
    failed = [r[0] for r in rows if not r[1]]
    print(f"{len(rows) - len(failed)}/{len(rows)} methods ran with LoRA on SmolLM2"
          + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
