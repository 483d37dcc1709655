"""Localization: choose the weights an unlearning run may change (GRIN, its controls, UOE).

`unlearn.localization.run.localize` scores or loads a mask; `unlearn.train.recipe` has the loop inject noise into the
selected weights and restricts training to them; `unlearn localize` writes a mask on its own.
"""
