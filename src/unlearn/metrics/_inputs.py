"""Turning what a model pass recorded into checked float arrays, shared by every metric module.

Metrics take plain sequences (lists, numpy arrays) so that records read back from disk need no
conversion. A shape that does not fit is a bug in the calling code and raises `ValueError`; a
value the data made impossible (an answer with no tokens, a NaN) is the user's to fix and raises
`UnlearnError`.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized

import numpy as np
from numpy.typing import ArrayLike

from unlearn.errors import UnlearnError


def vector(values: ArrayLike, name: str) -> np.ndarray:
    """One float per example, [N]; NaN or infinity is refused."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one value per example, got shape {array.shape}")
    _check_finite(array, name)
    return array


def nonempty(array: np.ndarray, name: str) -> np.ndarray:
    """Refuse an aggregate over zero examples (an empty split), which has no value."""
    if array.size == 0:
        raise UnlearnError(
            f"{name} is empty, so its aggregate is undefined; check that the split has examples"
        )
    return array


def matrix(values: ArrayLike, name: str, rows: int) -> np.ndarray:
    """K floats per example, [N, K] with K >= 1; NaN or infinity is refused."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != rows or array.shape[1] == 0:
        raise ValueError(f"{name} must have shape [{rows}, K>=1], got {array.shape}")
    _check_finite(array, name)
    return array


def ragged(values: Sequence[ArrayLike], name: str) -> list[np.ndarray]:
    """A variable-length float sequence per example (one per answer token); none may be empty."""
    out = []
    for i, example in enumerate(values):
        array = np.asarray(example, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"{name}[{i}] must be 1-D, got shape {array.shape}")
        if array.size == 0:
            raise UnlearnError(
                f"{name}: example {i} has no answer tokens, so the metric is undefined; "
                "check that its answer is non-empty and not cut off by max_length"
            )
        _check_finite(array, f"{name}[{i}]")
        out.append(array)
    return out


def same_length(a: Sized, b: Sized, names: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names} must have one entry per example, got {len(a)} and {len(b)}")


def _check_finite(array: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(array)):
        where = int(np.argwhere(~np.isfinite(array))[0][0])
        raise UnlearnError(
            f"{name}: example {where} is NaN or infinite; the model pass that wrote these "
            "records diverged or read a broken checkpoint, so re-run the evaluation on a good one"
        )
