"""`unlearn audit`: the deletion requests applied to a model, checked, and a certificate for each.

Every `unlearn forget` run appends to its model's request chain (unlearn.json "requests"): the
request id, when, the method and its hyperparameters, the forget set by hash and example
ids/hashes (never its text), the numbers measured after it, and the hash of the weights before and
after (`models.weights_sha256`: the weight files only, since the manifest is written after them).
The audit checks that each request starts from the weights the previous one produced and that the
folder's weights are still the last request's, answers whether a data file the user brings was
requested (as a whole, or which of its examples), and writes a markdown and an HTML certificate
per request, with an evaluation's forget metrics against the retain reference and an attack run's
recovery when their folders are given.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from unlearn.errors import UnlearnError
from unlearn.outputs import atomic_write_json, atomic_write_text

MANIFEST = "unlearn.json"


def load_chain(model: str | Path) -> list[dict[str, Any]]:
    path = Path(model) / MANIFEST
    if not path.is_file():
        raise UnlearnError(
            f"no deletion-request chain: {path} does not exist (audit a folder written by "
            "`unlearn forget`)"
        )
    try:
        chain = json.loads(path.read_text(encoding="utf-8")).get("requests") or []
    except json.JSONDecodeError as exc:
        raise UnlearnError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not chain:
        raise UnlearnError(
            f"no deletion-request chain in {path}: the model was not produced by `unlearn forget`"
        )
    return chain


def check_chain(chain: list[dict[str, Any]], model: str | Path) -> list[dict[str, Any]]:
    """One verdict per request: does it start from the previous request's weights, and (the
    last) are its weights the folder's now?"""
    from unlearn.models import weights_sha256

    now = weights_sha256(model)
    out = []
    for i, entry in enumerate(chain):
        before, after = entry.get("weights_before"), entry.get("weights_after")
        if i == 0:
            link = "first request"
        elif not before or not chain[i - 1].get("weights_after"):
            link = "not recorded"
        else:
            link = "ok" if before == chain[i - 1]["weights_after"] else "BROKEN"
        verdict: dict[str, Any] = {"index": entry.get("index", i + 1), "link": link}
        if i == len(chain) - 1:
            if not after:
                verdict["weights_now"] = "not recorded"
            else:
                verdict["weights_now"] = "ok" if after == now else "MODIFIED since the request"
        out.append(verdict)
    return out


def match_data(chain: list[dict[str, Any]], data: str) -> dict[str, Any]:
    """Was this data file requested? As a whole (its dataset hash), and example by example (the
    examples' hashes against every request's)."""
    from unlearn.config import DataConfig
    from unlearn.data import dataset_hash, load_examples

    examples = load_examples(DataConfig(path=data), "forget")
    whole = dataset_hash(examples)
    hashes = {e.sha256 for e in examples}
    requests = []
    seen: set[str] = set()
    for entry in chain:
        forget = entry.get("forget") or {}
        theirs = {x.get("sha256") for x in forget.get("examples") or []}
        overlap = hashes & theirs
        seen |= overlap
        if forget.get("sha256") == whole or overlap:
            requests.append(
                {
                    "index": entry.get("index"),
                    "request": entry.get("request"),
                    "whole_set": forget.get("sha256") == whole,
                    "examples": len(overlap),
                }
            )
    return {
        "file": data,
        "sha256": whole,
        "examples": len(examples),
        "requested_examples": len(seen),
        "requests": requests,
        "answer": (
            "requested as a whole"
            if any(r["whole_set"] for r in requests)
            else f"{len(seen)} of {len(examples)} examples requested"
            if seen
            else "not requested"
        ),
    }


def _evidence(eval_dir: str | None, attack_dir: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if eval_dir:
        path = Path(eval_dir) / "results.json"
        if not path.is_file():
            raise UnlearnError(f"--eval {eval_dir}: no results.json (an `unlearn eval` folder)")
        res = json.loads(path.read_text())
        keys = [k for k in res.get("headline") or [] if k in res.get("metrics", {})]
        out["evaluation"] = {
            "folder": str(eval_dir),
            "benchmark": res.get("benchmark"),
            "reference": res.get("reference"),
            "model_sha256": (res.get("model") or {}).get("sha256"),
            "metrics": {k: res["metrics"][k] for k in keys},
        }
    if attack_dir:
        path = Path(attack_dir) / "attack.json"
        if not path.is_file():
            raise UnlearnError(
                f"--attack {attack_dir}: no attack.json (an `unlearn attack` folder)"
            )
        att = json.loads(path.read_text())
        out["attacks"] = {
            n: {"recovery": a.get("median_recovery"), "utility": a.get("utility")}
            for n, a in att.get("attacks", {}).items()
        }
    return out


def certificate(entry: dict[str, Any], verdict: dict[str, Any], evidence: dict) -> str:
    """One request's certificate in markdown."""
    forget = entry.get("forget") or {}
    lines = [
        f"# Deletion request {entry.get('request') or '(no id)'} (#{entry.get('index')})",
        "",
        f"- applied: {entry.get('date')}, method `{entry.get('method')}`",
        f"- forget set: {forget.get('n')} {forget.get('kind')} examples, sha256 "
        f"`{forget.get('sha256')}` (ids and per-example hashes in unlearn.json; no text)",
        f"- weights before: `{entry.get('weights_before') or 'not recorded'}`",
        f"- weights after: `{entry.get('weights_after') or 'not recorded'}`",
        f"- chain link: {verdict.get('link')}"
        + (f"; weights now: {verdict['weights_now']}" if "weights_now" in verdict else ""),
    ]
    hp = entry.get("hyperparameters")
    if hp:
        lines.append("- hyperparameters: " + ", ".join(f"{k}={v}" for k, v in hp.items()))
    metrics = entry.get("metrics") or {}
    nll_b, nll_a = metrics.get("nll_before") or {}, metrics.get("nll_after") or {}
    for key in ("forget_nll", "retain_nll"):
        if key in nll_a:
            lines.append(f"- {key} after the request: {nll_b.get(key, '?')} -> {nll_a[key]}")
    ev = evidence.get("evaluation")
    if ev:
        lines += ["", f"## Evaluation ({ev['benchmark']}, reference: {ev['reference']})", ""]
        lines += [f"- {k}: {v}" for k, v in ev["metrics"].items()]
    att = evidence.get("attacks")
    if att:
        lines += ["", "## Attacks (recovery: 0 nothing came back, 1 the target's value)", ""]
        for n, a in att.items():
            lines.append(f"- {n}: recovery {a['recovery']}, utility {a['utility']}")
    return "\n".join(lines) + "\n"


def _html(markdown: str) -> str:
    body = []
    for line in markdown.splitlines():
        text = html.escape(line)
        if line.startswith("# "):
            body.append(f"<h1>{text[2:]}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("- "):
            body.append(f"<li>{text[2:]}</li>")
    return "<!doctype html><meta charset='utf-8'><title>certificate</title>\n" + "\n".join(body)


def audit(
    model: str,
    data: str | None = None,
    eval_dir: str | None = None,
    attack_dir: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """The chain, its checks, the data answer; certificates (certificate-N.md/.html) and
    audit.json in `output` when given."""
    chain = load_chain(model)
    verdicts = check_chain(chain, model)
    evidence = _evidence(eval_dir, attack_dir)
    result: dict[str, Any] = {
        "model": str(model),
        "requests": [
            {
                "index": e.get("index"),
                "request": e.get("request"),
                "date": e.get("date"),
                "method": e.get("method"),
                "examples": (e.get("forget") or {}).get("n"),
                **v,
            }
            for e, v in zip(chain, verdicts, strict=True)
        ],
        "data": match_data(chain, data) if data else None,
        "evidence": evidence,
    }
    result["ok"] = all(
        v["link"] != "BROKEN" and v.get("weights_now", "ok") == "ok" for v in verdicts
    )
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        last = len(chain) - 1
        for i, (entry, verdict) in enumerate(zip(chain, verdicts, strict=True)):
            # the evaluation and attacks are of the model as it is now: the last request's
            text = certificate(entry, verdict, evidence if i == last else {})
            stem = f"certificate-{entry.get('index', i + 1)}"
            atomic_write_text(out / f"{stem}.md", text)
            atomic_write_text(out / f"{stem}.html", _html(text))
        atomic_write_json(out / "audit.json", result)
    return result


def describe(result: dict[str, Any]) -> str:
    """What `unlearn audit` prints."""
    lines = [f"deletion requests applied to {result['model']}:"]
    for r in result["requests"]:
        now = f", weights now {r['weights_now']}" if "weights_now" in r else ""
        lines.append(
            f"  #{r['index']} {r['request'] or '(no id)'}  {r['date']}  {r['method']}  "
            f"{r['examples']} examples  link {r['link']}{now}"
        )
    if result["data"]:
        d = result["data"]
        lines.append(f"{d['file']}: {d['answer']}")
    lines.append("chain verified" if result["ok"] else "CHAIN CHECK FAILED")
    return "\n".join(lines)
