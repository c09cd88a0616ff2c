"""The tolerances each dtype is held to, and the error measures every comparison uses.

``docs/spec.md`` §8.4 derives them. An implementation computing in dtype ``T`` is compared with
the oracle evaluated on the *same inputs rounded to T*. Two measures exist:

* :func:`element_bounds` + :func:`element_units` -- the **normative, per-element bound** the
  conformance harness uses (§8.4): for every output element ``e`` in channel ``c``::

      |actual_e - expected_e| <= atol_T + C_ELEM * (u_T |expected_e| + rounding terms of e's own
                                  computation in the accumulation precision + a per-channel
                                  conditioning term, capped at CAP)

  so an error of a small multiple of the working precision's round-off *on the actual data* passes
  and a wrong answer of realistic size (a 1 % scale error, eps x 10, the mean not subtracted, ...)
  fails in every dtype (``tests/test_tolerances_meta.py`` is the table that shows it).
* :func:`error_units` with ``kappa`` -- the older array-level bound
  ``atol + rtol*M + C_COND*u*kappa*M`` (``M`` the largest expected magnitude). It is kept for unit
  tests on well-conditioned data; it is **not** sound on ill-conditioned data (it scales with the
  largest output and one kappa for the whole array) and the harness no longer uses it.

Errors are reported in units of the bound, so 1.0 is the edge of conformance.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "Tolerance", "TOLERANCES", "C_COND", "C_ELEM", "C_T", "CAP", "tolerance", "accumulation_dtype", "round_to",
    "element_bounds", "element_units", "error_units", "assert_close",
]

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


# -- the per-element bound (§8.4) ----------------------------------------------------------------

C_ELEM = 8.0
"""Multiplier of the per-element bound (§8.4): covers the few roundings that compound each term
(chosen from measurement: the largest error of a conforming framework in the matrix is reported in
``docs/conformance.md``; the meta-test shows every wrong answer of its table still fails)."""

C_T = 2.0
"""Roundings to T allowed in each term of dx (§8.4): autograd in T rounds every intermediate."""

CAP = 2.0**-7
"""Cap on the conditioning term: the bound never grants a per-channel shift of x_hat larger than
``C_ELEM * CAP = 1/16`` of a standard deviation, however ill-conditioned the data (§8.4)."""

_ACC = {"float16": "float32", "bfloat16": "float32"}
_TINY = {"float64": 2.0**-1074, "float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}
"""The smallest positive (subnormal) number of each dtype: the absolute rounding granularity."""


def accumulation_dtype(dtype: Any) -> str:
    """The working precision of the arithmetic for inputs in ``dtype`` (§8.3): float32 for float16
    and bfloat16, the dtype itself otherwise."""
    name = tolerance(dtype).dtype
    return _ACC.get(name, name)


def round_to(a: Any, dtype: Any) -> np.ndarray:
    """``a`` rounded to ``dtype`` (round to nearest even; overflow gives +-inf), as float64."""
    name = tolerance(dtype).dtype
    if name == "bfloat16":
        import ml_dtypes

        npdt: Any = ml_dtypes.bfloat16
    else:
        npdt = np.dtype(name)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(a, dtype=np.float64).astype(npdt).astype(np.float64)


def _chan(a: np.ndarray, axis: int) -> np.ndarray:
    """(C, n) view of ``a`` with the channels on ``axis`` first."""
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def _unchan(a: np.ndarray, shape: Sequence[int], axis: int) -> np.ndarray:
    moved = list(shape)
    c = moved.pop(axis)
    return np.moveaxis(a.reshape([c] + moved), 0, axis)


def element_bounds(
    x: Any, *, expected: Mapping[str, Any], dtype: Any, training: bool, eps: float, axis: int,
    gamma: Any = None, beta: Any = None, running_mean: Any = None, running_var: Any = None, dy: Any = None,
    update_weights: tuple[float, float] = (1.0, 0.0), variance_correction: float = 1.0,
) -> dict[str, np.ndarray]:
    """The per-element bound of §8.4 for every output of one step, keyed like ``expected``.

    Args:
        x: the input (channels on ``axis``), already rounded to ``dtype``; float64 values.
        expected: the oracle's outputs on exactly these inputs: any of ``y`` (shaped like x),
            ``running_mean``, ``running_var``, ``dgamma``, ``dbeta`` ((C,)), ``dx`` (like x).
        dtype: T, the dtype the implementation is judged in (its compute dtype).
        training: batch statistics (True) or the running ones (False).
        eps: the eps of the step; ``axis``: the channel axis of x.
        gamma, beta: (C,) or None (no affine: scale 1, shift 0).
        running_mean, running_var: (C,) statistics before the step (eval normalizes with them).
        dy: upstream gradient shaped like x, or None.
        update_weights: ``(w_running, w_batch)`` of the running update (§3); variance_correction:
            the factor applied to the biased batch variance (§3.4).

    Returns:
        A dict of bound arrays shaped like the corresponding expected arrays (NaN where the channel
        is non-finite: NaN/Inf matching decides there).

    The terms, per element ``e`` of channel ``c`` (u_T: unit round-off of T; u_A: of the
    accumulation precision, float32 for float16/bfloat16; rho = max(1, ceil(log2 n)) the depth of a
    pairwise reduction over the n values of a channel; mu_c, s_c = sqrt(var_c + eps) the
    statistics the step normalizes with; g_c = |gamma_c|, b_c = |beta_c|)::

        D_c = min(rho * u_A * (max_i |x_ci| + |mu_c|) / s_c, CAP)     conditioning: shift of x_hat
        R_c = rho * u_A + C_ELEM D_c**2  (training) | u_A  (eval)      relative error of s_c
        y:       u_T |y_e| + u_A (g_c |xh_e| + b_c) + g_c (D_c + R_c |xh_e|)
        dx:      u_T(|dx_e| + C_T G_e) + (rho u_A + R_c) G_e + (g_c / s_c) D_c (a2_c + |xh_e| a1_c)
                 with G_e = (g_c / s_c)(|dy_e| + a1_c + |xh_e| a2_c), a1 = mean|dy|, a2 = mean|dy xh|
                 (eval: G_e = (g_c / s_c)|dy_e|, no D term)
        dgamma:  u_T(|dg_c| + C_T sum|dy xh|) + (rho u_A + R_c) sum|dy xh| + D_c sum|dy|
        dbeta:   u_T|db_c| + rho u_A sum|dy|
        running: u_T(|r'_c| + w_b |b_c|) + u_A (w_r |r_c| + w_b |b_c|) + w_b * (D_c s_c   for the mean
                                                              | v (rho u_A + u_A) + C_ELEM (D_c s_c)**2 for the var)

    The u_T terms are the output's own rounding to T (at most half a unit, counted as one) and, for
    dx, :data:`C_T` roundings of each of its three terms; every other term is multiplied by
    :data:`C_ELEM`; the smallest subnormal number of T (y, dx) or of the accumulation dtype (statistics,
    dgamma, dbeta) is added.
    """
    tol = tolerance(dtype)
    u_t = tol.u
    u_a = tolerance(accumulation_dtype(dtype)).u
    atol = _TINY[tol.dtype]  # y, dx are in T; statistics and parameter gradients are held in A
    atol_a = _TINY[tolerance(accumulation_dtype(dtype)).dtype]
    out: dict[str, np.ndarray] = {}
    with np.errstate(all="ignore"):
        x64 = np.asarray(x, dtype=np.float64)
        ax = axis % x64.ndim
        X = _chan(x64, ax)
        c, n = X.shape
        rho = float(max(1, int(np.ceil(np.log2(n))) if n > 1 else 1))
        g = np.ones(c) if gamma is None else np.abs(np.asarray(gamma, dtype=np.float64)).reshape(-1)
        b = np.zeros(c) if beta is None else np.abs(np.asarray(beta, dtype=np.float64)).reshape(-1)
        if training:
            mu = X.mean(axis=1) if n else np.full(c, np.nan)
            var = ((X - mu[:, None]) ** 2).mean(axis=1) if n else np.full(c, np.nan)
        else:
            mu = np.asarray(running_mean, dtype=np.float64).reshape(-1)
            var = np.asarray(running_var, dtype=np.float64).reshape(-1)
        s = np.sqrt(var + eps)
        peak = np.abs(X).max(axis=1) if n else np.zeros(c)
        d = np.minimum((rho if training else 1.0) * u_a * (peak + np.abs(mu)) / s, CAP)
        d = np.where(np.isnan(d), CAP, d)
        # The mean is off by up to C_ELEM * D * s, so var by (C_ELEM * D * s)**2: C_ELEM enters squared.
        r = rho * u_a + C_ELEM * d**2 if training else np.full(c, u_a)
        xh = (X - mu[:, None]) / s[:, None]
        axh = np.abs(xh)

        def fin(a: np.ndarray, floor: float = atol) -> np.ndarray:
            return floor + C_ELEM * a

        def mag(key: str) -> np.ndarray | None:
            e = expected.get(key)
            return None if e is None else np.abs(np.asarray(e, dtype=np.float64))

        if (ey := mag("y")) is not None:
            t = u_a * (g[:, None] * axh + b[:, None]) + g[:, None] * (d[:, None] + r[:, None] * axh)
            # One rounding to T, of y itself: §8.3 has y computed in A and rounded once. (A kernel
            # that also rounds g*xh or the shift to T would need 2-3 u_T, which is what a 1 % scale
            # error in bfloat16 is; it is not granted.)
            out["y"] = fin(_unchan(t, x64.shape, ax)) + u_t * ey
        if dy is not None:
            DY = _chan(np.asarray(dy, dtype=np.float64), ax)
            ady = np.abs(DY)
            a1 = ady.mean(axis=1)
            a2 = (ady * axh).mean(axis=1)
            gs = (g / s)[:, None]
            if training:
                big = gs * (ady + a1[:, None] + axh * a2[:, None])
                cond = gs * d[:, None] * (a2[:, None] + axh * a1[:, None])
            else:
                big = gs * ady
                cond = np.zeros_like(big)
            if (edx := mag("dx")) is not None:
                t = (rho * u_a + r[:, None]) * big + cond
                # C_T * u_t * big: each of dx's three terms may be rounded to T (autograd in T).
                out["dx"] = fin(_unchan(t, x64.shape, ax)) + u_t * (edx + C_T * _unchan(big, x64.shape, ax))
            if (edg := mag("dgamma")) is not None:
                # C_T * u_t * sum|dy xh|: the products dy * xh may be formed in T.
                sdx = (ady * axh).sum(axis=1)
                out["dgamma"] = fin((rho * u_a + r) * sdx + d * ady.sum(axis=1), atol_a) + u_t * (edg + C_T * sdx)
            if (edb := mag("dbeta")) is not None:
                out["dbeta"] = fin(rho * u_a * ady.sum(axis=1), atol_a) + u_t * edb
        w_r, w_b = (float(update_weights[0]), float(update_weights[1])) if training else (1.0, 0.0)
        if (erm := mag("running_mean")) is not None:
            rm0 = np.abs(np.asarray(running_mean, dtype=np.float64)).reshape(-1)
            t = u_a * (w_r * rm0 + w_b * np.abs(mu)) + w_b * d * s
            # u_t w_b |mu|: the batch statistic may be rounded to T once before the update (PyTorch does).
            out["running_mean"] = fin(t if training else np.zeros_like(erm), atol_a) + u_t * (erm + w_b * np.abs(mu))
        if (erv := mag("running_var")) is not None:
            rv0 = np.abs(np.asarray(running_var, dtype=np.float64)).reshape(-1)
            v = float(variance_correction) * var
            t = u_a * (w_r * rv0 + w_b * v) + w_b * (v * (rho + 1.0) * u_a
                                                       + float(variance_correction) * C_ELEM * (d * s) ** 2)
            out["running_var"] = fin(t if training else np.zeros_like(erv), atol_a) + u_t * (erv + w_b * np.abs(v))
    return out


def element_units(actual: Any, expected: Any, bound: Any, dtype: Any) -> float:
    """Worst ``|actual - expected| / bound`` over the elements (§8.4); ``inf`` on a structural mismatch.

    Both arrays are first rounded to ``dtype`` for the NaN/Inf rules only (§7.4, §8.4): NaN must
    occur exactly where the oracle has NaN, and an element whose oracle value overflows T must be
    the infinity of the same sign (a legitimate overflow is not an error, a finite value there
    is). Finite elements are compared unrounded against the bound. A shape mismatch is ``inf``.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return float("inf")
    a_t, e_t = round_to(a, dtype), round_to(e, dtype)
    nan_e, nan_a = np.isnan(e_t), np.isnan(a_t)
    if not np.array_equal(nan_e, nan_a):
        return float("inf")
    inf_e = np.isinf(e_t)
    if not np.array_equal(inf_e, np.isinf(a_t)) or not np.array_equal(e_t[inf_e], a_t[inf_e]):
        return float("inf")
    ok = ~(nan_e | inf_e)
    if not ok.any():
        return 0.0
    bnd = np.broadcast_to(np.asarray(bound, dtype=np.float64), e.shape)[ok]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.abs(a[ok] - e[ok]) / bnd
    ratio = np.where(a[ok] == e[ok], 0.0, ratio)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)  # a NaN bound (non-finite channel) with finite values
    return float(ratio.max())
