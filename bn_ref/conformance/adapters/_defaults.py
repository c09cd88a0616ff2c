"""Shared by the framework-family adapters: the *defaults* rows and small conversions.

A *defaults* row builds the framework's layer with nothing passed but what the data force (the
number of features where the API needs it, the working dtype), so the preset that claims to
reproduce the framework is tested against the framework's own defaults, not against itself.
Such an adapter carries ``defaults = True`` and a name ending in ``(defaults)``; it declines the
cases that would need an argument: a feature axis other than the framework's default, and
``momentum=None`` (a cumulative average no default gives).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cases import Case

__all__ = ["defaults_skip", "as_f64", "DTYPE_NAMES"]

DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")


def defaults_skip(case: Case, default_axis: int, what: str) -> str | None:
    """Why a defaults row of ``what`` (whose features sit on ``default_axis``) cannot run ``case``."""
    if case.momentum is None:
        return f"the case asks for momentum=None; {what} built from its defaults keeps an exponential average"
    if case.feature_axis != default_axis % case.rank:
        return f"{what} keeps the features on axis {default_axis} by default; the case puts them on axis {case.feature_axis}"
    return None


def as_f64(a: Any) -> np.ndarray | None:
    """Any framework array (or None) as a float64 NumPy copy (bfloat16 through float32)."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype.kind not in "fiu":  # ml_dtypes' bfloat16 and friends
        a = a.astype(np.float32)
    return np.array(a, dtype=np.float64, copy=True)
