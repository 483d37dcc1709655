"""Training: the one loop every method and fine-tuning run through (`loop`), and what it needs."""

from unlearn.train.loop import StepCallback, TrainResult, plan_steps, train

__all__ = ["StepCallback", "TrainResult", "plan_steps", "train"]
