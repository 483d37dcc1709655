"""Training: the one loop every method and fine-tuning run through (`loop`), and what it needs."""

from unlearn.train.loop import StepCallback, TrainJob, TrainResult, plan_steps, train

__all__ = ["StepCallback", "TrainJob", "TrainResult", "plan_steps", "train"]
