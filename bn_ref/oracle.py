"""The executable specification of Batch Normalization: pure NumPy, float64 throughout.

Every backend and every third-party implementation is checked against these two functions. They
follow ``docs/spec.md`` line by line; each formula cites its section. Inputs of any floating dtype
(float16, bfloat16 via ``ml_dtypes``, float32, float64) are converted to float64 first, so the
oracle is exact up to float64 round-off on the values it is given.

Shapes: ``x`` is (N, C, ...) or (N, ..., C) -- any rank >= 2, feature axis from the convention or
``axis``; every per-channel array (gamma, beta, running statistics) is (C,).

State recursion of the running statistics (§3), with ``b`` the batch statistic and ``k`` the
training-step number (``count + 1``)::

    momentum_on="batch":    r_k = (1 - m) * r_{k-1} + m * b_k
    momentum_on="running":  r_k = m * r_{k-1} + (1 - m) * b_k
    momentum=None:          r_k = (1 - 1/k) * r_{k-1} + (1/k) * b_k      (= mean of b_1..b_k)

and the variance fed to it is ``b = var_B * n / (n - 1)`` for ``running_var="unbiased"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks
from .conventions import Convention, ConventionLike, get_convention

__all__ = ["ForwardResult", "forward", "backward", "normalized", "condition_number"]


@dataclass(frozen=True)
class ForwardResult:
    """What one forward call computes (all arrays float64).

    Attributes:
        y: the output, shaped like ``x``.
        batch_mean, batch_var: (C,) batch mean and *biased* batch variance (§2.1); None in eval.
        running_mean, running_var: (C,) running statistics after the call (§3); unchanged in eval;
            None when none were given.
        count: training steps taken after the call (``count + 1`` in training).
    """

    y: np.ndarray
    batch_mean: np.ndarray | None
    batch_var: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    count: int


def _as_float64(name: str, a: Any, *, optional: bool = False) -> np.ndarray | None:
    if a is None:
        if optional:
            return None
        raise TypeError(f"{name} is required; got None")
    arr = np.asarray(a)
    _checks.check_float_dtype(name, arr.dtype.name)
    return arr.astype(np.float64)


@dataclass(frozen=True)
class _Prepared:
    """Validated float64 inputs: the convention, x, its layout and the per-channel arrays."""

    conv: Convention
    x: np.ndarray
    lay: _checks.Layout
    params: dict[str, np.ndarray | None]


def _prepare(x: Any, params: dict[str, Any], axis: int | None, convention: ConventionLike) -> _Prepared:
    """Validate and convert to float64 (§1, §6, §8.3)."""
    conv = get_convention(convention)
    x64 = _as_float64("x", x)
    assert x64 is not None
    lay = _checks.layout(x64.shape, conv.feature_axis if axis is None else axis)
    out: dict[str, np.ndarray | None] = {}
    for key, value in params.items():
        arr = _as_float64(key, value, optional=True)
        _checks.check_per_channel(key, None if arr is None else arr.shape, lay.c, lay.axis, x64.shape)
        out[key] = arr
    return _Prepared(conv, x64, lay, out)


def _batch_stats(x64: np.ndarray, lay: _checks.Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§2.1: two-pass mean and biased variance per channel; also the centred input."""
    mean = x64.mean(axis=lay.reduce)
    centred = x64 - mean.reshape(lay.bshape)
    var = np.mean(centred * centred, axis=lay.reduce)
    return mean, centred, var


def forward(
    x: Any,
    gamma: Any,
    beta: Any,
    running_mean: Any,
    running_var: Any,
    *,
    training: bool,
    convention: ConventionLike,
    axis: int | None = None,
    count: int = 0,
) -> ForwardResult:
    """Batch Normalization forward (``docs/spec.md`` §2 training, §3 running update, §4 eval).

    Args:
        x: (N, C, ...) or (N, ..., C) floating array, rank >= 2.
        gamma, beta: (C,) scale and shift, or None (no scale / no shift).
        running_mean, running_var: (C,) running statistics. Required in eval; in training they
            may be None (no running statistics are tracked).
        training: True normalizes with batch statistics and updates the running ones; False
            normalizes with the running statistics.
        convention: a preset name or a :class:`~bn_ref.Convention`.
        axis: the feature axis; None means ``convention.feature_axis``.
        count: training steps already taken (used by ``momentum=None``, §3.3).

    Returns:
        A :class:`ForwardResult`.

    Raises:
        ValueError: wrong rank, a per-channel array not shaped (C,), empty batch or n = 1 under
            ``single_value="error"`` in training, missing running statistics in eval.
        TypeError: non-floating dtypes, non-bool ``training``, unknown convention type.
    """
    training = _checks.check_flag("training", training)
    count = _checks.check_count(count)
    prep = _prepare(
        x,
        {"gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var},
        axis,
        convention,
    )
    conv, x64, lay, p = prep.conv, prep.x, prep.lay, prep.params
    n, bshape = lay.n, lay.bshape
    rm, rv = p["running_mean"], p["running_var"]
    _checks.check_running_pair(rm is not None, rv is not None, training=training)
    _checks.check_batch(n, x64.shape, conv, training=training)

    new_rm: np.ndarray | None
    new_rv: np.ndarray | None
    batch_mean: np.ndarray | None
    batch_var: np.ndarray | None
    if training:
        mean, centred, var = _batch_stats(x64, lay)  # §2.1
        inv_std = 1.0 / np.sqrt(var + conv.eps)  # §2.2
        x_hat = centred * inv_std.reshape(bshape)
        if rm is not None:
            w_r, w_b = conv.update_weights(count)  # §3.1-§3.3
            new_rm = w_r * rm + w_b * mean
            new_rv = w_r * rv + w_b * (var * conv.variance_correction(n))  # §3.4
        else:
            new_rm, new_rv = None, None
        batch_mean, batch_var, new_count = mean, var, count + 1
    else:
        assert rm is not None and rv is not None
        x_hat = (x64 - rm.reshape(bshape)) / np.sqrt(rv + conv.eps).reshape(bshape)  # §4
        new_rm, new_rv = rm.copy(), rv.copy()
        batch_mean = batch_var = None
        new_count = count

    y = _affine(x_hat, p["gamma"], p["beta"], bshape)  # §2.3
    return ForwardResult(y, batch_mean, batch_var, new_rm, new_rv, new_count)


def _affine(x_hat: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None,
            bshape: tuple[int, ...]) -> np.ndarray:
    """§2.3: y = gamma * x_hat + beta (either term optional)."""
    y = x_hat
    if gamma is not None:
        y = y * gamma.reshape(bshape)
    if beta is not None:
        y = y + beta.reshape(bshape)
    return y


def backward(
    dy: Any,
    x: Any,
    gamma: Any,
    *,
    training: bool,
    convention: ConventionLike,
    axis: int | None = None,
    running_mean: Any = None,
    running_var: Any = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Closed-form gradients of :func:`forward` (``docs/spec.md`` §5).

    Training (§5.1), with g = gamma (1 when None), x_hat and inv_std of the batch, and sums and
    means over the reduced axes::

        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        dx     = g * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))

    Eval (§5.2): the running statistics are constants::

        dx = g * dy / sqrt(running_var + eps),   dgamma = sum(dy * x_hat_running),  dbeta = sum(dy)

    Returns:
        ``(dx, dgamma, dbeta)``: dx shaped like x; dgamma (C,) or None when ``gamma`` is None;
        dbeta (C,), the gradient for a shift whether or not the layer has one.
    """
    training = _checks.check_flag("training", training)
    prep = _prepare(x, {"gamma": gamma, "running_mean": running_mean, "running_var": running_var}, axis, convention)
    conv, x64, lay, p = prep.conv, prep.x, prep.lay, prep.params
    n, bshape, red = lay.n, lay.bshape, lay.reduce
    dy64 = _as_float64("dy", dy)
    assert dy64 is not None
    if dy64.shape != x64.shape:
        raise ValueError(f"dy must have the shape of x, {tuple(x64.shape)}; got {tuple(dy64.shape)}")
    _checks.check_batch(n, x64.shape, conv, training=training)
    g = p["gamma"]
    g_b = np.ones(bshape) if g is None else g.reshape(bshape)

    dbeta = dy64.sum(axis=red)
    if training:
        _, centred, var = _batch_stats(x64, lay)
        inv_std = (1.0 / np.sqrt(var + conv.eps)).reshape(bshape)
        x_hat = centred * inv_std
        dgamma = (dy64 * x_hat).sum(axis=red)
        # §5.1: mean(dy) = dbeta / n and mean(dy * x_hat) = dgamma / n per channel.
        dx = g_b * inv_std * (dy64 - (dbeta / n).reshape(bshape) - x_hat * (dgamma / n).reshape(bshape))
    else:
        rm, rv = p["running_mean"], p["running_var"]
        _checks.check_running_pair(rm is not None, rv is not None, training=False)
        assert rm is not None and rv is not None
        inv_std = (1.0 / np.sqrt(rv + conv.eps)).reshape(bshape)
        x_hat = (x64 - rm.reshape(bshape)) * inv_std
        dgamma = (dy64 * x_hat).sum(axis=red)
        dx = g_b * inv_std * dy64  # §5.2
    return dx, (None if g is None else dgamma), dbeta


def normalized(x: Any, *, convention: ConventionLike, axis: int | None = None) -> np.ndarray:
    """x_hat of a training step (§2.2), float64: handy for invariance checks."""
    prep = _prepare(x, {}, axis, convention)
    _, centred, var = _batch_stats(prep.x, prep.lay)
    return centred / np.sqrt(var + prep.conv.eps).reshape(prep.lay.bshape)


def condition_number(x: Any, *, convention: ConventionLike, axis: int | None = None) -> float:
    """kappa = max over channels of max|x| / sqrt(var_B + eps), at least 1 (§8.4).

    It measures how far the data sit from zero in units of their spread: the factor by which
    rounding x (and its mean) to a working precision is amplified in x_hat. Tolerances for
    low-precision comparisons scale with it.
    """
    prep = _prepare(x, {}, axis, convention)
    conv, x64, red = prep.conv, prep.x, prep.lay.reduce
    if prep.lay.n == 0 or not np.isfinite(x64).any():
        return 1.0
    with np.errstate(invalid="ignore"):  # NaN/Inf inputs give NaN statistics, dropped below
        _, _, var = _batch_stats(x64, prep.lay)
        peak = np.nanmax(np.where(np.isfinite(x64), np.abs(x64), np.nan), axis=red)
        kappa = peak / np.sqrt(var + conv.eps)
    kappa = kappa[np.isfinite(kappa)]
    return float(max(1.0, kappa.max())) if kappa.size else 1.0
