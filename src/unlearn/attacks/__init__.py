"""Attacks that try to bring unlearned knowledge back (`unlearn attack`): weight quantization,
relearning, and prompts; `run` evaluates them against the unlearned model and the target."""
