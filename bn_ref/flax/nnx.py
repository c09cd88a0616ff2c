"""bn-ref Batch Normalization as a ``flax.nnx`` module: a thin shell over :mod:`bn_ref.jax`."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _checks
from ..conventions import DEFAULT, ConventionLike
from ..jax import batch_norm
from ..jax.variants import RenormState
from ..variants import Variant
from .linen import check_variant, check_variant_mask, layer_convention, separate_renorm_pair, variant_step

__all__ = ["BatchNorm"]

_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


class BatchNorm(nnx.Module):
    """Batch Normalization under any bn-ref convention (``docs/spec.md`` §2-§4, §11), for NNX.

    A drop-in for ``flax.nnx.BatchNorm`` (same keyword arguments, same state) computing bit for
    bit what :class:`bn_ref.flax.BatchNorm` (linen) computes, through :func:`bn_ref.jax.batch_norm`.

    Args (Flax's, with Flax's meaning):
        num_features: C, the size of the feature axis.
        use_running_average: the default mode: False trains (batch statistics, running update),
            True evaluates with the running statistics. ``.train()``/``.eval()`` and
            ``nnx.view`` set it; a value passed to ``__call__`` takes precedence.
        axis: the feature axis; None means ``convention.feature_axis`` (-1 under ``"flax"``).
        momentum: overrides ``convention.momentum`` unless ``bn_ref.DEFAULT`` (0.99 on the
            running term under ``"flax"``); None selects the cumulative average (§3.3).
        epsilon: overrides ``convention.eps`` when not None (1e-5 under ``"flax"``).
        dtype: output dtype; None means the input dtype (§8.3), unless ``promote_dtype`` is given.
        param_dtype: dtype of ``scale``, ``bias`` and the running ``mean``/``var``.
        use_bias, use_scale: learn ``bias`` (beta) / ``scale`` (gamma), ``nnx.Param`` (C,).
        bias_init, scale_init: initializers ``(key, shape, dtype) -> array`` (zeros / ones).
        axis_name, axis_index_groups: cross-device statistics (§11), count-weighted and exact.
        use_fast_variance: False (bn-ref's default; Flax's is True) is the two-pass variance of
            the spec; True reproduces Flax's one-pass formula with a ``UserWarning`` (§8.2).
        promote_dtype: None (bn-ref's default) keeps bn-ref's dtype policy (§8.3). A function
            such as ``flax.nnx.nn.dtypes.promote_dtype`` is applied as Flax applies it, to
            ``(x, mean, var, scale, bias)`` with ``dtype=dtype``, before the computation.
        rngs: ``nnx.Rngs``; ``scale_init`` then ``bias_init`` each draw one ``rngs.params()``
            key, as in Flax. Optional here: without it the default (constant) initializers get
            a fixed key, and other initializers raise ``TypeError``.
        bias_metadata, scale_metadata: metadata for the ``nnx.Param`` of ``bias`` / ``scale``.

    bn-ref's own (keyword) arguments, after Flax's: ``convention`` (a preset name or a
    :class:`bn_ref.Convention`), ``eps`` (bn-ref's spelling of ``epsilon``; give one) and
    ``variant``: None (plain BN) or a :class:`bn_ref.variants.Variant` (§13-§16), with exactly the
    meaning it has for the linen layer (see :class:`bn_ref.flax.BatchNorm`, "With a variant"):
    the same function, :func:`bn_ref.jax.variants.batch_norm_variant`, computes both, so linen and
    NNX agree bit for bit. State with a variant: ``Variant(track_running_stats=False)`` keeps no
    ``mean``/``var`` (both attributes are None); a renorm layer whose correction pair differs from
    the running pair (§13.3) has two more ``nnx.BatchStat``, ``renorm_mean`` and ``renorm_stat``;
    ``frozen="all"`` leaves ``scale``/``bias`` as ``nnx.Param`` with a zero gradient.

    State: ``scale``/``bias`` (``nnx.Param``, (C,)) and ``mean``/``var`` (``nnx.BatchStat``,
    (C,), zeros/ones) -- Flax's, so ``nnx.state`` of a ``flax.nnx.BatchNorm`` loads unchanged
    (``nnx.update``) and every NNX transform sees the same tree. Only with ``momentum=None``
    (§3.3) is there one more ``nnx.BatchStat``, ``count``: training steps taken, stored as a
    float32 scalar (exact up to 2**24 steps) so that tree-mode ``nnx.grad`` (which
    differentiates every array in the module) accepts it. Every training call updates the
    statistics (§3.6).

    Shapes: ``x`` is (N, C, ...) or (N, ..., C), rank >= 2; the output has the shape of ``x``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int | None = None,
        momentum: Any = DEFAULT,
        epsilon: float | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable[..., Any] = _ZEROS,
        scale_init: Callable[..., Any] = _ONES,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: Callable[..., Any] | None = None,
        rngs: nnx.Rngs | None = None,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        convention: ConventionLike = "flax",
        eps: float | None = None,
        variant: Variant | None = None,
    ) -> None:
        num_features = _checks.check_num_features(num_features)
        conv = layer_convention(convention, axis=axis, momentum=momentum, epsilon=epsilon, eps=eps)
        self.use_fast_variance = _checks.check_flag("use_fast_variance", use_fast_variance)
        self.variant = check_variant(variant, axis_name=axis_name, use_fast_variance=self.use_fast_variance)
        self.convention = conv
        shape = (num_features,)

        def key(init: Any, name: str) -> Any:
            if rngs is not None:
                return rngs.params()
            if init is _ZEROS or init is _ONES:
                return jax.random.key(0)  # unused by a constant initializer
            raise TypeError(f"{name} is not one of the default constant initializers: pass rngs=nnx.Rngs(...)")

        self.num_features = num_features
        self.scale = nnx.Param(scale_init(key(scale_init, "scale_init"), shape, param_dtype), **scale_metadata) if use_scale else None
        self.bias = nnx.Param(bias_init(key(bias_init, "bias_init"), shape, param_dtype), **bias_metadata) if use_bias else None
        tracked = variant is None or variant.track_running_stats  # §16.1: none kept
        self.mean = nnx.BatchStat(jnp.zeros(shape, param_dtype)) if tracked else None
        self.var = nnx.BatchStat(jnp.ones(shape, param_dtype)) if tracked else None
        if tracked and self.convention.momentum is None:
            self.count = nnx.BatchStat(jnp.zeros((), jnp.float32))
        if variant is not None and separate_renorm_pair(variant, conv):  # §13.3: the pair, started as linen starts it
            start = RenormState.from_running(jnp.zeros(shape, param_dtype), jnp.ones(shape, param_dtype), variant, conv.eps)
            self.renorm_mean = nnx.BatchStat(start.mean.astype(param_dtype))
            self.renorm_stat = nnx.BatchStat(start.stat.astype(param_dtype))
        self.use_running_average = use_running_average
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.promote_dtype = promote_dtype

    def __call__(self, x: Any, use_running_average: bool | None = None, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x`` (and, in training, update ``mean``/``var``, and ``count`` if any).

        ``mask``: (N,) or broadcastable to ``x``, True for counted values (see
        :func:`bn_ref.jax.batch_norm`).
        """
        use_ra = use_running_average if use_running_average is not None else self.use_running_average
        if use_ra is None:
            raise ValueError(
                "use_running_average was given neither to bn_ref.flax.nnx.BatchNorm(...) nor to the call; "
                "pass True/False to one of them, or use .train()/.eval() or nnx.view"
            )
        use_ra = _checks.check_flag("use_running_average", use_ra)
        check_variant_mask(self.variant, mask)
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        mean = None if self.mean is None else self.mean[...]
        var = None if self.var is None else self.var[...]
        if self.promote_dtype is not None:
            x, mean, var, scale, bias = self.promote_dtype((x, mean, var, scale, bias), dtype=self.dtype)
        has_count = "count" in vars(self)
        count = self.count[...].astype(jnp.int32) if has_count else 0
        if self.variant is not None:
            x = jnp.asarray(x)
            _checks.check_float_dtype("x", jnp.dtype(x.dtype).name)
            has_pair = "renorm_mean" in vars(self)
            out = variant_step(
                x,
                scale,
                bias,
                mean,
                var,
                (self.renorm_mean[...], self.renorm_stat[...]) if has_pair else None,
                training=not use_ra,
                variant=self.variant,
                conv=self.convention,
                count=count,
                dtype=self.dtype,
            )
            if not use_ra and self.mean is not None and self.var is not None and self.variant.frozen == "no":  # §3.6, §15
                self.mean[...] = jnp.asarray(out.running_mean).astype(self.mean[...].dtype)
                self.var[...] = jnp.asarray(out.running_var).astype(self.var[...].dtype)
                if has_count:
                    self.count[...] = jnp.asarray(out.count, jnp.float32)
                if has_pair:
                    assert out.renorm is not None
                    self.renorm_mean[...] = out.renorm.mean.astype(self.renorm_mean[...].dtype)
                    self.renorm_stat[...] = out.renorm.stat.astype(self.renorm_stat[...].dtype)
            return out.y
        y, new_mean, new_var, new_count = batch_norm(
            x,
            scale,
            bias,
            mean,
            var,
            training=not use_ra,
            convention=self.convention,
            count=count,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            dtype=self.dtype,
            use_fast_variance=self.use_fast_variance,
        )
        if not use_ra:
            assert self.mean is not None and self.var is not None  # plain BN always tracks (variant=None)
            self.mean[...] = new_mean.astype(self.mean[...].dtype)
            self.var[...] = new_var.astype(self.var[...].dtype)
            if has_count:
                self.count[...] = jnp.asarray(new_count, jnp.float32)
        return y

    @property
    def axis(self) -> int:
        """The feature axis (Flax's attribute), from the layer's convention."""
        return self.convention.feature_axis

    @property
    def momentum(self) -> float | None:
        """The momentum in the convention's own meaning (Flax's: on the running term)."""
        return self.convention.momentum

    @property
    def epsilon(self) -> float:
        """eps (Flax's attribute name), from the layer's convention."""
        return self.convention.eps

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Hook for ``nnx.view(model, use_running_average=...)`` (Flax >= 0.12)."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
