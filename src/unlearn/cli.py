"""The `unlearn` command line: a thin layer over `unlearn.api`.

Every user error (UnlearnError) is printed as one line on stderr with a non-zero exit code; only
real bugs show a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from unlearn.errors import UnlearnError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Remove the influence of a forget set from a causal language model, and measure it.",
    pretty_exceptions_enable=False,
)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Dotted overrides, e.g. method.beta=0.2 train.epochs=3", show_default=False
    ),
]
ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML config file.")]
ModelOpt = Annotated[
    str | None, typer.Option(help="Hub id, local HF folder, .gguf file, or smollm2-135m.")
]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output folder.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing output folder.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted run from its checkpoint.")]
DryRunOpt = Annotated[bool, typer.Option(help="Validate and print the plan; load no model.")]
MergeOpt = Annotated[
    bool, typer.Option(help="With model.adapter=lora: also save the merged model (output folder).")
]


def _print_plan(plan) -> None:
    typer.echo(json.dumps(plan.describe(), indent=2))


def _finish(result) -> None:
    metrics = result.metrics
    typer.echo(f"saved: {result.output}")
    before, after = metrics.get("nll_before") or {}, metrics.get("nll_after") or {}
    for key in ("forget_nll", "retain_nll"):
        if key in after:
            b = f"{before[key]:.4f} -> " if key in before else ""
            typer.echo(f"{key}: {b}{after[key]:.4f}")
    seconds = dict(result.manifest.get("seconds") or {})
    if seconds:
        ref = seconds.pop("reference", None)  # spent inside "train", before its first step
        phases = [
            f"{k} {v:.1f}" + (f" (reference pass {ref:.1f})" if k == "train" and ref else "")
            for k, v in seconds.items()
        ]
        total = result.manifest.get("wall_seconds", 0)
        typer.echo(f"seconds: {', '.join(phases)}; total {total:.1f}")


@app.command()
def forget(
    overrides: Overrides = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    forget: Annotated[
        str | None, typer.Option(help="Forget set: file or hub:OWNER/NAME[:CONFIG].")
    ] = None,
    retain: Annotated[str | None, typer.Option(help="Retain set: file or hub spec.")] = None,
    method: Annotated[
        str | None, typer.Option(help="Unlearning method (see `unlearn methods`).")
    ] = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    merge: MergeOpt = False,
    request: Annotated[
        str | None,
        typer.Option(help="The deletion request's id, kept in the model's chain (unlearn audit)."),
    ] = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Unlearn a forget set from a model."""
    from unlearn import api

    result = api.forget(
        model,
        forget,
        retain,
        method,
        output,
        config=config,
        overrides=overrides or [],
        overwrite=overwrite,
        resume=resume,
        merge=merge,
        request=request,
        dry_run=dry_run,
    )
    if dry_run:
        _print_plan(result)
    else:
        _finish(result)


@app.command()
def finetune(
    overrides: Overrides = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    data: Annotated[str | None, typer.Option(help="Training data: file or hub spec.")] = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    merge: MergeOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Fine-tune a model on question/answer data or documents (to build target/retain models)."""
    from unlearn import api

    result = api.finetune(
        model,
        data,
        output,
        config=config,
        overrides=overrides or [],
        overwrite=overwrite,
        resume=resume,
        merge=merge,
        dry_run=dry_run,
    )
    if dry_run:
        _print_plan(result)
    else:
        _finish(result)


@app.command()
def localize(
    overrides: Overrides = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    forget: Annotated[str | None, typer.Option(help="Forget set: file or hub spec.")] = None,
    retain: Annotated[str | None, typer.Option(help="Retain set: file or hub spec.")] = None,
    output: OutputOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier localization.")] = False,
) -> None:
    """Find the weights that hold the forget data (GRIN gradient ratio); save a mask and a summary.

    Options go in the `localize` section: localize.method=grin|forget_grad|random|regex|uoe,
    localize.top_fraction=0.01, localize.select=global|per_tensor, localize.scores=true.
    """
    from unlearn import api

    loc = api.localize(
        model, forget, retain, output, config=config, overrides=overrides or [],
        overwrite=overwrite or None,
    )  # fmt: skip
    info = loc.info
    typer.echo(
        f"{info.get('method')}: selected {info['selected']:,} of {info['scored']:,} weights "
        f"({100 * info['fraction']:.3g}%) in {info.get('seconds', 0):.1f} s"
    )
    folder = info.get("output", output)
    typer.echo(f"saved: {folder}/mask.safetensors, localization.json, summary.md, heatmap.png")


def print_eval_summary(res: dict, output: str | None = None) -> None:
    """The suite's headline metrics as a table, then what was skipped and why, then the
    truncation count."""
    from unlearn.eval.suites.builders import TOFU_HEADLINE

    headline = res.get("headline") or TOFU_HEADLINE
    rows = [(k, res["metrics"][k]) for k in headline if k in res["metrics"]]
    if rows:
        width = max(len(k) for k, _ in rows)
        typer.echo(f"{'metric':<{width}}  value")
        for key, value in rows:
            shown = f"{value:.2e}" if key == "forget_quality" else f"{value:.4f}"
            typer.echo(f"{key:<{width}}  {shown}")
    for key, note in res.get("notes", {}).items():
        typer.echo(f"{key}: {note}")
    for key, why in res["skipped"].items():
        typer.echo(f"skipped {key}: {why}")
    cut = res.get("pass", {}).get("truncated", 0)
    if cut:
        max_length = res.get("settings", {}).get("prompt", {}).get("max_length")
        typer.echo(
            f"warning: {cut} sequences were cut to their token cap (prompt.max_length="
            f"{max_length}, or the set's own); their scores miss the cut tokens"
        )
    typer.echo(f"saved: {output or res.get('output', '')}")


@app.command("protocol")
def protocol_(
    kind: Annotated[str, typer.Argument(help="scalability | sustainability")],
    overrides: Overrides = None,
    model: ModelOpt = None,
    forget: Annotated[
        list[str] | None,
        typer.Option(help="Forget file of a stage (repeat, one per stage), or one with --stages."),
    ] = None,
    stages: Annotated[
        int | None, typer.Option(help="Cut the one --forget file into this many parts.")
    ] = None,
    retain: Annotated[str | None, typer.Option(help="Retain set: file or hub spec.")] = None,
    method: Annotated[str | None, typer.Option(help="Unlearning method.")] = None,
    output: OutputOpt = None,
    benchmark: Annotated[str, typer.Option(help="Benchmark evaluated after each stage.")] = "muse",
    split: Annotated[str | None, typer.Option(help="Benchmark split.")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Benchmark data folder.")] = None,
    limit: Annotated[int | None, typer.Option(help="Rows per evaluation set.")] = None,
    reference: Annotated[
        str | None, typer.Option(help="Eval folder of the retain (retrained) model.")
    ] = None,
    eval_set: Annotated[
        list[str] | None, typer.Option(help="Evaluation override key=value (repeatable).")
    ] = None,
) -> None:
    """Run MUSE's scalability or sustainability protocol; rerun the same command to resume."""
    from unlearn import api

    if not (model and forget and method and output):
        raise UnlearnError("protocol needs --model, --forget, --method and --output")
    state = api.protocol(
        kind, model, forget, retain, method, output, stages=stages, overrides=overrides or [],
        eval_overrides=eval_set or [], benchmark=benchmark, split=split, data_dir=data_dir,
        limit=limit, reference=reference,
    )  # fmt: skip
    for s in state["stages"]:
        cells = ", ".join(f"{k} {v:.4g}" for k, v in s["metrics"].items())
        typer.echo(f"stage {s['stage']} ({s['forget_n']} forget rows): {cells}")
    typer.echo(f"saved: {output}/protocol.json, protocol.md, protocol.png")


@app.command("eval")
def eval_(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Dotted overrides, e.g. generation.max_new_tokens=200 prompt.max_length=512 "
            "prompt.system_prompt='You are a helpful assistant.' score.end_of_turn=false",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    model: Annotated[
        str | None, typer.Option(help="The model to evaluate (folder, hub id, .gguf, alias).")
    ] = None,
    output: OutputOpt = None,
    benchmark: Annotated[
        str | None,
        typer.Option(help="tofu | people | custom | muse | wmdp | mmlu | mcq (default tofu)."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Benchmark split: TOFU forget01; MUSE news|books; WMDP bio,chem,cyber; MMLU "
            "subjects (comma-separated)."
        ),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            help="Local folder in the hub's layout (mcq: a file or folder); else the hub."
        ),
    ] = None,
    forget: Annotated[str | None, typer.Option(help="Custom forget file.")] = None,
    retain: Annotated[str | None, typer.Option(help="Custom retain file.")] = None,
    holdout: Annotated[str | None, typer.Option(help="Custom holdout file (for MIA).")] = None,
    reference: Annotated[
        str | None, typer.Option(help="Eval folder of the retain (reference) model.")
    ] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            help="A named comparison NAME=EVAL_DIR (repeatable), e.g. before=evals/target."
        ),
    ] = None,
    shots: Annotated[
        int | None, typer.Option(help="Multiple-choice few-shot examples (MMLU dev rows).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Display name in reports.")] = None,
    limit: Annotated[
        int | None, typer.Option(help="Use only the first N rows of each set.")
    ] = None,
    mia_gradnorm: Annotated[
        bool | None,
        typer.Option(
            "--mia-gradnorm",
            help="Also run the gradient-norm attack (a backward pass per example).",
        ),
    ] = None,
    examples: Annotated[
        int | None,
        typer.Option(
            help="Save N examples' text per set in results.json for `report --show-examples`."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the evaluation in a non-empty output folder.")
    ] = False,
) -> None:
    """Evaluate a model: one pass per dataset, every metric from the saved records.

    Settings come from --config, then these options, then dotted overrides; defaults follow
    TOFU / OpenUnlearning (200 new tokens, max length 512, end-of-turn tokens scored).
    """
    from unlearn import api

    res = api.evaluate(
        model,
        output,
        config=config,
        overrides=overrides or [],
        benchmark=benchmark,
        split=split,
        data_dir=data_dir,
        forget=forget,
        retain=retain,
        holdout=holdout,
        reference=reference,
        compare=compare or None,
        shots=shots,
        name=name,
        limit=limit,
        mia_gradnorm=mia_gradnorm,
        examples=examples,
        overwrite=overwrite or None,
    )
    print_eval_summary(res)


@app.command()
def attack(
    overrides: Overrides = None,
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="The unlearned model (folder, hub id).")] = None,
    target: Annotated[
        str | None, typer.Option(help="The model before unlearning (recovery is against it).")
    ] = None,
    attacks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: quant8, quant4, quant4_fp4, quant4_rtn, relearn, "
            "relearn_split, paraphrase, fewshot, jailbreak (default: quant8,quant4,relearn,"
            "paraphrase,fewshot)."
        ),
    ] = None,
    output: OutputOpt = None,
    benchmark: Annotated[
        str | None, typer.Option(help="tofu | people | custom | muse (as `unlearn eval`).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Benchmark split (as `unlearn eval`).")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Local benchmark folder.")] = None,
    forget: Annotated[str | None, typer.Option(help="Custom forget file.")] = None,
    retain: Annotated[str | None, typer.Option(help="Custom retain file.")] = None,
    reference: Annotated[
        str | None, typer.Option(help="Eval folder of the retain (reference) model.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Use only the first N rows of each set.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the results in a non-empty output folder.")
    ] = False,
) -> None:
    """Attack an unlearned model (quantization, relearning, prompts) and measure how much of what
    unlearning removed comes back, against the target; settings `attack.*` as overrides."""
    from unlearn import api
    from unlearn.attacks.run import markdown

    summary = api.attack(
        model, target, output, config=config, overrides=overrides or [], attacks=attacks,
        benchmark=benchmark, split=split, data_dir=data_dir, forget=forget, retain=retain,
        reference=reference, limit=limit, overwrite=overwrite or None,
    )  # fmt: skip
    typer.echo(markdown(summary))


@app.command()
def audit(
    model: Annotated[str, typer.Argument(help="A model folder written by `unlearn forget`.")],
    data: Annotated[
        str | None, typer.Option(help="A data file: was this exact set (or which rows) requested?")
    ] = None,
    eval_dir: Annotated[
        str | None, typer.Option("--eval", help="An `unlearn eval` folder of this model.")
    ] = None,
    attack_dir: Annotated[
        str | None, typer.Option("--attack", help="An `unlearn attack` folder of this model.")
    ] = None,
    output: Annotated[
        str | None, typer.Option(help="Write certificate-N.md/.html and audit.json here.")
    ] = None,
) -> None:
    """Print a model's deletion-request chain, check its hashes, answer whether a data file was
    requested, and write a certificate per request."""
    from unlearn import api
    from unlearn.deletion import describe

    result = api.audit(model, data, eval_dir=eval_dir, attack_dir=attack_dir, output=output)
    typer.echo(describe(result))
    if not result["ok"]:
        raise typer.Exit(1)


@app.command()
def report(
    eval_dirs: Annotated[
        list[str], typer.Argument(help="Evaluation folders (from `unlearn eval`).")
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Report folder.")] = "report",
    show_examples: Annotated[
        bool,
        typer.Option(
            help="Include the examples' text (questions, answers, generations) that evaluations "
            "saved with `--examples N`."
        ),
    ] = False,
) -> None:
    """Write report.md, report.html and summary.json comparing evaluated models."""
    from unlearn import api

    api.report(eval_dirs, output, show_examples=show_examples)
    typer.echo(f"saved: {output}/report.html, {output}/report.md, {output}/summary.json")


@app.command()
def demo(
    output: Annotated[str, typer.Option("--output", "-o", help="Demo folder.")] = "out/demo",
    method: Annotated[str, typer.Option(help="Unlearning method.")] = "npo",
    fresh: Annotated[bool, typer.Option(help="Ignore cached fine-tuned models.")] = False,
) -> None:
    """Fine-tune SmolLM2 on built-in fictitious people, unlearn some, evaluate, report."""
    from unlearn import api

    api.demo(output, method, fresh)


restor_app = typer.Typer(
    help="RESTOR: corrupt a model with wrong facts, unlearn them, measure what comes back. "
    "Without a command: every stage (choose targets, corrupt, unlearn with each method, evaluate, "
    "report); rerun with the same --output to continue an interrupted run.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(restor_app, name="restor")
FactsOpt = Annotated[str | None, typer.Option(help="RESTOR facts file (facts.json format).")]
TargetsOpt = Annotated[
    str | None,
    typer.Option(help="Target entities: names separated by ';', or a file (JSON list or lines)."),
]
UntouchedOpt = Annotated[
    str | None, typer.Option(help="Untouched entities (collateral damage): as --targets.")
]


@restor_app.callback()
def restor(
    ctx: typer.Context,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Dotted override, repeatable: -s corrupt.lr=1e-4 -s unlearn.epochs=3 "
            "-s eval.judge=exact -s n_targets=5 (docs/restor.md lists them)",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    facts: FactsOpt = None,
    corruption: Annotated[
        str | None,
        typer.Option(help='Corruption documents [{"text"}]; omitted: generated from the facts.'),
    ] = None,
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated methods (ga, graddiff, npo, simnpo, ...).")
    ] = None,
    entities: Annotated[
        str | None, typer.Option(help="Candidate/evaluated entities: ';'-separated or a file.")
    ] = None,
    targets: TargetsOpt = None,
    untouched: UntouchedOpt = None,
    output: OutputOpt = None,
) -> None:
    """All stages: choose targets, corrupt, unlearn with each method, evaluate, report.

    Rerunning with the same --output continues an interrupted run (finished stages are kept).
    """
    if ctx.invoked_subcommand is not None:
        return
    from unlearn import api

    out = output or "restor"
    result = api.restor(
        model, facts, corruption, [m for m in methods.split(",") if m.strip()] if methods else None,
        out, config=config, overrides=overrides or [], entities=entities, targets=targets,
        untouched=untouched,
    )  # fmt: skip
    secs = ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())
    typer.echo(f"seconds: {secs}")
    typer.echo(f"saved: {out}/report/report.md, {out}/report/report.html, {out}/evals/")


@restor_app.command("corrupt")
def restor_corrupt(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Training overrides: train.lr=1e-4 train.epochs=5", show_default=False),
    ] = None,
    model: ModelOpt = None,
    corruption: Annotated[str | None, typer.Option(help="Corruption documents file.")] = None,
    output: OutputOpt = None,
) -> None:
    """Fine-tune a clean model on corruption documents (full fine-tuning); the clean one is kept."""
    from unlearn import api

    if not corruption:
        raise UnlearnError("no corruption documents given; pass --corruption FILE")
    if not model:
        raise UnlearnError("no model given; pass --model (hub id, folder, .gguf or smollm2-135m)")
    out = api.restor_corrupt(model, corruption, output or "restor/corrupted", overrides or [])
    typer.echo(f"saved: {out}")


@restor_app.command("eval")
def restor_eval(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Eval settings: judge=exact shots=5 max_new_tokens=24", show_default=False
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="The model to evaluate.")] = None,
    clean: Annotated[
        str | None, typer.Option(help="Clean model, or its RESTOR evaluation folder.")
    ] = None,
    corrupted: Annotated[
        str | None, typer.Option(help="Corrupted model, or its RESTOR evaluation folder.")
    ] = None,
    facts: FactsOpt = None,
    corruption: Annotated[
        str | None,
        typer.Option(help="Corruption documents (targets and wrong answers are read off them)."),
    ] = None,
    setup: Annotated[
        str | None, typer.Option(help="setup.json of an `unlearn restor` run (targets, answers).")
    ] = None,
    targets: TargetsOpt = None,
    untouched: UntouchedOpt = None,
    name: Annotated[str | None, typer.Option(help="Display name in reports.")] = None,
    output: OutputOpt = None,
) -> None:
    """Evaluate a model on RESTOR facts against the clean and corrupted models.

    The targets come from --setup, --corruption or --targets, else from the corrupted model (the
    `unlearn restor` run it belongs to, or the documents `restor corrupt` trained it on).
    """
    from unlearn import api

    res = api.restor_eval(
        model, clean, corrupted, facts, output, corruption=corruption,
        setup=setup, targets=targets, untouched=untouched, name=name, overrides=overrides or [],
    )  # fmt: skip
    for key, value in res["metrics"].items():
        typer.echo(f"{key:<36} {value:.4f}")
    for key, why in res["skipped"].items():
        typer.echo(f"skipped {key}: {why}")
    typer.echo(f"saved: {res['output']}")


@app.command()
def methods() -> None:
    """List the unlearning methods with their hyperparameters and defaults."""
    from unlearn.methods import describe_methods

    for line in describe_methods():
        typer.echo(line)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line on stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = app(args=argv, standalone_mode=False)  # a typer.Exit's code, when one is raised
    except UnlearnError as exc:
        print(f"unlearn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("unlearn: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
