"""Input validation shared by the oracle and every backend.

These helpers work on shapes, dtype names and plain Python values, so NumPy, PyTorch and JAX code
raise the same errors with the same words (``docs/spec.md`` §7). Each one raises before any state
is touched; callers run them before they compute or update anything.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence

from .conventions import Convention

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class ShapeMismatchError(ValueError, RuntimeError):
    """A per-channel array whose size does not match the input's feature axis.

    It is a ``ValueError`` (bn-ref's contract for bad input) and a ``RuntimeError`` (what PyTorch
    raises for the same mistake), so code written against either keeps catching it.
    """


class Layout(NamedTuple):
    """Where the features sit in an input, and what the statistics reduce over (§6).

    Attributes:
        axis: the feature axis, non-negative.
        c: the number of features (channels), ``shape[axis]``.
        n: values reduced per channel, ``N * prod(spatial)``.
        bshape: the shape a (C,) array takes to broadcast against the input.
        reduce: every axis except ``axis``.
    """

    axis: int
    c: int
    n: int
    bshape: tuple[int, ...]
    reduce: tuple[int, ...]


def broadcast_shape(ndim: int, ax: int, c: int) -> tuple[int, ...]:
    """The shape of a (C,) array broadcast against a rank-``ndim`` input with features on ``ax``."""
    return tuple(c if i == ax else 1 for i in range(ndim))


def layout(shape: Sequence[int], axis: int, *, name: str = "x") -> Layout:
    """Check an input's shape (§6) and return its :class:`Layout`."""
    ax, c, n = check_input(shape, axis, name=name)
    ndim = len(tuple(shape))
    return Layout(ax, c, n, broadcast_shape(ndim, ax, c), reduction_axes(ndim, ax))


def check_num_features(num_features: object) -> int:
    """A layer's ``num_features`` is an int >= 1 (the size C of the feature axis)."""
    if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"num_features must be an int >= 1; got {num_features!r}")
    return int(num_features)


def check_running_pair(has_mean: bool, has_var: bool, *, training: bool) -> None:
    """The running statistics come together (§3), and eval needs them (§4)."""
    if has_mean != has_var:
        raise ValueError("running_mean and running_var must be given together (both arrays or both None)")
    if not training and not has_mean:
        raise ValueError(
            "eval (training=False) normalizes with the running statistics (spec §4): running_mean and "
            "running_var are required; got None"
        )


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
        raise ShapeMismatchError(
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
    if not convention.rejects_batch(n, training=training):
        return
    if n == 0:
        raise ValueError(
            f"cannot compute batch statistics of an empty batch: x.shape {tuple(x_shape)} has n = 0 "
            "values per channel (spec §7.3)"
        )
    raise ValueError(
        f"expected more than 1 value per channel when training, got x.shape {tuple(x_shape)} "
        f"(n = 1); convention {convention.name!r} has single_value='error' (spec §7.1)"
    )
