"""bn-ref Batch Normalization as a ``flax.linen`` module: a thin shell over :mod:`bn_ref.jax`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import _checks
from ..conventions import DEFAULT, ConventionLike, resolve
from ..jax._core import batch_norm_impl

__all__ = ["BatchNorm"]


class BatchNorm(nn.Module):
    """Batch Normalization under any bn-ref convention (``docs/spec.md`` §2-§4, §11), for linen.

    A drop-in for ``flax.linen.BatchNorm`` whose numerical policy comes from a
    :class:`bn_ref.Convention` (default ``"flax"``, which matches Flax's defaults with
    two-pass statistics). The computation is :func:`bn_ref.jax.batch_norm`; this class only holds
    the variables. The NNX layer :class:`bn_ref.flax.nnx.BatchNorm` shares the same core, so
    the two agree bit for bit.

    Attributes:
        use_running_average: True normalizes with the stored running statistics (eval, §4),
            False with the batch statistics (training, §2). Give it exactly once, here or in
            ``__call__`` (as Flax does); both or neither raises ``ValueError``.
        convention: a preset name or a :class:`bn_ref.Convention`.
        axis: the feature axis; None means ``convention.feature_axis`` (1 for NCHW presets,
            -1 for NHWC ones).
        eps: overrides ``convention.eps`` when not None.
        momentum: overrides ``convention.momentum`` (in the convention's own meaning, §3.1/§3.2)
            unless ``bn_ref.DEFAULT``; None selects the cumulative average (§3.3).
        use_scale, use_bias: learn ``scale`` (gamma) / ``bias`` (beta) of shape (C,).
        dtype: output dtype; None means the input dtype. Statistics are at least float32 (§8.3).
        param_dtype: dtype of ``scale``, ``bias`` and the running ``mean``/``var``.
        axis_name, axis_index_groups: compute statistics over the global batch of a
            ``shard_map``/``pmap`` axis, count-weighted and exact (§11). Ignored while
            initialising (the named axis need not exist then), as in Flax.

    Variables:
        ``params/scale`` (C,) ones, ``params/bias`` (C,) zeros; ``batch_stats/mean`` (C,) zeros,
        ``batch_stats/var`` (C,) ones, ``batch_stats/count`` int32 scalar 0 (training steps
        taken; used by ``momentum=None``).

    When the running statistics update (§3.6): in training, only when the ``batch_stats``
    collection is mutable (``apply(..., mutable=["batch_stats"])``) and the module is not being
    initialised -- the batch seen by ``init`` leaves ``mean``/``var``/``count`` at 0/1/0, as in
    Flax. A training call with an immutable ``batch_stats`` normalizes with the batch statistics
    and leaves the stored ones untouched (it does not raise).

    Shapes: ``x`` is (N, C, ...) or (N, ..., C), rank >= 2; the output has the shape of ``x``.
    """

    use_running_average: bool | None = None
    convention: ConventionLike = "flax"
    axis: int | None = None
    eps: float | None = None
    momentum: Any = DEFAULT
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: Any = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x``; see the class docstring. ``mask``: optional (N,) bool, True = real sample."""
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        use_ra = _checks.check_flag("use_running_average", use_ra)
        conv = resolve(self.convention, eps=self.eps, momentum=self.momentum, feature_axis=self.axis)
        x = jnp.asarray(x)
        _checks.check_float_dtype("x", jnp.dtype(x.dtype).name)
        ax, c, _ = _checks.check_input(x.shape, conv.feature_axis)
        shape = (c,)

        scale = self.param("scale", nn.initializers.ones, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", nn.initializers.zeros, shape, self.param_dtype) if self.use_bias else None
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, self.param_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, self.param_dtype))
        ra_count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))

        initializing = self.is_initializing()
        y, new_mean, new_var, new_count = batch_norm_impl(
            x,
            scale,
            bias,
            ra_mean.value,
            ra_var.value,
            training=not use_ra,
            convention=conv,
            axis=ax,
            count=ra_count.value,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            mask=mask,
            dtype=self.dtype,
        )
        if not use_ra and not initializing and self.is_mutable_collection("batch_stats"):
            ra_mean.value = new_mean
            ra_var.value = new_var
            ra_count.value = jnp.asarray(new_count, jnp.int32)
        return y
