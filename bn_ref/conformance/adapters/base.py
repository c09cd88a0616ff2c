"""The adapter contract and small helpers shared by the built-in adapters.

An adapter is any object with ``name``, ``convention`` and ``run(case) -> dict`` (see
``docs/adapters.md``); :class:`Adapter` spells the contract as a ``typing.Protocol`` for type
checkers. ``skip(case) -> str | None`` is optional.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ...conventions import Convention
from ..cases import Case

__all__ = ["Adapter", "numpy_out", "axis_reason", "THIRD_PARTY"]

THIRD_PARTY = {"torch", "jax", "jaxlib", "flax", "keras", "onnx", "onnxruntime", "ml_dtypes", "optax", "hypothesis"}
"""Top-level packages whose absence makes a built-in row *skip* (anything else missing is an error)."""


@runtime_checkable
class Adapter(Protocol):
    """What the harness calls. ``run`` may raise; that is reported as an error for the case."""

    name: str
    convention: Convention

    def run(self, case: Case) -> dict[str, Any]:  # pragma: no cover - protocol
        ...


def numpy_out(a: Any) -> np.ndarray | None:
    """A framework array as float64 NumPy (None stays None)."""
    if a is None:
        return None
    if hasattr(a, "detach"):  # torch
        a = a.detach()
        if a.is_floating_point():
            a = a.double()
        return a.cpu().numpy().copy()
    return np.array(a, dtype=np.float64, copy=True)


def axis_reason(case: Case, allowed: tuple[int, ...], what: str) -> str | None:
    """Skip reason when the case's feature axis is not one the framework supports."""
    ax = case.feature_axis
    ok = {a % case.rank for a in allowed}
    if ax not in ok:
        return f"{what} keeps the features on axis {' or '.join(str(a) for a in allowed)} only"
    return None
