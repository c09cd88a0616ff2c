"""Input validation shared by the oracle and every backend.

These helpers work on shapes, dtype names and plain Python values, so NumPy, PyTorch and JAX code
raise the same errors with the same words (``docs/spec.md`` §7). Each one raises before any state
is touched; callers run them before they compute or update anything.
"""

from __future__ import annotations

import numbers
from typing import Sequence

from .conventions import Convention

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def normalize_axis(ndim: int, axis: int) -> int:
    """The feature axis as a non-negative index into a rank-``ndim`` input (§6).

    Raises ``TypeError`` for a non-integer axis and ``ValueError`` for an axis out of range or
    equal to 0 (axis 0 is the batch axis).
    """
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise TypeError(f"axis (the feature axis) must be an int; got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for an input of rank {ndim}")
    ax = int(axis) % ndim
    if ax == 0:
        raise ValueError(
            f"axis={axis} names the batch axis 0 of a rank-{ndim} input; the feature axis must be "
            f"one of 1..{ndim - 1} (or -1..-{ndim - 1})"
        )
    return ax


def reduction_axes(ndim: int, ax: int) -> tuple[int, ...]:
    """All axes except the feature axis: the axes the statistics reduce over (§6)."""
    return tuple(i for i in range(ndim) if i != ax)


def check_input(shape: Sequence[int], axis: int, *, name: str = "x") -> tuple[int, int, int]:
    """Check the rank of the input and return ``(feature_axis, C, n)`` (§6).

    ``n`` is the number of values reduced per channel, ``N * prod(spatial)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have rank >= 2, shaped (N, C, ...) or (N, ..., C); got shape {shape} (rank {len(shape)})"
        )
    ax = normalize_axis(len(shape), axis)
    c = shape[ax]
    n = 1
    for i, s in enumerate(shape):
        if i != ax:
            n *= s
    return ax, c, n


def check_per_channel(name: str, shape: Sequence[int] | None, c: int, ax: int, x_shape: Sequence[int]) -> None:
    """A per-channel array (gamma, beta, running statistics) must have shape (C,) (§1)."""
    if shape is None:
        return
    shape = tuple(int(s) for s in shape)
    if shape != (c,):
        raise ValueError(
            f"{name} must have shape (C,) = ({c},) to match feature axis {ax} of x.shape {tuple(x_shape)}; "
            f"got shape {shape}"
        )


def check_float_dtype(name: str, dtype_name: str) -> None:
    """Only real floating dtypes are BN inputs (§8.3)."""
    if dtype_name not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a real floating dtype (one of {', '.join(FLOAT_DTYPES)}); got {dtype_name}")


def check_flag(name: str, value: object) -> bool:
    """Mode flags are real booleans: ``training=1`` or ``"False"`` is a mistake, not a choice."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ in ("bool_", "bool"):  # numpy.bool_ (its __name__ is "bool" in NumPy 2)
        return bool(value)
    raise TypeError(f"{name} must be a bool; got {value!r} of type {type(value).__name__}")


def check_count(count: object) -> int:
    """``count`` is the number of training steps already taken (§3.3)."""
    if not isinstance(count, numbers.Integral) or isinstance(count, bool) or int(count) < 0:
        raise ValueError(f"count must be an int >= 0 (training steps already taken); got {count!r}")
    return int(count)


def check_batch(n: int, x_shape: Sequence[int], convention: Convention, *, training: bool) -> None:
    """Training needs values to reduce over (§7.3), and n = 1 follows ``single_value`` (§7.1)."""
    if not training:
        return
    if n == 0:
        raise ValueError(
            f"cannot compute batch statistics of an empty batch: x.shape {tuple(x_shape)} has n = 0 "
            "values per channel (spec §7.3)"
        )
    if n == 1 and convention.single_value == "error":
        raise ValueError(
            f"expected more than 1 value per channel when training, got x.shape {tuple(x_shape)} "
            f"(n = 1); convention {convention.name!r} has single_value='error' (spec §7.1)"
        )
