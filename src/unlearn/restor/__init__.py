"""RESTOR (Rezaei et al., 2024): restorative unlearning.

Corrupt a model with wrong facts about some entities, unlearn the corrupting documents with any
method, and measure whether what the model knew before comes back. Modules, one concept each:

- `facts`: RESTOR's facts file and its few-shot prompts.
- `documents`: corruption documents: reading them, finding their targets, generating them.
- `run`: the stages (select targets, evaluate against clean/corrupted baselines).

The evaluation is a suite of the evaluation engine (`unlearn.eval.suites.restor`: facts as probe
rows) and its numbers are registry metrics (`unlearn.metrics.restor`: judged accuracy, probe
means, restoration).
- `pipeline`: `unlearn restor`, all stages as one resumable run.
"""
