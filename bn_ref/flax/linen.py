"""bn-ref Batch Normalization as a ``flax.linen`` module: a thin shell over :mod:`bn_ref.jax`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import _checks
from ..conventions import DEFAULT, Convention, ConventionLike, resolve
from ..jax import batch_norm
from ..jax.variants import RenormState, VariantOutput, batch_norm_variant
from ..variants import Variant

__all__ = ["BatchNorm"]


def layer_convention(convention: ConventionLike, *, axis: Any, momentum: Any, epsilon: Any, eps: Any) -> Convention:
    """The layer's :class:`Convention` from Flax's arguments (``epsilon``) and bn-ref's (``eps``)."""
    if epsilon is not None and eps is not None:
        raise ValueError(
            f"give epsilon (Flax's name) or eps (bn-ref's), not both; got epsilon={epsilon!r} and eps={eps!r}"
        )
    return resolve(convention, eps=epsilon if epsilon is not None else eps, momentum=momentum, feature_axis=axis)


def check_variant(variant: Any, *, axis_name: Any, use_fast_variance: Any) -> Variant | None:
    """The layer's ``variant`` argument, checked against the options it cannot combine with.

    ``variant=None`` is plain BN (every option allowed). A :class:`~bn_ref.variants.Variant` runs
    :func:`bn_ref.jax.variants.batch_norm_variant`, which has no cross-device statistics (the spec
    gives none for §13-§14) and always computes the two-pass variance of §8.1.

    Raises:
        TypeError: ``variant`` is neither None nor a ``Variant``.
        ValueError: ``axis_name`` or ``use_fast_variance=True`` together with a variant.
    """
    if variant is None:
        return None
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a bn_ref.variants.Variant or None; got {type(variant).__name__}: {variant!r}")
    if axis_name is not None:
        raise ValueError(
            f"axis_name={axis_name!r} (cross-device statistics, docs/spec.md §11) is not specified for the BN variants "
            f"of §13-§16; got variant={variant!r}: use one device, or variant=None"
        )
    if use_fast_variance:
        raise ValueError(
            "use_fast_variance=True (Flax's one-pass variance, §8.2) is not offered with a variant, which computes the "
            f"two-pass variance of §8.1; got variant={variant!r}: pass use_fast_variance=False"
        )
    return variant


def check_variant_mask(variant: Variant | None, mask: Any) -> None:
    """A ``mask`` (§11.5) has no meaning for the variants (§13-§16): refused with a variant."""
    if variant is not None and mask is not None:
        raise ValueError(f"mask is not supported with a variant (docs/spec.md §13-§16 define none); got variant={variant!r} "
                         "and a mask: pass mask=None, or variant=None")


def separate_renorm_pair(variant: Variant | None, conv: Convention) -> bool:
    """Whether Batch Renormalization needs its own correction pair (§13.3).

    With ``renorm_track="variance"`` and ``renorm_momentum`` unset (or equal to the layer's
    momentum) the correction pair follows the same recursion as the running pair, from the same
    start, so it *is* the running pair: no extra state. Otherwise it is kept as two more (C,)
    statistics, ``renorm_mean`` and ``renorm_stat`` (a variance, or under ``"stddev"`` the averaged
    standard deviation), started from the running pair's initial values (0, 1) as
    :meth:`~bn_ref.jax.variants.RenormState.from_running` maps them.
    """
    if variant is None or not variant.renorm:
        return False
    return variant.renorm_track == "stddev" or (
        variant.renorm_momentum is not None and variant.renorm_momentum != conv.momentum
    )


def variant_step(
    x: jax.Array,
    scale: Any,
    bias: Any,
    mean: Any,
    var: Any,
    renorm_pair: tuple[Any, Any] | None,
    *,
    training: bool,
    variant: Variant,
    conv: Convention,
    count: Any,
    dtype: Any,
) -> VariantOutput:
    """One call of a layer with a variant: validation, then :func:`bn_ref.jax.variants.batch_norm_variant`.

    The one computation path of both Flax layers (linen and NNX) with a variant, so they agree bit
    for bit. ``renorm_pair`` is the stored ``(renorm_mean, renorm_stat)``, or None when the running
    pair serves as the correction pair (:func:`separate_renorm_pair`). Every per-channel array is
    checked to be (C,) before anything is computed (§7.5). ``y`` is cast to ``dtype`` when given.
    """
    lay = _checks.layout(x.shape, conv.feature_axis)
    arrays = {"scale": scale, "bias": bias, "mean": mean, "var": var}
    if renorm_pair is not None:
        arrays.update(renorm_mean=renorm_pair[0], renorm_stat=renorm_pair[1])
    for name, a in arrays.items():
        if a is not None:
            a = jnp.asarray(a)
            _checks.check_float_dtype(name, jnp.dtype(a.dtype).name)
            _checks.check_per_channel(name, a.shape, lay.c, lay.axis, x.shape)
    state = None
    if variant.renorm:
        state = (
            RenormState(jnp.asarray(renorm_pair[0]), jnp.asarray(renorm_pair[1]))
            if renorm_pair is not None
            else RenormState.from_running(mean, var, variant, conv.eps)  # the running pair itself (§13.3)
        )
    out = batch_norm_variant(
        x, scale, bias, mean, var, training=training, variant=variant, convention=conv, count=count, renorm=state
    )
    if dtype is not None:
        out = out._replace(y=out.y.astype(dtype))
    return out


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
    :class:`bn_ref.Convention`), ``eps`` (bn-ref's spelling of ``epsilon``; give one) and
    ``variant``: None (plain BN, everything above) or a :class:`bn_ref.variants.Variant` -- Batch
    Renormalization (§13), ghost batches (§14), frozen BN (§15), no running statistics (§16.1) --
    computed by :func:`bn_ref.jax.variants.batch_norm_variant`; see "With a variant" below.

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

    With a variant (the §17 modes matrix; ``use_running_average=True`` is eval):

    * ``Variant(renorm=True, ...)``: training output ``scale * (x_hat * r + d) + bias`` (§13.1),
      ``r``/``d`` constants for the gradient (§13.2); eval is §4. With ``renorm_track="stddev"``
      or a ``renorm_momentum`` other than the layer's, the correction pair is two more variables
      ``batch_stats/renorm_mean`` and ``batch_stats/renorm_stat`` (C,), updated with the running
      pair; otherwise the running pair is the correction pair (§13.3) and the variables are
      Flax's.
    * ``Variant(ghost_batch_size=v)``: sub-batches of ``v`` samples along axis 0, each with its own
      statistics; one running update per sub-batch (§14.2) or one from their means (§14.3).
    * ``Variant(frozen="statistics")``: training normalizes with ``mean``/``var`` and never updates
      them (§15); ``frozen="all"``: moreover ``scale`` and ``bias`` get a **zero** gradient (they
      stay ``params``, so checkpoints and optimizers see the same tree; a weight decay would
      still move them).
    * ``Variant(track_running_stats=False)``: no ``mean``/``var`` variables at all; every call,
      also with ``use_running_average=True``, normalizes with the batch statistics (§16.1).

    A variant cannot be combined with ``axis_name``, ``use_fast_variance=True`` or ``mask``
    (``ValueError`` naming the argument, before any variable changes). The update rule of §3.6
    (mutable ``batch_stats``, not initialising) is the same.

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
    variant: Variant | None = None

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
        variant = check_variant(self.variant, axis_name=self.axis_name, use_fast_variance=self.use_fast_variance)
        check_variant_mask(variant, mask)
        x = jnp.asarray(x)
        _checks.check_float_dtype("x", jnp.dtype(x.dtype).name)
        lay = _checks.layout(x.shape, conv.feature_axis)
        shape = (lay.c,)

        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        tracked = variant is None or variant.track_running_stats  # §16.1: none kept
        ra_mean = ra_var = None
        if tracked:
            ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, self.param_dtype))
            ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, self.param_dtype))
        # The step counter is created only where the rule needs it (momentum=None, §3.3), so
        # Flax's own variables (mean/var only) load, and an immutable collection without it still
        # runs. One that is given (e.g. ported from PyTorch's num_batches_tracked) keeps counting.
        ra_count = None
        if tracked and (self.has_variable("batch_stats", "count") or (
            conv.momentum is None and self.is_mutable_collection("batch_stats")
        )):
            ra_count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))

        initializing = self.is_initializing()
        updating = not use_ra and not initializing and self.is_mutable_collection("batch_stats")
        if variant is not None:
            pair = None
            if separate_renorm_pair(variant, conv):  # §13.3
                start = RenormState.from_running(
                    jnp.zeros(shape, self.param_dtype), jnp.ones(shape, self.param_dtype), variant, conv.eps
                )
                pair = (
                    self.variable("batch_stats", "renorm_mean", lambda: start.mean.astype(self.param_dtype)),
                    self.variable("batch_stats", "renorm_stat", lambda: start.stat.astype(self.param_dtype)),
                )
            out = variant_step(
                x,
                scale,
                bias,
                None if ra_mean is None else ra_mean.value,
                None if ra_var is None else ra_var.value,
                None if pair is None else (pair[0].value, pair[1].value),
                training=not use_ra,
                variant=variant,
                conv=conv,
                count=0 if ra_count is None else ra_count.value,
                dtype=self.dtype,
            )
            if updating and tracked and variant.frozen == "no":  # §3.6; frozen never updates (§15)
                assert ra_mean is not None and ra_var is not None
                ra_mean.value = jnp.asarray(out.running_mean).astype(ra_mean.value.dtype)
                ra_var.value = jnp.asarray(out.running_var).astype(ra_var.value.dtype)
                if ra_count is not None:
                    ra_count.value = jnp.asarray(out.count, jnp.int32)
                if pair is not None:
                    assert out.renorm is not None
                    pair[0].value = out.renorm.mean.astype(pair[0].value.dtype)
                    pair[1].value = out.renorm.stat.astype(pair[1].value.dtype)
            return out.y

        assert ra_mean is not None and ra_var is not None
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
        if updating:
            ra_mean.value = new_mean
            ra_var.value = new_var
            if ra_count is not None:
                ra_count.value = jnp.asarray(new_count, jnp.int32)
        return y
