"""bn-ref Batch Normalization as a ``flax.linen`` module: a thin shell over :mod:`bn_ref.jax`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import _checks
from ..conventions import DEFAULT, Convention, ConventionLike, resolve
from ..jax import batch_norm

__all__ = ["BatchNorm"]


def layer_convention(convention: ConventionLike, *, axis: Any, momentum: Any, epsilon: Any, eps: Any) -> Convention:
    """The layer's :class:`Convention` from Flax's arguments (``epsilon``) and bn-ref's (``eps``)."""
    if epsilon is not None and eps is not None:
        raise ValueError(
            f"give epsilon (Flax's name) or eps (bn-ref's), not both; got epsilon={epsilon!r} and eps={eps!r}"
        )
    return resolve(convention, eps=epsilon if epsilon is not None else eps, momentum=momentum, feature_axis=axis)


class BatchNorm(nn.Module):
    """Batch Normalization under any bn-ref convention (``docs/spec.md`` §2-§4, §11), for linen.

    A drop-in for ``flax.linen.BatchNorm``: the same attributes in the same order (so positional
    construction works), the same variables, the same call. The numerical policy comes from a
    :class:`bn_ref.Convention` (default ``"flax"``: Flax's eps, momentum and axis, with two-pass
    statistics). The computation is :func:`bn_ref.jax.batch_norm`; this class only holds the
    variables. The NNX layer :class:`bn_ref.flax.nnx.BatchNorm` shares the same core, so the two
    agree bit for bit.

    Attributes (Flax's, in Flax's order):
        use_running_average: True normalizes with the stored running statistics (eval, §4),
            False with the batch statistics (training, §2). Give it exactly once, here or in
            ``__call__`` (as Flax does); both or neither raises ``ValueError``.
        axis: the feature axis; None means ``convention.feature_axis`` (-1 under ``"flax"``, as
            Flax's default; 1 for NCHW presets).
        momentum: overrides ``convention.momentum`` (in the convention's own meaning, §3.1/§3.2)
            unless ``bn_ref.DEFAULT`` (0.99 on the running term under ``"flax"``); None selects
            the cumulative average (§3.3).
        epsilon: overrides ``convention.eps`` when not None (1e-5 under ``"flax"``).
        dtype: output dtype; None means the input dtype (§8.3; Flax would promote with the
            parameters). Statistics are at least float32.
        param_dtype: dtype of ``scale``, ``bias`` and the running ``mean``/``var``.
        use_bias, use_scale: learn ``bias`` (beta) / ``scale`` (gamma) of shape (C,).
        bias_init, scale_init: initializers ``(key, shape, dtype) -> array`` (zeros / ones).
        axis_name, axis_index_groups: compute statistics over the global batch of a
            ``shard_map``/``pmap`` axis, count-weighted and exact (§11). Ignored while
            initialising (the named axis need not exist then), as in Flax.
        use_fast_variance: False (bn-ref's default; Flax's is True) computes the two-pass
            variance of the spec. True reproduces Flax's one-pass ``E[x^2] - E[x]^2`` with a
            ``UserWarning`` that it departs from the spec (§8.2).
        force_float32_reductions: must be True (Flax's default): statistics are at least float32
            (§8.3). False is refused.

    bn-ref's own attributes (after Flax's): ``convention`` (a preset name or a
    :class:`bn_ref.Convention`) and ``eps`` (bn-ref's spelling of ``epsilon``; give one).

    Variables:
        ``params/scale`` (C,), ``params/bias`` (C,); ``batch_stats/mean`` (C,) zeros,
        ``batch_stats/var`` (C,) ones -- exactly Flax's, so variables written by
        ``flax.linen.BatchNorm`` load unchanged. Only with ``momentum=None`` (the cumulative
        average, §3.3) is there one more, ``batch_stats/count`` (int32 scalar, training steps
        taken); variables without it start counting from 0. A ``count`` that the variables
        already hold (e.g. ported from PyTorch's ``num_batches_tracked``) is kept up to date
        under any momentum.

    When the running statistics update (§3.6): in training, only when the ``batch_stats``
    collection is mutable (``apply(..., mutable=["batch_stats"])``) and the module is not being
    initialised -- the batch seen by ``init`` leaves ``mean``/``var`` at 0/1, as in Flax. A
    training call with an immutable ``batch_stats`` normalizes with the batch statistics and
    leaves the stored ones untouched (it does not raise).

    Shapes: ``x`` is (N, C, ...) or (N, ..., C), rank >= 2; the output has the shape of ``x``.
    ``mask`` (call argument) is (N,) or broadcastable to ``x`` (see :func:`bn_ref.jax.batch_norm`).
    """

    use_running_average: bool | None = None
    axis: int | None = None
    momentum: Any = DEFAULT
    epsilon: float | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = nn.initializers.zeros
    scale_init: Any = nn.initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    convention: ConventionLike = "flax"
    eps: float | None = None

    @nn.compact
    def __call__(self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x``; see the class docstring. ``mask``: (N,) or broadcastable to ``x``, True = counted."""
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        use_ra = _checks.check_flag("use_running_average", use_ra)
        if self.force_float32_reductions is not True:
            raise ValueError(
                "force_float32_reductions=False (statistics in the input dtype) is not offered: bn-ref computes "
                "statistics in at least float32 (docs/spec.md §8.3); leave it True"
            )
        conv = layer_convention(
            self.convention, axis=self.axis, momentum=self.momentum, epsilon=self.epsilon, eps=self.eps
        )
        x = jnp.asarray(x)
        _checks.check_float_dtype("x", jnp.dtype(x.dtype).name)
        lay = _checks.layout(x.shape, conv.feature_axis)
        shape = (lay.c,)

        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, self.param_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, self.param_dtype))
        # The step counter is created only where the rule needs it (momentum=None, §3.3), so
        # Flax's own variables (mean/var only) load, and an immutable collection without it still
        # runs. One that is given (e.g. ported from PyTorch's num_batches_tracked) keeps counting.
        ra_count = None
        if self.has_variable("batch_stats", "count") or (
            conv.momentum is None and self.is_mutable_collection("batch_stats")
        ):
            ra_count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))

        initializing = self.is_initializing()
        y, new_mean, new_var, new_count = batch_norm(
            x,
            scale,
            bias,
            ra_mean.value,
            ra_var.value,
            training=not use_ra,
            convention=conv,
            axis=lay.axis,
            count=0 if ra_count is None else ra_count.value,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            mask=mask,
            dtype=self.dtype,
            use_fast_variance=self.use_fast_variance,
        )
        if not use_ra and not initializing and self.is_mutable_collection("batch_stats"):
            ra_mean.value = new_mean
            ra_var.value = new_var
            if ra_count is not None:
                ra_count.value = jnp.asarray(new_count, jnp.int32)
        return y
