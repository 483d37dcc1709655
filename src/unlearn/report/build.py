"""A comparison report over several evaluation folders: markdown, self-contained HTML, JSON, plots.

`build_report` reads the `results.json` that `unlearn eval` writes into each folder and produces
`report.md`, `report.html` (plots embedded as base64 PNG, inline CSS, nothing fetched), a
machine-readable `summary.json` and the plots under `plots/`. Both documents are rendered from one
list of blocks, so they always say the same thing.

Privacy: an evaluation stores forget-set questions, answers and generations under `examples` only
when asked (`unlearn eval --examples N`). That text reaches an output file only with
`show_examples=True`; every other field is numbers, names, paths and skip reasons.

Plots use matplotlib's object API (`Figure`) with the Agg canvas, never pyplot, so building a
report changes no global backend state in the caller's process.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unlearn.errors import UnlearnError
from unlearn.outputs import atomic_write_json, atomic_write_text
from unlearn.report.figures import figure as _figure
from unlearn.report.figures import grid as _grid
from unlearn.report.figures import png as _png
from unlearn.report.runs import Block, Run, _number, load_run

FIRST_METRICS = ("forget_quality", "model_utility")
MAX_EXAMPLES = 10  # per model and dataset, when examples are shown
# Keys of a training-log line that are not loss terms.
NOT_LOSS = {"step", "epoch", "lr", "grad_norm", "seconds"}
PLOTS = {
    "forget_quality_vs_model_utility": "plots/forget_quality_vs_model_utility.png",
    "truth_ratio": "plots/truth_ratio_forget.png",
    "training_loss": "plots/training_loss.png",
    "restor_probe": "plots/restor_probe.png",
}


# ---------------------------------------------------------------------------- reading inputs
def _localization(run: Run) -> Path | None:
    """The model's localization folder (`unlearn forget` with a localize section), if any."""
    if run.train_log is None:
        return None
    folder = run.train_log.parent.parent / "localization"
    return folder if (folder / "localization.json").is_file() else None


def _localization_blocks(runs: list[Run]) -> list[Block]:
    """Per localized model: what was selected, and the layers x module types heatmap."""
    blocks: list[Block] = []
    for i, run in enumerate(runs):
        folder = _localization(run)
        if folder is None:
            continue
        info = json.loads((folder / "localization.json").read_text())
        settings = info.get("settings") or {}
        text = (
            f"{info.get('method')}: {info.get('selected', 0):,} of {info.get('scored', 0):,} "
            f"scored weights selected ({100 * float(info.get('fraction') or 0):.3g}%), noise_std "
            f"{settings.get('noise_std')}, "
            + ("every weight trained after the noise." if settings.get("train_all")
               else "only the selected weights trained.")
        )  # fmt: skip
        if info.get("experts"):
            text += " Experts: " + ", ".join(
                f"layer {e['layer']} expert {e['expert']}" for e in info["experts"]
            )
        blocks += [("h3", run.name), ("p", text)]
        heat = folder / "heatmap.png"
        if heat.is_file():
            blocks.append(
                ("img", f"plots/localization_{i}.png", f"{run.name} mask", heat.read_bytes())
            )
    if blocks:
        intro = "Where the weights each localized run trained live (cells: % of a layer's module selected)."
        blocks = [("h2", "Localization"), ("p", intro), *blocks]
    return blocks


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"


def _same_folder(ref: str, folder: Path) -> bool:
    """`ref` was written relative to the eval's working directory, which we do not know: match the
    resolved path, or else its trailing components (`ev/retain` matches `/tmp/x/ev/retain`)."""
    ref_path = Path(ref).expanduser()
    resolved = folder.resolve()
    if ref_path.is_absolute() or ref_path.exists():
        return ref_path.resolve() == resolved
    parts = [p for p in ref_path.parts if p not in (".", "")]
    return bool(parts) and list(resolved.parts[-len(parts) :]) == parts


def _link_references(runs: list[Run]) -> None:
    """Each run's reference among the inputs: the folder its `reference` names, else the run marked
    `is_reference`; a run is never its own reference."""
    marked = next((r for r in runs if r.is_reference), None)
    for run in runs:
        ref = run.results.get("reference")
        named = None
        if isinstance(ref, str) and ref:
            named = next((r for r in runs if _same_folder(ref, r.folder)), None)
        run.reference = named or marked
        if run.reference is run:
            run.reference = None


def _reference_runs(runs: list[Run]) -> set[int]:
    return {id(r.reference) for r in runs if r.reference is not None} | {
        id(r) for r in runs if r.is_reference
    }


# ---------------------------------------------------------------------------- formatting
def _is_p_value(metric: str) -> bool:
    return metric == "forget_quality" or metric.endswith(("p_value", "pvalue"))


def format_value(metric: str, value: float | None) -> str:
    """p-values in scientific notation (1.2e-05), everything else to 4 significant digits."""
    if value is None:
        return "n/a"
    if _is_p_value(metric):
        return f"{value:.1e}"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def metric_order(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        names += [m for m in run.metrics if m not in names]
    return [m for m in FIRST_METRICS if m in names] + [m for m in names if m not in FIRST_METRICS]


# ---------------------------------------------------------------------------- plots
def plot_fq_vs_mu(runs: list[Run]) -> tuple[bytes | None, str]:
    points = [
        (r.name, r.metrics.get("model_utility"), r.metrics.get("forget_quality")) for r in runs
    ]
    points = [(n, x, y) for n, x, y in points if x is not None and y is not None]
    if not points:
        return None, (
            "No model has both forget_quality and model_utility, so there is no forget quality vs "
            "model utility plot (forget_quality needs a reference model; see Skipped metrics)."
        )
    positive = [y for _, _, y in points if y > 0]
    floor = min([*positive, 1e-3]) / 10  # a p-value of exactly 0 still gets a point on a log axis
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    for name, x, y in points:
        label = name if y > 0 else f"{name} (forget quality 0)"
        ax.scatter([x], [max(y, floor)], s=48, zorder=3)
        ax.annotate(label, (x, max(y, floor)), xytext=(6, 4), textcoords="offset points")
    ax.axhline(0.05, color="grey", linestyle="--", linewidth=1)
    ax.text(0.01, 0.05, "p = 0.05", transform=ax.get_yaxis_transform(), va="bottom", color="grey")
    ax.set_yscale("log")
    ax.margins(x=0.15)
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality, KS p-value (higher is better)")
    ax.set_title("Forget quality vs model utility")
    ax.grid(True, which="major", alpha=0.3)
    note = f"{len(points)} of {len(runs)} model(s) have both metrics."
    if len(positive) < len(points):
        note += f" A forget quality of 0 is drawn at {floor:.0e}."
    return _png(fig), note


def _bins(values: list[float]):
    import numpy as np

    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo > 100:
        return np.geomspace(lo, hi, 31), True
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, 31), False


def plot_truth_ratio(runs: list[Run]) -> tuple[bytes | None, str]:
    refs = _reference_runs(runs)
    shown = [r for r in runs if id(r) not in refs and r.per_example("forget", "truth_ratio")]
    if not shown:
        return None, (
            "No non-reference model has per-example forget truth ratios "
            "(per_example.forget.truth_ratio), so there are no histograms."
        )
    fig, axes = _grid(len(shown))
    alone = []
    for ax, run in zip(axes, shown, strict=True):
        mine = run.per_example("forget", "truth_ratio")
        ref = run.reference.per_example("forget", "truth_ratio") if run.reference else []
        bins, log_x = _bins(mine + ref)
        if ref:
            ax.hist(ref, bins=bins, alpha=0.5, label=f"{run.reference.name} (reference)")
        else:
            alone.append(run.name)
        ax.hist(mine, bins=bins, alpha=0.6, label=run.name)
        if log_x:
            ax.set_xscale("log")
        ax.set_title(run.name if ref else f"{run.name} (no reference)")
        ax.set_xlabel("truth ratio, forget set")
        ax.set_ylabel("examples")
        ax.legend(fontsize=8)
    why = (
        "the reference (retain) model's evaluation is not among the inputs or has no forget "
        "truth ratios; add its folder to compare."
    )
    if len(alone) == len(shown):
        return _png(fig), f"Each model's per-example forget-set truth ratios, plotted alone: {why}"
    note = "Each histogram overlays a model's per-example forget-set truth ratios with its reference's."
    if alone:
        note += f" Plotted alone, without a reference: {', '.join(alone)}; {why}"
    return _png(fig), note


def plot_training_loss(runs: list[Run]) -> tuple[bytes | None, str]:
    from matplotlib.ticker import MaxNLocator

    logged = [r for r in runs if r.log]
    if not logged:
        return None, (
            "No training log found (MODEL_PATH/logs/train.jsonl) for any model, so there are no "
            "loss curves."
        )
    fig, axes = _grid(len(logged))
    for ax, run in zip(axes, logged, strict=True):
        terms = [k for k in dict.fromkeys(k for row in run.log for k in row) if k not in NOT_LOSS]
        for term in terms:
            rows = [row for row in run.log if term in row]
            ax.plot([row["step"] for row in rows], [row[term] for row in rows], label=term)
        ax.set_title(run.name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss term")
        ax.grid(True, alpha=0.3)
        if terms:
            ax.legend(fontsize=8)
    missing = [r.name for r in runs if not r.log]
    note = f"Every loss term logged per step, from {len(logged)} training log(s)."
    if missing:
        note += f" No training log for: {', '.join(missing)}."
    return _png(fig), note


# ---------------------------------------------------------------------------- document
# A block is ("h1"|"h2"|"h3"|"p", text), ("table", header, rows[, numeric]) or
# ("img", relative path, alt text, png bytes).


def _model_spec(run: Run) -> str | None:
    model = run.results.get("model")
    spec = model.get("spec") if isinstance(model, dict) else model
    return str(spec or run.results.get("model_path") or "") or None


def _reference_label(run: Run) -> str:
    if run.is_reference:
        return "(is the reference)"
    if run.reference is not None:
        return run.reference.name
    named = run.results.get("reference")
    return f"{named} (not among the inputs)" if named else "none"


def _models_table(runs: list[Run]) -> Block:
    header = ["model", "benchmark", "split", "model spec", "reference", "eval folder"]
    rows = [
        [
            r.name,
            str(r.results.get("benchmark") or "n/a"),
            str(r.results.get("split") or "n/a"),
            _model_spec(r) or "n/a",
            _reference_label(r),
            str(r.folder),
        ]
        for r in runs
    ]
    return ("table", header, rows)


def headline(run: Run) -> list[str]:
    """The keys a run's suite declares as its headline (TOFU's for evaluations that predate it)."""
    from unlearn.eval.suites.builders import TOFU_HEADLINE

    keys = run.results.get("headline")
    return [str(k) for k in keys] if isinstance(keys, list) and keys else list(TOFU_HEADLINE)


def _key_metrics_table(runs: list[Run], order: list[str]) -> Block:
    keys = [m for m in dict.fromkeys(k for r in runs for k in headline(r)) if m in order]
    rows = [[r.name, *(format_value(m, r.metrics.get(m)) for m in keys)] for r in runs]
    return ("table", ["model", *keys], rows, True)


def _metrics_table(runs: list[Run], order: list[str]) -> Block:
    """Every metric, one row each and a column per model: narrow however many metrics there are."""
    rows = [[m, *(format_value(m, r.metrics.get(m)) for r in runs)] for m in order]
    return ("table", ["metric", *(r.name for r in runs)], rows, True)


def _skipped_blocks(runs: list[Run]) -> list[Block]:
    blocks: list[Block] = [("h2", "Skipped metrics")]
    rows = [[r.name, metric, reason] for r in runs for metric, reason in r.skipped.items()]
    if not rows:
        return [*blocks, ("p", "No metric was skipped.")]
    return [*blocks, ("table", ["model", "metric", "why it was skipped"], rows)]


def _example_blocks(runs: list[Run], show: bool) -> list[Block]:
    blocks: list[Block] = [("h2", "Examples")]
    if not show:
        return [
            *blocks,
            (
                "p",
                "Forget-set text is hidden (rerun with `--show-examples` to include questions, "
                "reference answers and generations).",
            ),
        ]
    for run in runs:
        examples = run.results.get("examples")
        for dataset, items in examples.items() if isinstance(examples, dict) else []:
            items = [e for e in items if isinstance(e, dict)] if isinstance(items, list) else []
            if not items:
                continue
            shown = items[:MAX_EXAMPLES]
            title = f"{run.name}, {dataset} set ({len(shown)} of {len(items)})"
            rows = [
                [str(e.get(k, "")) for k in ("id", "question", "answer", "generation")]
                for e in shown
            ]
            blocks += [("h3", title), ("table", ["id", "question", "answer", "generation"], rows)]
    if len(blocks) == 1:
        blocks.append(
            (
                "p",
                "No examples were saved by the evaluations; evaluate with `--examples N` to keep "
                "N examples' text per set in results.json.",
            )
        )
    return blocks


def _plot_blocks(title: str, key: str, result: tuple[bytes | None, str]) -> list[Block]:
    png, note = result
    blocks: list[Block] = [("h2", title), ("p", note)]
    if png is not None:
        blocks.append(("img", PLOTS[key], title, png))
    return blocks


@dataclass
class Context:
    """What every report section reads."""

    runs: list[Run]
    plots: dict[str, tuple[bytes | None, str]]
    show: bool
    order: list[str]

    @property
    def by_benchmark(self) -> dict[str, list[Run]]:
        """Forgetting evaluations (RESTOR has its own section), grouped by benchmark."""
        from unlearn.report import restor

        out: dict[str, list[Run]] = {}
        for r in self.runs:
            if r not in restor.restor_runs(self.runs):
                out.setdefault(str(r.results.get("benchmark") or "n/a"), []).append(r)
        return out


def _intro(ctx: Context) -> list[Block]:
    refs = [r.name for r in ctx.runs if id(r) in _reference_runs(ctx.runs)]
    intro = f"Comparison of {len(ctx.runs)} evaluation(s)."
    if ctx.by_benchmark:
        intro += " Reference (retain) model: "
        intro += (", ".join(refs) + ".") if refs else "none among the inputs."
    return [("h1", "Unlearning report"), ("p", intro), ("h2", "Models"), _models_table(ctx.runs)]


def _key_metrics(ctx: Context) -> list[Block]:
    """One headline table per benchmark (each suite declares its headline keys)."""
    groups = ctx.by_benchmark
    out: list[Block] = []
    for bench, runs in groups.items():
        title = "Key metrics" if len(groups) == 1 else f"Key metrics: {bench}"
        out += [("h2", title)]
        if any("forget_quality" in headline(r) for r in runs):
            out.append(("p", "forget_quality is a p-value (higher means closer to the retain "
                             "model); n/a means the metric is missing or not a finite number."))  # fmt: skip
        out.append(_key_metrics_table(runs, ctx.order))
    return out


def _tofu_plots(ctx: Context) -> list[Block]:
    if not ctx.by_benchmark:
        return []
    return [
        *_plot_blocks("Forget quality vs model utility", "forget_quality_vs_model_utility",
                      ctx.plots["forget_quality_vs_model_utility"]),
        *_plot_blocks("Truth ratio on the forget set", "truth_ratio", ctx.plots["truth_ratio"]),
    ]  # fmt: skip


def _restor(ctx: Context) -> list[Block]:
    from unlearn.report import restor

    return restor.blocks(restor.restor_runs(ctx.runs), ctx.plots.get("restor_probe", (None, "")))


def _attacks(ctx: Context) -> list[Block]:
    from unlearn.report import attacks

    return attacks.blocks(ctx.runs)


def _training(ctx: Context) -> list[Block]:
    return [
        *_plot_blocks("Training loss", "training_loss", ctx.plots["training_loss"]),
        *_localization_blocks(ctx.runs),
    ]


def _all_metrics(ctx: Context) -> list[Block]:
    return [("h2", "All metrics"), _metrics_table(ctx.runs, ctx.order), *_skipped_blocks(ctx.runs)]


def _examples(ctx: Context) -> list[Block]:
    return _example_blocks(ctx.runs, ctx.show)


#: The report, in order: each section a function of the context that returns its blocks (none
#: when it does not apply). A suite with its own view adds one function here.
SECTIONS: tuple[Callable[[Context], list[Block]], ...] = (
    _intro,
    _key_metrics,
    _tofu_plots,
    _restor,
    _attacks,
    _training,
    _all_metrics,
    _examples,
)


def document(
    runs: list[Run], plots: dict[str, tuple[bytes | None, str]], show: bool
) -> list[Block]:
    ctx = Context(runs, plots, show, metric_order(runs))
    return [block for section in SECTIONS for block in section(ctx)]


# ---------------------------------------------------------------------------- rendering
def _md_cell(text: str) -> str:
    """One line, `|` escaped, and `<`/`&` escaped so a generation's `<b>` is shown, not rendered."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |"]
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1f2328; line-height: 1.5; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .35rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #d0d7de; }
code { background: #f6f8fa; padding: 0 .25rem; border-radius: 3px; }
"""


def _html_text(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html_table(header: list[str], rows: list[list[str]], numeric: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [
            f"<td{' class=num' if numeric and i else ''}>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def render_html(blocks: list[Block]) -> str:
    title = next((b[1] for b in blocks if b[0] == "h1"), "Report")
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_html_text(block[1])}</p>")
        elif kind == "table":
            out.append(_html_table(*block[1:]))
        elif kind == "img":
            data = base64.b64encode(block[3]).decode("ascii")
            out.append(f'<img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(out)
        + "\n</body></html>\n"
    )


# ---------------------------------------------------------------------------- summary and entry
def summarize(runs: list[Run], plots: dict[str, tuple[bytes | None, str]], show: bool) -> dict:
    """Numbers, names and reasons only: never the `examples` text."""
    models = {}
    for r in runs:
        models[r.name] = {
            "eval_dir": str(r.folder),
            "benchmark": r.results.get("benchmark"),
            "split": r.results.get("split"),
            "model": _model_spec(r),
            "is_reference": r.is_reference,
            "reference": r.reference.name if r.reference else None,
            "metrics": r.metrics,
            "skipped": r.skipped,
            "seconds": _number(r.results.get("seconds")),
            "train_log": str(r.train_log) if r.train_log else None,
        }
    return {
        "models": models,
        "metric_order": metric_order(runs),
        "plots": {k: PLOTS[k] if png is not None else None for k, (png, _) in plots.items()},
        "notes": {k: note for k, (_, note) in plots.items()},
        "examples_shown": show,
    }


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_report(
    eval_dirs: list[str | Path], output: str | Path, show_examples: bool = False
) -> dict:
    """Read the evaluation folders, write report.md, report.html, summary.json and plots/*.png
    into `output`, and return the summary."""
    if isinstance(eval_dirs, (str, Path)):
        eval_dirs = [eval_dirs]
    if not eval_dirs:
        raise UnlearnError(
            "no evaluation folders given; pass one or more folders from `unlearn eval`"
        )
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise UnlearnError(f"report output {out} exists and is a file; choose a folder path")
    from unlearn.report import restor

    runs = [load_run(d) for d in eval_dirs]
    _unique_names(runs)
    _link_references(runs)
    plots = {
        "forget_quality_vs_model_utility": plot_fq_vs_mu(runs),
        "truth_ratio": plot_truth_ratio(runs),
        "training_loss": plot_training_loss(runs),
    }
    if restor.restor_runs(runs):
        plots["restor_probe"] = restor.plot_probe(restor.restor_runs(runs))
    for key in PLOTS:
        png = plots.get(key, (None, ""))[0]
        if png is not None:
            _write_bytes(out / PLOTS[key], png)
        elif (out / PLOTS[key]).is_file():
            (out / PLOTS[key]).unlink()  # a stale plot from an earlier report on other inputs
    blocks = document(runs, plots, show_examples)
    for block in blocks:
        if block[0] == "img" and block[1].startswith("plots/localization_"):
            _write_bytes(out / block[1], block[3])
    summary = summarize(runs, plots, show_examples)
    atomic_write_text(out / "report.md", render_markdown(blocks))
    atomic_write_text(out / "report.html", render_html(blocks))
    atomic_write_json(out / "summary.json", summary)
    return summary
