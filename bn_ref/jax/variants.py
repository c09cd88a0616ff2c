"""The BN variants of ``docs/spec.md`` §13-§16 on the JAX backend, as one pure function.

:func:`batch_norm_variant` does for a :class:`bn_ref.variants.Variant` what
:func:`bn_ref.jax.batch_norm` does for plain BN, built from the backend's public helpers
(:func:`~bn_ref.jax.batch_stats`, :func:`~bn_ref.jax.normalize`, :func:`~bn_ref.jax.update_running`)
so the numerics are those of the plain layer (two-pass statistics, at least float32, §8).
``bn_ref.variants`` is its NumPy reference. Pure: usable under ``jax.jit`` (with ``training`` and
``variant`` static), ``jax.grad`` and ``jax.vmap``.

Shapes: ``x`` (N, C, ...) or (N, ..., C); every per-channel array (C,).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from .. import _checks
from ..conventions import ConventionLike, get_convention
from ..variants import Variant
from ._core import batch_norm, batch_stats, normalize, update_running

__all__ = ["RenormState", "VariantOutput", "batch_norm_variant"]

Array = Any


class RenormState(NamedTuple):
    """The correction pair of Batch Renormalization (§13.3): ``stat`` is a variance
    (``renorm_track="variance"``) or a stddev (``"stddev"``), both (C,)."""

    mean: Array
    stat: Array

    @classmethod
    def from_running(cls, running_mean: Array, running_var: Array, variant: Variant, eps: float) -> RenormState:
        rv = jnp.asarray(running_var)
        return cls(jnp.asarray(running_mean), rv if variant.renorm_track == "variance" else jnp.sqrt(rv + eps))


class VariantOutput(NamedTuple):
    """``y`` and the state after the step (None where the variant keeps none)."""

    y: Array
    running_mean: Array | None
    running_var: Array | None
    count: Any
    renorm: RenormState | None


def _chunks(n_batch: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n_batch)) for i in range(0, n_batch, size)]


def batch_norm_variant(
    x: Array,
    gamma: Array | None,
    beta: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    *,
    training: bool,
    variant: Variant,
    convention: ConventionLike = "flax",
    count: Any = 0,
    renorm: RenormState | None = None,
) -> VariantOutput:
    """One step of a BN variant (§13-§16); see :func:`bn_ref.torch.variants.batch_norm_variant`
    for the rules, which are the same. Returns a :class:`VariantOutput`."""
    training = _checks.check_flag("training", training)
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a bn_ref.variants.Variant; got {type(variant).__name__}")
    conv = get_convention(convention)
    x = jnp.asarray(x)
    if not variant.track_running_stats:  # §16.1
        if running_mean is not None or running_var is not None:
            raise ValueError("track_running_stats=False keeps no running statistics: pass running_mean=running_var=None")
        y = batch_norm(x, gamma, beta, None, None, training=True, convention=conv)[0]
        return VariantOutput(y, None, None, count, None)
    if variant.frozen != "no" or not training:  # §15, §4
        if variant.frozen == "all":
            gamma = None if gamma is None else lax.stop_gradient(jnp.asarray(gamma))
            beta = None if beta is None else lax.stop_gradient(jnp.asarray(beta))
        y, rm, rv, _ = batch_norm(x, gamma, beta, running_mean, running_var, training=False, convention=conv)
        return VariantOutput(y, rm, rv, count, renorm)
    if variant.ghost_batch_size is not None:
        return _ghost(x, gamma, beta, running_mean, running_var, conv, variant, count)
    if variant.renorm:
        if renorm is None or running_mean is None or running_var is None:
            raise ValueError("Batch Renormalization needs running_mean, running_var and renorm (a RenormState, §13.3)")
        return _renorm(x, gamma, beta, running_mean, running_var, conv, variant, count, renorm)
    y, rm, rv, c = batch_norm(x, gamma, beta, running_mean, running_var, training=True, convention=conv, count=count)
    return VariantOutput(y, rm, rv, c, None)


def _ghost(x, gamma, beta, rm, rv, conv, variant, count) -> VariantOutput:
    lay = _checks.layout(x.shape, conv.feature_axis)
    parts = _chunks(x.shape[0], int(variant.ghost_batch_size))
    for sl in parts:  # every sub-batch is checked before anything is computed (§7.5)
        sub_shape = (len(range(*sl.indices(x.shape[0]))),) + tuple(x.shape[1:])
        _checks.check_batch(math.prod(sub_shape) // sub_shape[lay.axis], sub_shape, conv, training=True)
    ys = []
    if variant.ghost_update == "sequential" or rm is None:  # §14.2
        for sl in parts:
            y, rm, rv, count = batch_norm(x[sl], gamma, beta, rm, rv, training=True, convention=conv, count=count)
            ys.append(y)
        return VariantOutput(jnp.concatenate(ys, axis=0), rm, rv, count, None)
    means, fed = [], []  # §14.3
    for sl in parts:
        sub = x[sl]
        ys.append(batch_norm(sub, gamma, beta, None, None, training=True, convention=conv)[0])
        mean, var, n_j = batch_stats(lax.stop_gradient(sub), axis=lay.axis)
        means.append(mean)
        fed.append(var * conv.variance_correction(int(n_j)))
    # n = 1: the variances fed are already estimator-corrected per sub-batch (factor 1, §3.4).
    new_rm, new_rv = update_running(jnp.asarray(rm), jnp.asarray(rv), jnp.mean(jnp.stack(means), 0),
                                    jnp.mean(jnp.stack(fed), 0), 1, convention=conv, count=count)
    return VariantOutput(jnp.concatenate(ys, axis=0), new_rm, new_rv, count + 1, None)


def _renorm(x, gamma, beta, rm, rv, conv, variant, count, state: RenormState) -> VariantOutput:
    lay = _checks.layout(x.shape, conv.feature_axis)
    _checks.check_batch(lay.n, tuple(x.shape), conv, training=True)
    eps = conv.eps
    mean, var, n = batch_stats(x, axis=lay.axis)  # §2.1, differentiable
    std_b = jnp.sqrt(lax.stop_gradient(var) + eps)
    stat = jnp.asarray(state.stat).astype(std_b.dtype)
    sigma = jnp.sqrt(stat + eps) if variant.renorm_track == "variance" else jnp.maximum(stat, math.sqrt(eps))
    lo, hi = variant.r_bounds
    r = jnp.clip(std_b / sigma, lo, hi if math.isfinite(hi) else None)  # §13.1
    d = (lax.stop_gradient(mean) - jnp.asarray(state.mean).astype(std_b.dtype)) / sigma
    if variant.dmax is not None:
        d = jnp.clip(d, -variant.dmax, variant.dmax)
    r, d = lax.stop_gradient(r), lax.stop_gradient(d)  # §13.2
    g = jnp.ones_like(r) if gamma is None else jnp.asarray(gamma).astype(r.dtype)
    b = jnp.zeros_like(r) if beta is None else jnp.asarray(beta).astype(r.dtype)
    y = normalize(x, mean, var, g * r, g * d + b, eps=eps, axis=lay.axis)
    new_rm, new_rv = update_running(jnp.asarray(rm), jnp.asarray(rv), mean, var, n, convention=conv, count=count)
    m = conv.momentum if variant.renorm_momentum is None else variant.renorm_momentum
    w_r, w_b = dataclasses.replace(conv, momentum=m).update_weights(count)  # §13.3
    batch_stat = lax.stop_gradient(var) * conv.variance_correction(n) if variant.renorm_track == "variance" else std_b
    new_state = RenormState(w_r * jnp.asarray(state.mean) + w_b * lax.stop_gradient(mean),
                            w_r * stat + w_b * batch_stat)
    return VariantOutput(y, new_rm, new_rv, count + 1, new_state)
