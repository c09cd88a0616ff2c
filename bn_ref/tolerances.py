"""The tolerances each dtype is held to, and the one error measure every comparison uses.

``docs/spec.md`` §8.4 derives them. An implementation computing in ``dtype`` is compared with the
oracle evaluated on the *same inputs rounded to that dtype*; the allowed error of an array is::

    bound = atol + rtol * M + C_COND * u * kappa * M

where ``M`` is the largest finite magnitude of the expected array, ``u`` the dtype's unit
round-off, and ``kappa`` the input's condition number (:func:`bn_ref.oracle.condition_number`):
data whose mean is far from zero relative to its spread lose digits in any working precision,
and the bound grants exactly that loss, no more. Errors are reported in units of the bound, so
1.0 is the edge of conformance.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

__all__ = ["Tolerance", "TOLERANCES", "C_COND", "tolerance", "error_units", "assert_close"]

C_COND = 32.0
"""Multiplier of the conditioning term (§8.4)."""


@dataclass(frozen=True)
class Tolerance:
    """Per-dtype tolerance: ``rtol`` and ``atol`` for well-conditioned data, ``u`` the unit round-off."""

    dtype: str
    rtol: float
    atol: float
    u: float

    def bound(self, expected: np.ndarray, kappa: float = 1.0) -> float:
        finite = np.abs(np.asarray(expected, dtype=np.float64))
        finite = finite[np.isfinite(finite)]
        m = float(finite.max()) if finite.size else 0.0
        return self.atol + self.rtol * m + C_COND * self.u * max(kappa, 1.0) * m


TOLERANCES: Mapping[str, Tolerance] = MappingProxyType(
    {
        "float64": Tolerance("float64", rtol=1e-10, atol=1e-12, u=2.0**-53),
        "float32": Tolerance("float32", rtol=2e-5, atol=1e-6, u=2.0**-24),
        "float16": Tolerance("float16", rtol=1e-2, atol=1e-3, u=2.0**-11),
        "bfloat16": Tolerance("bfloat16", rtol=5e-2, atol=1e-2, u=2.0**-8),
    }
)


def tolerance(dtype: Any) -> Tolerance:
    """The :class:`Tolerance` of a dtype given by name or as a NumPy/torch/JAX dtype."""
    try:
        name = np.dtype(dtype).name  # names, NumPy dtypes and scalar types, jnp dtypes, ml_dtypes
    except TypeError:
        name = str(dtype)
    name = name.replace("torch.", "")
    try:
        return TOLERANCES[name]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype!r}; known: {', '.join(TOLERANCES)}") from None


def error_units(actual: Any, expected: Any, dtype: Any, *, kappa: float = 1.0) -> float:
    """Worst error of ``actual`` against ``expected`` in units of the dtype's bound (§8.4).

    NaN must appear exactly where expected has NaN, and infinities must match exactly (§7.4);
    any mismatch there, or a shape mismatch, is ``inf`` units.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return float("inf")
    nan_e, nan_a = np.isnan(e), np.isnan(a)
    if not np.array_equal(nan_e, nan_a):
        return float("inf")
    inf_e = np.isinf(e)
    if not np.array_equal(inf_e, np.isinf(a)) or not np.array_equal(e[inf_e], a[inf_e]):
        return float("inf")
    ok = ~(nan_e | inf_e)
    if not ok.any():
        return 0.0
    err = float(np.max(np.abs(a[ok] - e[ok])))
    return err / tolerance(dtype).bound(e, kappa)


def assert_close(actual: Any, expected: Any, dtype: Any, *, kappa: float = 1.0, what: str = "value") -> None:
    """Raise ``AssertionError`` when :func:`error_units` exceeds 1."""
    units = error_units(actual, expected, dtype, kappa=kappa)
    if not units <= 1.0:
        a = np.asarray(actual, dtype=np.float64)
        e = np.asarray(expected, dtype=np.float64)
        detail = ""
        if a.shape == e.shape:
            with np.errstate(invalid="ignore"):
                detail = f"; max abs diff {np.nanmax(np.abs(a - e)) if a.size else 0.0:.3e}"
        raise AssertionError(f"{what} ({dtype}): error {units:.3g} x tolerance{detail}; shapes {a.shape} vs {e.shape}")
