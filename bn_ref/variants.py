"""The BN variants practitioners train with, executable: NumPy float64, like :mod:`bn_ref.oracle`.

``docs/spec.md`` §13-§17 define them; each formula below cites its section. Every variant is
plain BN (§2-§5) under a :class:`~bn_ref.Convention` plus one :class:`Variant` record that says
what changes:

* Batch Renormalization (§13): ``Variant(renorm=True, rmax=..., dmax=...)``;
* ghost (virtual) batches (§14): ``Variant(ghost_batch_size=v)``;
* frozen BN (§15): ``Variant(frozen="statistics" | "all")``;
* no running statistics (§16.1): ``Variant(track_running_stats=False)``;
* precise BN (§16.2): :func:`precise_statistics`.

The modes matrix of §17 is :func:`mode` — what a step normalizes with and what it updates.

State recursion of Batch Renormalization (§13), with ``b`` the batch statistics and the convention's
update weights ``(w_r, w_b)`` of §3 for the inference pair and ``(v_r, v_b)`` from ``renorm_momentum``
for the correction pair::

    mu_k   = w_r mu_{k-1}  + w_b mean_B          (running_mean, §3)
    var_k  = w_r var_{k-1} + w_b c_n var_B       (running_var, §3.4)
    rmu_k  = v_r rmu_{k-1} + v_b mean_B          (renorm_mean)
    rvar_k = v_r rvar_{k-1} + v_b c_n var_B      (renorm_var; track="variance")
    rstd_k = v_r rstd_{k-1} + v_b sqrt(var_B + eps)   (track="stddev", tf-keras)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import _checks, oracle
from .conventions import Convention, ConventionLike, get_convention

__all__ = ["Variant", "VariantResult", "forward", "backward", "precise_statistics", "mode", "MODES"]

Frozen = Literal["no", "statistics", "all"]
GhostUpdate = Literal["sequential", "mean"]
RenormTrack = Literal["variance", "stddev"]


def _positive(name: str, value: object, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Variant.{name} must be a finite real number > 0{' or None' if optional else ''}; got {value!r}")


@dataclass(frozen=True)
class Variant:
    """What a BN variant changes, on top of a :class:`~bn_ref.Convention` (§13-§16).

    Fields:

    * ``renorm`` -- Batch Renormalization (§13). ``rmax``/``rmin`` clip ``r`` (``rmin`` defaults to
      ``1/rmax``, as in the paper), ``dmax`` clips ``|d|``; None means no clipping.
      ``renorm_momentum`` is the momentum of the correction pair *in the convention's spelling*
      (§3.5); None uses the convention's momentum, so one pair of moving averages serves both.
      ``renorm_track`` is what the correction pair averages: ``"variance"`` (bn-ref) or
      ``"stddev"`` (tf-keras's ``renorm_stddev``; §13.3 maps one to the other).
    * ``ghost_batch_size`` -- normalize sub-batches of this many samples along axis 0 (§14); the
      last one may be smaller. ``ghost_update``: ``"sequential"`` (one running update per sub-batch,
      in order; bn-ref) or ``"mean"`` (one update from the mean of the sub-batch statistics; tf-keras).
    * ``frozen`` -- ``"no"``; ``"statistics"``: training normalizes with the running statistics and
      never updates them, gamma and beta still learn; ``"all"``: also no gradient to gamma/beta (§15).
    * ``track_running_stats`` -- False: no running statistics; batch statistics in eval too (§16.1).
    """

    renorm: bool = False
    rmax: float | None = None
    rmin: float | None = None
    dmax: float | None = None
    renorm_momentum: float | None = None
    renorm_track: RenormTrack = "variance"
    ghost_batch_size: int | None = None
    ghost_update: GhostUpdate = "sequential"
    frozen: Frozen = "no"
    track_running_stats: bool = True

    def __post_init__(self) -> None:
        _checks.check_flag("Variant.renorm", self.renorm)
        _checks.check_flag("Variant.track_running_stats", self.track_running_stats)
        _positive("rmax", self.rmax)
        _positive("rmin", self.rmin)
        _positive("dmax", self.dmax)
        if self.rmax is not None and self.rmin is not None and self.rmin > self.rmax:
            raise ValueError(f"Variant.rmin must be <= rmax; got rmin={self.rmin!r}, rmax={self.rmax!r}")
        if self.rmax is not None and self.rmax < 1:
            raise ValueError(f"Variant.rmax must be >= 1 (r = 1 must stay reachable); got {self.rmax!r}")
        if self.renorm_momentum is not None and not (
            isinstance(self.renorm_momentum, numbers.Real) and 0 <= self.renorm_momentum <= 1
        ):
            raise ValueError(f"Variant.renorm_momentum must lie in [0, 1] or be None; got {self.renorm_momentum!r}")
        if self.renorm_track not in ("variance", "stddev"):
            raise ValueError(f"Variant.renorm_track must be 'variance' or 'stddev'; got {self.renorm_track!r}")
        if self.ghost_batch_size is not None and (
            not isinstance(self.ghost_batch_size, numbers.Integral) or isinstance(self.ghost_batch_size, bool)
            or self.ghost_batch_size < 1
        ):
            raise ValueError(f"Variant.ghost_batch_size must be an int >= 1 or None; got {self.ghost_batch_size!r}")
        if self.ghost_update not in ("sequential", "mean"):
            raise ValueError(f"Variant.ghost_update must be 'sequential' or 'mean'; got {self.ghost_update!r}")
        if self.frozen not in ("no", "statistics", "all"):
            raise ValueError(f"Variant.frozen must be 'no', 'statistics' or 'all'; got {self.frozen!r}")
        if self.renorm and (self.frozen != "no" or not self.track_running_stats):
            raise ValueError("Variant.renorm needs running statistics that update: frozen='no', track_running_stats=True")
        if self.ghost_batch_size is not None and self.renorm:
            raise ValueError("Variant: renorm with ghost batches is not specified (§14); choose one")
        if self.frozen != "no" and not self.track_running_stats:
            raise ValueError("Variant.frozen normalizes with running statistics, so it needs track_running_stats=True")
        if self.ghost_batch_size is not None and not self.track_running_stats:
            raise ValueError(
                "Variant: ghost batches without running statistics are not specified (§14, §16.1): "
                "eval would normalize the whole batch while training normalizes sub-batches; choose one"
            )

    @property
    def r_bounds(self) -> tuple[float, float]:
        """The interval ``r`` is clipped to (§13.1)."""
        hi = math.inf if self.rmax is None else float(self.rmax)
        lo = float(self.rmin) if self.rmin is not None else (1.0 / hi if self.rmax is not None else 0.0)
        return lo, hi


@dataclass(frozen=True)
class VariantResult:
    """One forward step (arrays float64; None where the variant keeps no such state).

    ``r``, ``d`` are the renorm corrections used (§13.1); ``renorm_mean``/``renorm_stat`` the
    correction pair after the step (``renorm_stat`` a variance or a stddev, per ``renorm_track``).
    """

    y: np.ndarray
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    count: int
    r: np.ndarray | None = None
    d: np.ndarray | None = None
    renorm_mean: np.ndarray | None = None
    renorm_stat: np.ndarray | None = None


MODES: tuple[tuple[bool, Frozen, bool, str, str, str], ...] = (
    # (training, frozen, track_running_stats, normalizes with, updates running stats, gradient to gamma/beta)
    (True, "no", True, "batch statistics", "yes", "yes; dx through the statistics (§5.1)"),
    (True, "no", False, "batch statistics", "none kept", "yes; dx through the statistics (§5.1)"),
    (True, "statistics", True, "running statistics", "no", "yes; dx with constant statistics (§5.2)"),
    (True, "all", True, "running statistics", "no", "no; dx with constant statistics (§5.2)"),
    (False, "no", True, "running statistics", "no", "yes; dx with constant statistics (§5.2)"),
    (False, "no", False, "batch statistics", "none kept", "yes; dx through the statistics (§5.1)"),
    (False, "statistics", True, "running statistics", "no", "yes; dx with constant statistics (§5.2)"),
    (False, "all", True, "running statistics", "no", "no; dx with constant statistics (§5.2)"),
)
"""The modes matrix of §17, one row per combination a layer can be in."""


def mode(training: bool, variant: Variant) -> tuple[str, str, str]:
    """``(normalizes with, updates running statistics, gradients)`` for a step (§17)."""
    for t, f, tr, norm, upd, grad in MODES:
        if t == bool(training) and f == variant.frozen and tr == variant.track_running_stats:
            return norm, upd, grad
    raise ValueError(f"no mode for training={training!r}, frozen={variant.frozen!r}, "
                     f"track_running_stats={variant.track_running_stats!r}")


def _renorm_weights(conv: Convention, variant: Variant, count: int) -> tuple[Any, Any]:
    """Update weights of the correction pair: §3's rule with ``renorm_momentum`` (§13.3)."""
    m = conv.momentum if variant.renorm_momentum is None else variant.renorm_momentum
    return dataclasses.replace(conv, momentum=m).update_weights(count)


def _chunks(n_batch: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n_batch)) for i in range(0, n_batch, size)]


def _stats(x: np.ndarray, lay: _checks.Layout) -> tuple[np.ndarray, np.ndarray]:
    """§2.1, two-pass in float64: the oracle's own rule."""
    mean, _, var = oracle._batch_stats(x, lay)
    return mean, var


def forward(
    x: Any,
    gamma: Any,
    beta: Any,
    running_mean: Any,
    running_var: Any,
    *,
    training: bool,
    convention: ConventionLike,
    variant: Variant = Variant(),
    axis: int | None = None,
    count: int = 0,
    renorm_mean: Any = None,
    renorm_stat: Any = None,
) -> VariantResult:
    """One forward step of a BN variant (§13-§16).

    Args:
        x: (N, C, ...) or (N, ..., C), rank >= 2.
        gamma, beta: (C,) or None.
        running_mean, running_var: (C,); None when ``variant.track_running_stats`` is False.
        renorm_mean, renorm_stat: (C,) correction pair for renorm (§13); None starts it from the
            running pair (the paper's single pair of moving averages).
        count: training steps (for a ghost batch, sub-batch updates) already taken.
    """
    training = _checks.check_flag("training", training)
    conv = get_convention(convention)
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a bn_ref.variants.Variant; got {type(variant).__name__}")
    x64 = np.asarray(x, dtype=np.float64)
    lay = _checks.layout(x64.shape, conv.feature_axis if axis is None else axis)
    if not variant.track_running_stats:
        if running_mean is not None or running_var is not None:
            raise ValueError("track_running_stats=False keeps no running statistics: pass running_mean=running_var=None")
        if conv.rejects_batch(lay.n, training=True):  # batch statistics in eval too (§16.1)
            _checks.check_batch(lay.n, x64.shape, conv, training=True)
        res = oracle.forward(x64, gamma, beta, None, None, training=True, convention=conv, axis=lay.axis, count=count)
        return VariantResult(res.y, None, None, count)

    if variant.frozen != "no" or not training:  # §15, §4
        res = oracle.forward(x64, gamma, beta, running_mean, running_var, training=False, convention=conv,
                             axis=lay.axis, count=count)
        return VariantResult(res.y, res.running_mean, res.running_var, count)

    if variant.ghost_batch_size is not None:
        return _ghost_forward(x64, gamma, beta, running_mean, running_var, conv, variant, lay, count)
    if variant.renorm:
        return _renorm_forward(x64, gamma, beta, running_mean, running_var, conv, variant, lay, count,
                               renorm_mean, renorm_stat)
    res = oracle.forward(x64, gamma, beta, running_mean, running_var, training=True, convention=conv,
                         axis=lay.axis, count=count)
    return VariantResult(res.y, res.running_mean, res.running_var, res.count)


def _ghost_forward(x64, gamma, beta, rm, rv, conv, variant, lay, count) -> VariantResult:
    """§14: each sub-batch normalized with its own statistics; running update per §14.2."""
    parts = _chunks(x64.shape[0], int(variant.ghost_batch_size))
    y = np.empty_like(x64)
    stats = []
    for sl in parts:
        xs = x64[sl]
        n_j = xs.size // xs.shape[lay.axis]
        _checks.check_batch(n_j, xs.shape, conv, training=True)
        res = oracle.forward(xs, gamma, beta, rm, rv, training=True, convention=conv, axis=lay.axis, count=count)
        y[sl] = res.y
        stats.append((res.batch_mean, res.batch_var, n_j))
        if variant.ghost_update == "sequential":  # §14.2: one update (and one step) per sub-batch
            rm, rv, count = res.running_mean, res.running_var, res.count
    if variant.ghost_update == "sequential":
        return VariantResult(y, rm, rv, count)
    # §14.3 (tf-keras): one update from the means of the sub-batch statistics.
    if rm is None:
        return VariantResult(y, None, None, count + 1)
    mean = np.mean([np.asarray(s[0]) for s in stats], axis=0)
    var_fed = np.mean([np.asarray(s[1]) * conv.variance_correction(s[2]) for s in stats], axis=0)
    w_r, w_b = conv.update_weights(count)
    rm64, rv64 = np.asarray(rm, np.float64), np.asarray(rv, np.float64)
    return VariantResult(y, w_r * rm64 + w_b * mean, w_r * rv64 + w_b * var_fed, count + 1)


def _renorm_forward(x64, gamma, beta, rm, rv, conv, variant, lay, count, renorm_mean, renorm_stat) -> VariantResult:
    """§13: y = gamma * (x_hat * r + d) + beta with r, d from the correction pair before the step."""
    if rm is None or rv is None:
        raise ValueError("Batch Renormalization needs running_mean and running_var (§13)")
    rm64, rv64 = np.asarray(rm, np.float64), np.asarray(rv, np.float64)
    eps = conv.eps
    if renorm_mean is None:
        renorm_mean = rm64
    if renorm_stat is None:
        renorm_stat = rv64 if variant.renorm_track == "variance" else np.sqrt(rv64 + eps)
    rmu, rstat = np.asarray(renorm_mean, np.float64), np.asarray(renorm_stat, np.float64)
    mean, var = _stats(x64, lay)
    std_b = np.sqrt(var + eps)  # §13.1
    # The correction pair's stddev; tf-keras floors it at sqrt(eps) (its variable starts at 0 when the
    # variance initializer is 0); under "variance" tracking sqrt(var + eps) >= sqrt(eps) already.
    sigma = np.sqrt(rstat + eps) if variant.renorm_track == "variance" else np.maximum(rstat, math.sqrt(eps))
    lo, hi = variant.r_bounds
    r = np.clip(std_b / sigma, lo, hi)
    d = (mean - rmu) / sigma
    if variant.dmax is not None:
        d = np.clip(d, -variant.dmax, variant.dmax)
    x_hat = (x64 - mean.reshape(lay.bshape)) / std_b.reshape(lay.bshape)
    z = x_hat * r.reshape(lay.bshape) + d.reshape(lay.bshape)
    y = z  # §2.3
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64).reshape(lay.bshape)
    if beta is not None:
        y = y + np.asarray(beta, np.float64).reshape(lay.bshape)
    w_r, w_b = conv.update_weights(count)  # §3
    c_n = conv.variance_correction(lay.n)  # §3.4
    new_rm, new_rv = w_r * rm64 + w_b * mean, w_r * rv64 + w_b * c_n * var
    v_r, v_b = _renorm_weights(conv, variant, count)
    new_rmu = v_r * rmu + v_b * mean
    new_rstat = v_r * rstat + v_b * (c_n * var if variant.renorm_track == "variance" else std_b)
    return VariantResult(y, new_rm, new_rv, count + 1, r, d, new_rmu, new_rstat)


def backward(
    dy: Any,
    x: Any,
    gamma: Any,
    running_mean: Any = None,
    running_var: Any = None,
    *,
    training: bool,
    convention: ConventionLike,
    variant: Variant = Variant(),
    axis: int | None = None,
    r: Any = None,
    d: Any = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`forward` (§13.2, §14.1, §15, §16.1).

    Renorm needs the ``r`` and ``d`` of the forward step (they are constants of the step, §13.2).
    ``dgamma`` and ``dbeta`` are None under ``frozen="all"`` (no gradient, §15).
    """
    training = _checks.check_flag("training", training)
    conv = get_convention(convention)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    lay = _checks.layout(x64.shape, conv.feature_axis if axis is None else axis)
    if dy64.shape != x64.shape:
        raise ValueError(f"dy must have the shape of x, {x64.shape}; got {dy64.shape}")
    if not variant.track_running_stats:
        return oracle.backward(dy64, x64, gamma, training=True, convention=conv, axis=lay.axis)
    if variant.frozen != "no" or not training:
        dx_e, dg_e, db_e = oracle.backward(dy64, x64, gamma, training=False, convention=conv, axis=lay.axis,
                                           running_mean=running_mean, running_var=running_var)
        if variant.frozen == "all":
            return dx_e, None, None
        return dx_e, dg_e, db_e
    if variant.ghost_batch_size is not None:  # §14.1: each sub-batch is an independent BN
        dx = np.empty_like(x64)
        dg: np.ndarray | None = None
        db: np.ndarray | None = None
        for sl in _chunks(x64.shape[0], int(variant.ghost_batch_size)):
            dxs, dgs, dbs = oracle.backward(dy64[sl], x64[sl], gamma, training=True, convention=conv, axis=lay.axis)
            dx[sl] = dxs
            db = dbs if db is None else db + dbs
            dg = dgs if dg is None or dgs is None else dg + dgs
        return dx, dg, db
    if variant.renorm:
        if r is None or d is None:
            raise ValueError("renorm backward needs the r and d of the forward step (§13.2)")
        r64, d64 = np.asarray(r, np.float64), np.asarray(d, np.float64)
        g = np.ones(lay.c) if gamma is None else np.asarray(gamma, np.float64)
        # §13.2: r and d are constants, so the layer is BN with scale gamma * r and shift gamma * d + beta.
        dx, dg_eff, db = oracle.backward(dy64, x64, g * r64, training=True, convention=conv, axis=lay.axis)
        assert dg_eff is not None
        mean, var = _stats(x64, lay)
        x_hat = (x64 - mean.reshape(lay.bshape)) / np.sqrt(var + conv.eps).reshape(lay.bshape)
        dgamma = (dy64 * (x_hat * r64.reshape(lay.bshape) + d64.reshape(lay.bshape))).sum(axis=lay.reduce)
        return dx, (None if gamma is None else dgamma), db
    return oracle.backward(dy64, x64, gamma, training=True, convention=conv, axis=lay.axis)


def precise_statistics(
    batches: list[Any],
    *,
    convention: ConventionLike,
    axis: int | None = None,
    pooled: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Population statistics over K batches after training (§16.2).

    ``pooled=False`` (fvcore's precise BN): the cumulative average of §3.3 — the mean of the K batch
    means and of the K estimator-corrected batch variances, as ``momentum=None`` would store them.
    ``pooled=True``: the exact mean and variance of all values of all K batches (the concatenation),
    with the convention's estimator applied to the total count (§11.1's merge).
    """
    conv = dataclasses.replace(get_convention(convention), momentum=None)
    if not batches:
        raise ValueError("precise_statistics needs at least one batch; got none")
    first = np.asarray(batches[0], np.float64)
    c = first.shape[_checks.layout(first.shape, conv.feature_axis if axis is None else axis).axis]
    rm: Any = np.zeros(c)
    rv: Any = np.ones(c)
    if not pooled:
        for k, b in enumerate(batches):
            res = oracle.forward(b, None, None, rm, rv, training=True, convention=conv, axis=axis, count=k)
            rm, rv = res.running_mean, res.running_var
        return rm, rv
    lay = _checks.layout(first.shape, conv.feature_axis if axis is None else axis)
    flat = [np.moveaxis(np.asarray(b, np.float64), lay.axis, -1).reshape(-1, c) for b in batches]
    allv = np.concatenate(flat, axis=0)
    n = allv.shape[0]
    _checks.check_batch(n, allv.shape, conv, training=True)
    mean = allv.mean(axis=0)
    var = np.mean((allv - mean) ** 2, axis=0)
    return mean, var * conv.variance_correction(n)
