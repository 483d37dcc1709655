"""RESTOR (Rezaei et al., 2024): restorative unlearning.

Corrupt a model with wrong facts about some entities, unlearn the corrupting documents with any
method, and measure whether what the model knew before comes back. Modules, one concept each:

- `facts`: RESTOR's facts file and its few-shot prompts.
- `documents`: corruption documents: reading them, finding their targets, generating them.
- `evaluate`: one model pass over the facts -> fact records (generations, logit probe).
- `metrics`: accuracy, probe means and restoration as pure functions of records.
- `run`: the stages (select targets, evaluate against clean/corrupted baselines).
- `pipeline`: `unlearn restor`, all stages as one resumable run.
"""
