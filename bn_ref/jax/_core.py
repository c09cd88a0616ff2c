"""The pure functional core of bn-ref's JAX backend (``docs/spec.md`` §2-§8, §11).

Everything here is a pure function of its arguments: no state, no PRNG, no Python side effects
(apart from the warning ``use_fast_variance=True`` gives at trace time),
so it composes with ``jax.jit``, ``jax.vmap``, ``jax.grad`` and the collectives of
``jax.shard_map``/``jax.pmap``. The Flax layers (:mod:`bn_ref.flax`) are thin shells around
:func:`batch_norm`, so the linen and NNX layers compute bit-for-bit the same thing.

Shapes: ``x`` is (N, C, ...) or (N, ..., C), rank >= 2, with the feature axis from the convention
or ``axis``; every per-channel array is (C,). ``n`` is the number of values reduced per channel
(``N * prod(spatial)``, summed over devices under ``axis_name``, unmasked values only under ``mask``).

Validation runs at trace time, from shapes and dtypes, with the shared :mod:`bn_ref._checks`, so
a bad call fails before anything is computed or updated (§7.5).
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from .. import _checks
from ..conventions import DEFAULT, Convention, ConventionLike, resolve

__all__ = [
    "BNState",
    "init",
    "batch_norm",
    "batch_stats",
    "normalize",
    "update_running",
    "stats_dtype",
]

Array = jax.Array


# -- dtypes -------------------------------------------------------------------------------------


def stats_dtype(dtype: Any) -> jnp.dtype:
    """The dtype batch statistics are computed in for inputs of ``dtype`` (§8.3).

    At least float32: float16 and bfloat16 inputs are reduced in float32; float64 (under
    ``jax_enable_x64``) stays float64.
    """
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def _group_size(axis_name: Any, axis_index_groups: Any) -> int | None:
    """Number of devices a collective over ``axis_name`` (and groups) combines, when static."""
    if axis_name is None:
        return 1
    if axis_index_groups is not None:
        return len(axis_index_groups[0])
    try:
        return int(lax.psum(1, axis_name))
    except Exception:  # pragma: no cover - a traced axis size: the static check is skipped
        return None


# -- statistics ---------------------------------------------------------------------------------


def batch_stats(
    x: Array,
    *,
    axis: int = -1,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: Array | None = None,
    dtype: Any = None,
    use_fast_variance: bool = False,
) -> tuple[Array, Array, Any]:
    """Batch mean and biased batch variance per channel, by two passes (§2.1, §8.1, §11).

    Args:
        x: (N, C, ...) or (N, ..., C) floating array.
        axis: the feature axis.
        axis_name: a named axis of ``shard_map``/``pmap``; the statistics are then those of the
            global batch (the concatenation of every device's batch), computed exactly (§11):
            one ``psum`` of the per-device (count, sum) gives the global mean, a second ``psum``
            of the per-device sum of squared deviations *about that global mean* gives the
            global variance. Devices with unequal numbers of real samples are weighted by their
            counts, so the result equals single-device BN on the global batch.
        axis_index_groups: optional sub-groups of ``axis_name`` (as in ``lax.psum``).
        mask: optional bool array, (N,) or broadcastable to ``x`` (see :func:`batch_norm`);
            False marks a value that contributes nothing. Each channel is reduced over its own
            unmasked values.
        dtype: minimal dtype of the statistics; they are at least float32 (§8.3).
        use_fast_variance: compute the variance as ``max(0, E[x^2] - E[x]^2)`` in one pass, as
            Flax does by default. This departs from the spec (§8.2); False is the two-pass rule.

    Returns:
        ``(mean, var, n)``: (C,) arrays in the statistics dtype, and the number of values
        reduced per channel -- a Python int when it is static (no mask), else an int32 array:
        a scalar without a mask, (C,) with one (each channel's own count).

    The variance is never formed as E[x^2] - E[x]^2 (§8.2) unless ``use_fast_variance``: the
    mean is computed first and the variance is the mean of squared deviations from it.
    """
    lay = _checks.layout(x.shape, axis)
    red, bshape = lay.reduce, lay.bshape
    sd = stats_dtype(x.dtype if dtype is None else jnp.promote_types(x.dtype, dtype))
    xs = x.astype(sd)
    m = _check_mask(mask, x.shape)

    if m is None and axis_name is None and not use_fast_variance:
        # §2.1 / §8.1: mean first, then the mean of squared deviations from it.
        mean = jnp.mean(xs, axis=red)
        centred = xs - mean.reshape(bshape)
        var = jnp.mean(centred * centred, axis=red)
        return mean, var, lay.n

    if m is not None:
        # Masked values are replaced by 0 before any arithmetic, so NaN/Inf padding cannot leak
        # into the statistics or (through 0 * NaN) into gradients.
        xs = jnp.where(m, xs, jnp.zeros((), sd))
        n = jnp.sum(jnp.broadcast_to(m, x.shape), axis=red, dtype=jnp.int32)  # (C,), §11.5
    else:
        n = jnp.asarray(lay.n, jnp.int32)
    total = jnp.sum(xs, axis=red)
    if use_fast_variance:
        # Flax's one-pass formula (departs from §8.2): E[x^2] - E[x]^2, clipped at 0.
        total2 = jnp.sum(xs * xs, axis=red)
        if axis_name is not None:
            n, total, total2 = lax.psum((n, total, total2), axis_name, axis_index_groups=axis_index_groups)
        nf = n.astype(sd)
        mean = total / nf
        var = jnp.maximum(total2 / nf - mean * mean, jnp.zeros((), sd))
    else:
        if axis_name is not None:
            # §11: count-weighted global mean = (sum over devices of sums) / (sum of counts).
            n, total = lax.psum((n, total), axis_name, axis_index_groups=axis_index_groups)
        mean = total / n.astype(sd)
        centred = xs - mean.reshape(bshape)
        sq = centred * centred
        if m is not None:
            sq = jnp.where(m, sq, jnp.zeros((), sd))
        m2 = jnp.sum(sq, axis=red)
        if axis_name is not None:
            # §11: squared deviations about the *global* mean add up exactly across devices.
            m2 = lax.psum(m2, axis_name, axis_index_groups=axis_index_groups)
        var = m2 / n.astype(sd)
    if m is None:
        group = _group_size(axis_name, axis_index_groups)
        if group is not None:
            n = lay.n * group  # static global n
    return mean, var, n


def normalize(
    x: Array,
    mean: Array,
    var: Array,
    gamma: Array | None,
    beta: Array | None,
    *,
    eps: float,
    axis: int = -1,
    dtype: Any = None,
) -> Array:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel (§2.2, §2.3, §4).

    Args:
        x: (N, C, ...) or (N, ..., C).
        mean, var: (C,) statistics: the batch's in training (§2.2), the running ones in eval (§4).
        gamma, beta: (C,) scale and shift, or None.
        eps: added to the variance inside the square root.
        axis: the feature axis.
        dtype: dtype of the result; None means ``x.dtype``.

    The arithmetic runs in the promoted dtype of the statistics, the parameters and float32
    (so float16/bfloat16 inputs are normalized in float32) and the result is rounded once.
    """
    ax = _checks.normalize_axis(x.ndim, axis)
    bshape = _checks.broadcast_shape(x.ndim, ax, x.shape[ax])
    parts = [stats_dtype(x.dtype), mean.dtype, var.dtype]
    parts += [a.dtype for a in (gamma, beta) if a is not None]
    cd = jnp.result_type(*parts)
    out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    # §2.2. Differentiating this rsqrt forms (var + eps)^(-3/2), which underflows in float32 once
    # var > ~1e25; batch_norm's training path therefore differentiates through _train_forward's
    # closed-form tangent (§5.1) instead, and only the running statistics of eval (§4) reach here
    # under autodiff.
    mul = lax.rsqrt(var.astype(cd) + eps)
    if gamma is not None:
        mul = mul * gamma.astype(cd)  # §2.3
    y = (x.astype(cd) - mean.astype(cd).reshape(bshape)) * mul.reshape(bshape)
    if beta is not None:
        y = y + beta.astype(cd).reshape(bshape)  # §2.3
    return y.astype(out_dtype)


def update_running(
    running_mean: Array,
    running_var: Array,
    mean: Array,
    var: Array,
    n: Any,
    *,
    convention: Convention,
    count: Any = 0,
) -> tuple[Array, Array]:
    """One training step of the running statistics (§3).

    With ``(w_r, w_b) = convention.update_weights(count)`` (§3.1 momentum on the batch term,
    §3.2 on the running term, §3.3 cumulative average for ``momentum=None``)::

        running_mean <- w_r * running_mean + w_b * mean
        running_var  <- w_r * running_var  + w_b * var * convention.variance_correction(n)   # §3.4

    ``mean``/``var`` are the biased batch statistics (C,); ``n`` the number of values they
    reduce (global under cross-device statistics, §11). No gradient flows from the update into
    the batch statistics. Results keep the running statistics' dtypes.
    """
    mean = lax.stop_gradient(mean)
    var = lax.stop_gradient(var)
    w_r, w_b = convention.update_weights(count)
    if not isinstance(n, numbers.Real):
        # An array n (masked or cross-device): n / (n - 1) in the statistics' dtype, not in the
        # float32 that JAX's int32 division would give.
        n = jnp.asarray(n).astype(var.dtype)
    corr = convention.variance_correction(n)

    def blend(r: Array, b: Array) -> Array:
        ud = jnp.promote_types(r.dtype, b.dtype)
        wr = w_r if isinstance(w_r, numbers.Real) else jnp.asarray(w_r, ud)
        wb = w_b if isinstance(w_b, numbers.Real) else jnp.asarray(w_b, ud)
        return (wr * r.astype(ud) + wb * b.astype(ud)).astype(r.dtype)

    if not isinstance(corr, numbers.Real):
        corr = jnp.asarray(corr, var.dtype)
    var_in = var if (isinstance(corr, numbers.Real) and corr == 1.0) else var * corr
    return blend(running_mean, mean), blend(running_var, var_in)


# -- the training forward with its closed-form tangent (§5.1) ------------------------------------


class _TrainConfig(NamedTuple):
    """The static (hashable) arguments of :func:`_train_forward`."""

    eps: float
    axis: int
    axis_name: Any
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    dtype: Any


def _count(x_shape: Sequence[int], m: Array | None, axis: int, axis_name: Any, axis_index_groups: Any) -> Any:
    """n, the number of values each channel's statistics reduce: what :func:`batch_stats` returns
    as its third result (a Python int when static, else int32: a scalar, or (C,) with a mask)."""
    lay = _checks.layout(x_shape, axis)
    if m is None:
        group = _group_size(axis_name, axis_index_groups)
        if group is not None:
            return lay.n * group
        n = jnp.asarray(lay.n, jnp.int32)
    else:
        n = jnp.sum(jnp.broadcast_to(m, tuple(x_shape)), axis=lay.reduce, dtype=jnp.int32)  # (C,), §11.5
    if axis_name is not None:
        n = lax.psum(n, axis_name, axis_index_groups=axis_index_groups)
    return n


def _train_primal(
    x: Array, gamma: Array | None, beta: Array | None, m: Array | None, cfg: _TrainConfig
) -> tuple[Array, Array, Array]:
    mean, var, _ = batch_stats(x, axis=cfg.axis, axis_name=cfg.axis_name,
                               axis_index_groups=cfg.axis_index_groups, mask=m)  # §2.1, §11
    y = normalize(x, mean, var, gamma, beta, eps=cfg.eps, axis=cfg.axis, dtype=cfg.dtype)  # §2.2-§2.3
    return y, mean, var


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _train_forward(
    x: Array, gamma: Array | None, beta: Array | None, m: Array | None, cfg: _TrainConfig
) -> tuple[Array, Array, Array]:
    """``(y, mean, var)`` of a training step: two-pass batch statistics (§2.1) and the normalized,
    scaled and shifted ``y`` (§2.2-§2.3), exactly :func:`batch_stats` then :func:`normalize`.

    Shapes: x (N, C, ...) or (N, ..., C), already zeroed where ``m`` is False; gamma, beta (C,) or
    None; m None or a bool array broadcasting to x. Returns y like x (in ``cfg.dtype`` or x's), mean
    and var (C,) in the statistics dtype.

    Its derivative is not autodiff of the primal (which differentiates rsqrt(var + eps) and forms
    (var + eps)^(-3/2): about 5e-46 for var ~ 1e30, below float32's smallest subnormal, so the
    variance term of dx vanished) but the closed form of §5.1, as a JVP (see :func:`_train_forward_jvp`);
    JAX transposes it for reverse mode, so jvp, grad, vjp, vmap and jit all use it.
    """
    return _train_primal(x, gamma, beta, m, cfg)


@_train_forward.defjvp
def _train_forward_jvp(cfg: _TrainConfig, primals: tuple, tangents: tuple) -> tuple[tuple, tuple]:
    """The tangent of :func:`_train_forward` in closed form (§5.1, §5.3), per channel::

        t_xh = inv * (t_x - mean(t_x) - xh * mean(t_x * xh)),   inv = 1 / sqrt(var + eps)
        t_y  = gamma * t_xh + t_gamma * xh + t_beta
        t_mean = mean(t_x),   t_var = 2 * mean((x - mean) * (t_x - mean(t_x)))

    Every mean is over the channel's reduced axes, only over the values ``m`` keeps (§11.5) and,
    under ``axis_name``, over every device's values (a ``psum`` of sums over the psum of counts,
    §11.6). Its transpose is §5.1's ``dx = (gamma * inv) (dy - mean(dy) - xh mean(dy xh))``. The
    tangent is computed in the dtype :func:`normalize` computes in (at least float32, §8.3) and
    rounded once to the output dtype. No factor (var + eps)^(-3/2) is ever formed.
    """
    x, gamma, beta, m = primals
    tx, tg, tb, _ = tangents
    y, mean, var = _train_primal(x, gamma, beta, m, cfg)
    lay = _checks.layout(x.shape, cfg.axis)
    red, bshape = lay.reduce, lay.bshape
    parts = [stats_dtype(x.dtype), mean.dtype, var.dtype] + [a.dtype for a in (gamma, beta) if a is not None]
    cd = jnp.result_type(*parts)
    n = _count(x.shape, m, cfg.axis, cfg.axis_name, cfg.axis_index_groups)
    nf = n if isinstance(n, numbers.Real) else n.astype(cd)

    def keep(a: Array) -> Array:
        return a if m is None else jnp.where(m, a, jnp.zeros((), a.dtype))

    def cmean(a: Array) -> Array:  # (C,): the channel mean over the kept values of every device
        total = jnp.sum(keep(a), axis=red)
        if cfg.axis_name is not None:
            total = lax.psum(total, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)
        return total / nf

    inv = lax.rsqrt(var.astype(cd) + cfg.eps)
    centred = keep(x.astype(cd) - mean.astype(cd).reshape(bshape))
    xh = centred * inv.reshape(bshape)
    t = keep(tx.astype(cd))
    mt = cmean(t)
    tc = t - mt.reshape(bshape)
    t_xh = keep(inv.reshape(bshape) * (tc - xh * cmean(t * xh).reshape(bshape)))  # §5.1
    t_y = t_xh if gamma is None else t_xh * gamma.astype(cd).reshape(bshape)
    if gamma is not None:
        t_y = t_y + xh * tg.astype(cd).reshape(bshape)
    if beta is not None:
        t_y = t_y + keep(jnp.broadcast_to(tb.astype(cd).reshape(bshape), x.shape))
    t_mean = mt.astype(mean.dtype)
    t_var = (2 * cmean(centred * tc)).astype(var.dtype)
    return (y, mean, var), (t_y.astype(y.dtype), t_mean, t_var)


# -- validation ---------------------------------------------------------------------------------


def _as_float_array(name: str, a: Any) -> Array:
    arr = a if isinstance(a, jax.Array) else jnp.asarray(a)
    _checks.check_float_dtype(name, jnp.dtype(arr.dtype).name)
    return arr


def _check_count(count: Any) -> Any:
    if isinstance(count, (jax.Array,)) or hasattr(count, "dtype"):
        arr = jnp.asarray(count)
        if not jnp.issubdtype(arr.dtype, jnp.integer) or arr.ndim != 0:
            raise TypeError(
                f"count must be an int >= 0 or a scalar integer array (training steps already taken); "
                f"got an array of dtype {arr.dtype} and shape {arr.shape}"
            )
        return arr
    return _checks.check_count(count)


def _check_mask(mask: Any, x_shape: Sequence[int]) -> Array | None:
    """``mask`` as a bool array of the rank of ``x`` that broadcasts to ``x.shape`` (or None).

    Two spellings are accepted: bn-ref's (N,) flag per sample, and any shape that broadcasts to
    ``x.shape`` under NumPy's rules (trailing axes aligned), which is what Flax's
    ``BatchNorm(..., mask=)`` takes -- e.g. (N, 1, 1, 1), (N, H, W, 1), (1, ..., C) per feature, or
    ``x.shape`` itself. A rank-1 mask of length N is always bn-ref's per-sample form, also when N
    equals ``x.shape[-1]`` (where NumPy's rule would read it per feature): give a per-feature
    mask as (1, ..., C).
    """
    if mask is None:
        return None
    m = jnp.asarray(mask)
    x_shape = tuple(int(s) for s in x_shape)
    ndim = len(x_shape)
    if m.dtype != jnp.bool_:
        raise TypeError(f"mask must be a bool array (True = a value that enters the statistics); got dtype {m.dtype}")
    ms = tuple(int(s) for s in m.shape)
    if len(ms) == 1 and ndim > 1 and ms[0] == x_shape[0]:
        return m.reshape(ms + (1,) * (ndim - 1))  # bn-ref's per-sample form (takes precedence)
    full = (1,) * (ndim - len(ms)) + ms
    if len(ms) > ndim or any(a not in (1, b) for a, b in zip(full, x_shape)):
        raise ValueError(
            f"mask must have shape (N,) = ({x_shape[0]},) (one flag per sample) or a shape that broadcasts to "
            f"x.shape {x_shape}; got shape {ms}"
        )
    return m.reshape(full)


# -- the whole layer ----------------------------------------------------------------------------


class BNState(NamedTuple):
    """The running state of one Batch Normalization layer, optax-style (``docs/spec.md`` §3).

    Attributes:
        mean: (C,) running mean.
        var: (C,) running variance (biased or unbiased per the convention, §3.4).
        count: int32 scalar, training steps taken (what ``momentum=None`` needs, §3.3).

    :func:`batch_norm` takes the three fields and returns them updated, so a training step is:

    >>> import jax.numpy as jnp
    >>> from bn_ref.jax import BNState, batch_norm, init
    >>> s = init(3)
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> y, *new = batch_norm(x, None, None, s.mean, s.var, count=s.count, training=True)
    >>> s = BNState(*new)
    >>> int(s.count), s.mean.shape
    (1, (3,))
    """

    mean: Array
    var: Array
    count: Array


def init(num_features: int, dtype: Any = jnp.float32) -> BNState:
    """The initial :class:`BNState`: mean 0, var 1, count 0 (every framework's initial values, §3).

    Args:
        num_features: C, the size of the feature axis.
        dtype: dtype of ``mean``/``var`` (float32 by default, also for half-precision models, §8.3).
    """
    c = _checks.check_num_features(num_features)
    return BNState(jnp.zeros((c,), dtype), jnp.ones((c,), dtype), jnp.zeros((), jnp.int32))


def batch_norm(
    x: Any,
    gamma: Any,
    beta: Any,
    running_mean: Any,
    running_var: Any,
    *,
    training: bool,
    convention: ConventionLike = "flax",
    axis: int | None = None,
    count: Any = 0,
    eps: float | None = None,
    momentum: Any = DEFAULT,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    mask: Any = None,
    dtype: Any = None,
    use_fast_variance: bool = False,
) -> tuple[Array, Array | None, Array | None, Any]:
    """Batch Normalization as a pure function (``docs/spec.md`` §2-§4, §11).

    Training (``training=True``) normalizes with the batch statistics and returns updated
    running statistics; eval normalizes with the running statistics and returns them unchanged.
    The state recursion, one call per training step ``t = count + 1``::

        mean_t, var_t = batch mean, biased batch variance of x_t (two-pass)        # §2.1, §8.1
        y_t = gamma * (x_t - mean_t) / sqrt(var_t + eps) + beta                     # §2.2, §2.3
        (w_r, w_b) = convention.update_weights(count)                              # §3.1-§3.3
        running_mean_t = w_r * running_mean_{t-1} + w_b * mean_t
        running_var_t  = w_r * running_var_{t-1}  + w_b * var_t * variance_correction(n)   # §3.4
        count_t = count_{t-1} + 1

    starting from :func:`init` (mean 0, var 1, count 0); :class:`BNState` names the three.

    Args:
        x: (N, C, ...) or (N, ..., C) floating array, rank >= 2.
        gamma, beta: (C,) scale and shift, or None.
        running_mean, running_var: (C,) running statistics; required in eval, optional (both
            None) in training, in which case they are returned as None.
        training: a Python bool (static under ``jit``).
        convention: a preset name or a :class:`bn_ref.Convention`.
        axis: feature axis; None means ``convention.feature_axis``.
        count: training steps already taken (a Python int or a scalar integer array); used by
            ``momentum=None`` (§3.3) and returned incremented in training.
        eps: overrides ``convention.eps`` when not None.
        momentum: overrides ``convention.momentum`` (in the convention's own meaning) unless
            ``DEFAULT``; ``None`` is the cumulative average (§3.3).
        axis_name: named axis of ``shard_map``/``pmap`` to compute the statistics over the global
            batch, count-weighted and exact (§11); the unbiased correction uses the global n.
        axis_index_groups: sub-groups of ``axis_name`` (as in ``lax.psum``; ``pmap`` only).
        mask: optional bool array, True for the values that enter the statistics: (N,) (one flag
            per sample), or any shape that broadcasts to ``x.shape`` as Flax's ``mask`` does
            (e.g. (N, H, W, 1), or (1, ..., C) per feature). Each channel's statistics are those of
            its own unmasked values, with its own count (§11.5); masked positions output 0 and
            receive zero gradient. The n = 1 and empty-batch checks apply to the batch as shaped;
            a channel with no unmasked value gets NaN statistics.
        dtype: dtype of ``y``; None means ``x.dtype`` (§8.3).
        use_fast_variance: False (the default) computes the variance in two passes, as the spec
            requires (§8.1). True reproduces Flax's one-pass ``max(0, E[x^2] - E[x]^2)`` and
            warns: it departs from the spec and loses every digit when |mean| >> std (§8.2).

    Returns:
        ``(y, new_running_mean, new_running_var, new_count)``: ``y`` like ``x`` in ``dtype``;
        running statistics (C,) in their own dtype (or None); ``new_count = count + 1`` in
        training, ``count`` in eval.

    Statistics are computed in at least float32 (float16/bfloat16 inputs; float64 stays float64,
    §8.3). Gradients flow through the batch statistics (§5.1) but not into the running update.

    Raises (at trace time, before any computation):
        ValueError: rank < 2, a bad feature axis, a per-channel array not shaped (C,), missing
            running statistics in eval, an empty batch or n = 1 under ``single_value="error"``
            in training (§7.1, §7.3), a mask that does not broadcast to ``x``.
        TypeError: non-floating ``x``/parameters/statistics, non-bool ``training`` or ``mask``,
            a non-integer ``count``.
    """
    training = _checks.check_flag("training", training)
    use_fast_variance = _checks.check_flag("use_fast_variance", use_fast_variance)
    conv = resolve(convention, eps=eps, momentum=momentum, feature_axis=axis)
    x = _as_float_array("x", x)
    lay = _checks.layout(x.shape, conv.feature_axis)
    arrays = {}
    for name, value in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
        if value is None:
            arrays[name] = None
            continue
        arr = _as_float_array(name, value)
        _checks.check_per_channel(name, arr.shape, lay.c, lay.axis, x.shape)
        arrays[name] = arr
    rm, rv = arrays["running_mean"], arrays["running_var"]
    _checks.check_running_pair(rm is not None, rv is not None, training=training)
    count = _check_count(count)
    m = _check_mask(mask, x.shape)
    if axis_index_groups is not None and axis_name is None:
        raise ValueError("axis_index_groups needs axis_name (the named axis the groups subdivide)")
    if training:
        group = _group_size(axis_name, axis_index_groups)
        if group is not None:
            # Static check on the batch as shaped (§7.1, §7.3); with a mask the number of real
            # values is only known at run time.
            _checks.check_batch(lay.n * group, x.shape, conv, training=True)
        if use_fast_variance:
            warnings.warn(
                "use_fast_variance=True computes the batch variance as E[x^2] - E[x]^2 in one pass (Flax's "
                "formula), which departs from bn-ref's spec (docs/spec.md §8.2: it cancels catastrophically "
                "when |mean| >> std); pass use_fast_variance=False for the two-pass variance",
                UserWarning,
                stacklevel=2,
            )

    if m is not None:
        # Masked values are zeroed before anything touches them, so NaN/Inf padding cannot
        # reach real outputs or (through 0 * NaN in the backward pass) any gradient.
        x = jnp.where(m, x, jnp.zeros((), x.dtype))
    if training:
        if use_fast_variance:
            # Flax's formula, and Flax's gradient: plain autodiff of the one-pass variance.
            mean, var, n_eff = batch_stats(
                x,
                axis=lay.axis,
                axis_name=axis_name,
                axis_index_groups=axis_index_groups,
                mask=m,
                use_fast_variance=True,
            )  # §2.1, §11
            y = normalize(x, mean, var, arrays["gamma"], arrays["beta"], eps=conv.eps, axis=lay.axis, dtype=dtype)
        else:
            groups = None if axis_index_groups is None else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
            cfg = _TrainConfig(float(conv.eps), lay.axis, axis_name, groups, None if dtype is None else jnp.dtype(dtype))
            # §2.1-§2.3 forward, §5.1 closed-form derivative
            y, mean, var = _train_forward(x, arrays["gamma"], arrays["beta"], m, cfg)
            n_eff = _count(x.shape, m, lay.axis, axis_name, axis_index_groups)  # §11
        if rm is not None:
            new_rm, new_rv = update_running(rm, rv, mean, var, n_eff, convention=conv, count=count)  # §3
        else:
            new_rm = new_rv = None
        new_count = count + 1
    else:
        y = normalize(x, rm, rv, arrays["gamma"], arrays["beta"], eps=conv.eps, axis=lay.axis, dtype=dtype)  # §4
        new_rm, new_rv, new_count = rm, rv, count
    if m is not None:
        # Masked positions: output 0, a constant, so they neither send nor receive gradient.
        y = jnp.where(m, y, jnp.zeros((), y.dtype))
    return y, new_rm, new_rv, new_count
