"""The registry of unlearning methods, and turning user overrides into validated hyperparameters.

The registry is a literal list, not filled by import side effects, so `get_method` works the same
from the CLI, from a notebook, and from tests. Adding a method means writing its module and adding
its `METHOD` here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pydantic

from unlearn.errors import UnlearnError
from unlearn.methods import (
    ce_u,
    dpo,
    finetune,
    grad_ascent,
    grad_diff,
    idk_dpo,
    idk_nll,
    npo,
    pdu,
    rmu,
    satimp,
    simnpo,
    task_vector,
    undial,
    uno,
    uno_s,
    wga,
    whp,
)
from unlearn.methods.base import LossInputs, Method

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        grad_ascent.METHOD,
        grad_diff.METHOD,
        npo.METHOD,
        simnpo.METHOD,
        undial.METHOD,
        ce_u.METHOD,
        wga.METHOD,
        satimp.METHOD,
        rmu.METHOD,
        pdu.METHOD,
        uno.METHOD,
        uno_s.METHOD,
        whp.METHOD,
        task_vector.METHOD,
        idk_nll.METHOD,
        dpo.METHOD,
        idk_dpo.METHOD,
        finetune.METHOD,
    )
}

__all__ = ["METHODS", "LossInputs", "Method", "build_params", "describe_methods", "get_method"]


def get_method(name: str) -> Method:
    """Look a method up by its CLI name; unknown names fail with the list of valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        valid = ", ".join(METHODS)
        raise UnlearnError(f"unknown method {name!r}; valid: {valid}") from None


def _field_names(params: type) -> list[str]:
    return [f.name for f in dataclasses.fields(params)]


def build_params(method: Method | str, overrides: dict[str, Any]) -> Any:
    """The method's params dataclass with `overrides` applied, type-coerced and validated.

    Values may be strings from the command line ("0.2"); pydantic coerces them to the field types
    and checks Literal choices, and the dataclass's own __post_init__ rejects values that type-check
    but make no sense (beta <= 0). Every failure is one UnlearnError line naming the field.
    """
    if isinstance(method, str):
        method = get_method(method)
    names = _field_names(method.params)
    for key in overrides:
        if key not in names:
            valid = ", ".join(names) or "(none)"
            raise UnlearnError(
                f"unknown hyperparameter {key!r} for method {method.name!r}; valid: {valid}"
            )
    try:
        return pydantic.TypeAdapter(method.params).validate_python(dict(overrides))
    except pydantic.ValidationError as exc:
        raise UnlearnError(_one_line(method.name, exc)) from None
    except ValueError as exc:  # __post_init__ outside pydantic's wrapping, if ever
        raise UnlearnError(f"invalid hyperparameter for method {method.name!r}: {exc}") from None


def _one_line(method: str, exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"])
    if not loc:  # raised by __post_init__: the message already names the field
        ctx_error = err.get("ctx", {}).get("error")
        msg = str(ctx_error) if ctx_error is not None else err["msg"]
        return f"invalid hyperparameter for method {method!r}: {msg}"
    return f"invalid value {err['input']!r} for {method}.{loc}: {err['msg']}"


def describe_methods() -> list[str]:
    """One line per method for `unlearn methods`: name, summary, and every default."""
    lines = []
    for method in METHODS.values():
        defaults = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(method.params))
        lines.append(f"{method.name}: {method.summary}" + (f" ({defaults})" if defaults else ""))
    return lines
