"""The one training loop that fine-tuning and every unlearning method go through.

Built on `accelerate`: the same loop runs on a CPU laptop and under `accelerate launch` /
torchrun with multi-process data parallelism (DDP; tests/train/test_fsdp.py runs two gloo
CPU processes under torchrun and gets a one-process run's weights for the same global batch).
Sharding goes through torch's FSDP2 (`unlearn.train.sharding`) or DeepSpeed ZeRO through accelerate
(`unlearn.train.deepspeed`, where only a step's last backward pass steps the optimizer);
accelerate's own FSDP plugin is refused in one line.

The training side, one concern a module:

* `job`: what a run is given (`TrainJob`) and returns (`TrainResult`);
* `setup`: checks, the starting model's values (`reference`: cached in one pass; frozen copies
  only for a KL retain term or reference hidden states; `reinforce`: WHP's copy), masks and
  optimizer (`optim`), resume;
* `schedule`: the batch schedule, a pure function of (seed, step), sharded across processes;
* `step`: one optimizer step; `gradients`: how forget and retain gradients combine; `batches`:
  the model on a micro-batch (low-level model calls in `unlearn.forward`);
* `checkpoint`: atomic checkpoints labelled with the completed step and the config, so
  `--resume` continues exactly or refuses a changed config.

The model trains in train mode (dropout on, as in Hugging Face's Trainer); the passes that read
the starting model (cached reference values, frozen copies) run in eval mode. The caller's mode
is restored at the end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from unlearn.errors import TrainingDiverged, UnlearnError
from unlearn.train import checkpoint as ckpt_io
from unlearn.train import setup
from unlearn.train.checkpoint import CHECKPOINTS, latest_checkpoint
from unlearn.train.job import LOG_FILE, StepCallback, TrainJob, TrainResult
from unlearn.train.schedule import plan_steps, retain_stream
from unlearn.train.state import RunState
from unlearn.train.step import Diverged, log_step, one_step

log = logging.getLogger("unlearn")

__all__ = [
    "CHECKPOINTS",
    "LOG_FILE",
    "StepCallback",
    "TrainJob",
    "TrainResult",
    "latest_checkpoint",
    "plan_steps",
    "retain_stream",
    "train",
]


def train(job: TrainJob) -> TrainResult:
    """Run the job's method on its model in place (the caller passes a model it owns).

    Returns when all steps are done; raises TrainingDiverged (after checkpointing the last good
    state) on a NaN/inf loss or gradient, and UnlearnError (after checkpointing) on Ctrl-C.
    """
    t0 = time.time()
    was_training = job.model.training
    run = setup.build(job)
    if run.accelerator.num_processes > 1:
        _destroy_process_group_at_exit()
    start, resumed_from, history = setup.restore(run, job.resume)
    bar = tqdm(
        total=run.total,
        initial=start,
        desc=job.method.name,
        disable=not job.cfg.progress or not run.accelerator.is_local_main_process,
        unit="step",
    )
    logs: dict[str, Any] = {}
    completed = start  # optimizer steps applied: what a checkpoint is labelled with
    run.model.train()
    try:
        for step in range(start, run.total):
            sums, grad_norm = one_step(run, step)
            completed = step + 1
            logs = log_step(run, completed, sums, grad_norm, t0)
            history.append(logs)
            bar.update(1)
            bar.set_postfix(loss=f"{sums.get('loss', float('nan')):.4f}")
            for cb in job.callbacks:
                cb(completed, logs)
            if job.cfg.save_every and completed % job.cfg.save_every == 0 and completed < run.total:
                _save(run, completed)
    except Diverged as exc:
        bar.close()
        if run.cfg.sharding == "deepspeed":  # no checkpoints (`unlearn.train.deepspeed`)
            raise TrainingDiverged(
                f"training stopped at step {completed + 1}: {exc.reason}; DeepSpeed runs keep no "
                "checkpoint: rerun with a lower train.lr, or check the data"
            ) from None
        ckpt = _save(run, completed)
        raise TrainingDiverged(
            f"training stopped at step {completed + 1}: {exc.reason}; the last good state (after "
            f"step {completed}) is saved in {ckpt}; rerun with --resume and a lower train.lr "
            "(the new lr is applied to the saved state), or check the data"
        ) from None
    except KeyboardInterrupt:
        bar.close()
        if run.cfg.sharding == "deepspeed":
            raise UnlearnError(
                f"interrupted after step {completed} of {run.total}; DeepSpeed runs keep no "
                "checkpoint (use train.sharding=fsdp2 for resumable sharded runs)"
            ) from None
        ckpt = _save(run, completed)
        raise UnlearnError(
            f"interrupted after step {completed} of {run.total}; state saved in {ckpt}; rerun "
            "the same command with --resume to continue"
        ) from None
    finally:
        for p in run.frozen:
            p.requires_grad_(True)
        if job.cfg.gradient_checkpointing:
            setup.checkpointing(job.model, False)
        job.model.train(was_training)
    bar.close()
    if run.method.finalize is not None and run.start.weights is not None:
        _finalize(run)
    return TrainResult(
        steps=run.total,
        final_logs={k: v for k, v in logs.items() if k not in ("step", "epoch", "seconds", "lr")},
        wall_seconds=time.time() - t0,
        resumed_from=resumed_from,
        log_path=str(run.log_path),
        history=history,
        reference_seconds=run.start.seconds,
        reference=run.start.forget,
        perturbed=run.perturbed,
    )


def _destroy_process_group_at_exit() -> None:
    """Destroy the process group when this process exits, while the interpreter still runs (not
    after a run: a later run in the same process reuses it). Left to interpreter teardown, a gloo
    worker thread releasing a finished all-reduce's tensors cannot take the GIL and the process
    aborts with "terminate called without an active exception". Registered once."""
    import atexit

    from accelerate import PartialState

    global _EXIT_HOOKED
    if not _EXIT_HOOKED:
        atexit.register(PartialState().destroy_process_group)
        _EXIT_HOOKED = True


_EXIT_HOOKED = False


def _save(run: RunState, completed: int) -> Path:
    from unlearn.train import sharding

    shards = (lambda folder: sharding.save(run, folder)) if run.cfg.sharding == "fsdp2" else None
    return ckpt_io.save_checkpoint(
        run.accelerator, run.output, completed, run.fingerprint, run.state or None, shards
    )


def _finalize(run: RunState) -> None:
    """Replace the trained weights by the method's function of them and the start (task vectors)."""
    assert run.method.finalize is not None and run.start.weights is not None
    from unlearn.train import sharding

    named = dict(run.accelerator.unwrap_model(run.model).named_parameters())
    trained = {n: named[n].detach() for n in run.start.weights}
    # the start was copied whole; a sharded parameter gets it laid out as itself
    start = {n: sharding.like(w.to(named[n].dtype), named[n]) for n, w in run.start.weights.items()}
    new = run.method.finalize(start, trained, run.params)
    with torch.no_grad():
        for name, weight in new.items():
            named[name].copy_(weight.to(named[name].device, named[name].dtype))
