"""bn-ref Batch Normalization as a ``flax.nnx`` module: a thin shell over :mod:`bn_ref.jax`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _checks
from ..conventions import DEFAULT, ConventionLike, resolve
from ..jax._core import batch_norm_impl

__all__ = ["BatchNorm"]


class BatchNorm(nnx.Module):
    """Batch Normalization under any bn-ref convention (``docs/spec.md`` §2-§4, §11), for NNX.

    The same layer as :class:`bn_ref.flax.BatchNorm` (linen), computing bit for bit the same
    thing through :func:`bn_ref.jax.batch_norm`.

    Args:
        num_features: C, the size of the feature axis.
        convention: a preset name or a :class:`bn_ref.Convention`.
        axis: the feature axis; None means ``convention.feature_axis``.
        eps: overrides ``convention.eps`` when not None.
        momentum: overrides ``convention.momentum`` unless ``bn_ref.DEFAULT``; None selects the
            cumulative average (§3.3).
        use_scale, use_bias: learn ``scale`` (gamma) / ``bias`` (beta), ``nnx.Param`` of shape (C,).
        use_running_average: the default mode: False trains (batch statistics, running update),
            True evaluates with the running statistics. ``.train()``/``.eval()`` set it; a value
            passed to ``__call__`` takes precedence.
        dtype: output dtype; None means the input dtype.
        param_dtype: dtype of ``scale``, ``bias`` and the running ``mean``/``var``.
        axis_name, axis_index_groups: cross-device statistics (§11), count-weighted and exact.
        rngs: accepted for signature compatibility with NNX layers; the initialisation is
            deterministic (ones/zeros) and does not use it.

    State: ``scale``/``bias`` (``nnx.Param``, (C,)), ``mean``/``var`` (``nnx.BatchStat``, (C,),
    zeros/ones) and ``count`` (``nnx.BatchStat``, int32 scalar, training steps taken). Every
    training call updates ``mean``, ``var`` and ``count`` (§3.6).

    Shapes: ``x`` is (N, C, ...) or (N, ..., C), rank >= 2; the output has the shape of ``x``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        convention: ConventionLike = "flax",
        axis: int | None = None,
        eps: float | None = None,
        momentum: Any = DEFAULT,
        use_scale: bool = True,
        use_bias: bool = True,
        use_running_average: bool | None = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"num_features must be an int >= 1; got {num_features!r}")
        self.convention = resolve(convention, eps=eps, momentum=momentum, feature_axis=axis)
        shape = (num_features,)
        self.num_features = num_features
        self.scale = nnx.Param(jnp.ones(shape, param_dtype)) if use_scale else None
        self.bias = nnx.Param(jnp.zeros(shape, param_dtype)) if use_bias else None
        self.mean = nnx.BatchStat(jnp.zeros(shape, param_dtype))
        self.var = nnx.BatchStat(jnp.ones(shape, param_dtype))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.use_running_average = use_running_average
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups

    def __call__(self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x`` (and, in training, update ``mean``/``var``/``count``).

        ``mask``: optional (N,) bool array, True for real samples (see :func:`bn_ref.jax.batch_norm`).
        """
        use_ra = use_running_average if use_running_average is not None else self.use_running_average
        if use_ra is None:
            raise ValueError(
                "use_running_average was given neither to bn_ref.flax.nnx.BatchNorm(...) nor to the call; "
                "pass True/False to one of them, or use .train()/.eval()"
            )
        use_ra = _checks.check_flag("use_running_average", use_ra)
        conv = self.convention
        x = jnp.asarray(x)
        _checks.check_float_dtype("x", jnp.dtype(x.dtype).name)
        _checks.check_input(x.shape, conv.feature_axis)
        y, new_mean, new_var, new_count = batch_norm_impl(
            x,
            None if self.scale is None else self.scale[...],
            None if self.bias is None else self.bias[...],
            self.mean[...],
            self.var[...],
            training=not use_ra,
            convention=conv,
            count=self.count[...],
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            dtype=self.dtype,
        )
        if not use_ra:
            self.mean[...] = new_mean
            self.var[...] = new_var
            self.count[...] = jnp.asarray(new_count, jnp.int32)
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Hook for ``nnx.view(model, use_running_average=...)`` (Flax >= 0.12)."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
