"""The pure functional core of the PyTorch backend: statistics, normalization, the closed-form
backward as a :class:`torch.autograd.Function`, and the functional :func:`batch_norm`.

Everything numerical follows ``docs/spec.md``; each formula cites its section. The stateful
modules in :mod:`bn_ref.torch.modules` are thin shells around :func:`batch_norm`.

Shapes: ``x`` is (N, C, ...) or (N, ..., C), any rank >= 2, with the feature axis taken from the
convention (or the ``axis`` override); every per-channel tensor (weight, bias, running statistics)
is (C,). ``n = N * prod(spatial)`` is the number of values reduced per channel (§6).

Numerical policy (§8):

* statistics are two-pass (§8.1): the mean first, then the mean of squared deviations; never
  ``E[x^2] - E[x]^2`` (§8.2);
* float16/bfloat16 inputs are computed in float32 (§8.3); float32 and float64 in their own dtype.
  The output has the input's dtype; the gradients have the dtypes of the tensors they belong to;
* weight, bias and running statistics may have another floating dtype than ``x`` (float32
  parameters with a bfloat16 input, say): they are cast to the compute dtype for the arithmetic.

State recursion of the running statistics (§3), with ``b`` the batch statistic and
``k = count + 1`` the training step::

    momentum_on="batch":    r_k = (1 - m) * r_{k-1} + m * b_k          (§3.1, PyTorch)
    momentum_on="running":  r_k = m * r_{k-1} + (1 - m) * b_k          (§3.2, Flax, Keras, ONNX)
    momentum=None:          r_k = (1 - 1/k) * r_{k-1} + (1/k) * b_k    (§3.3, cumulative average)

with ``b = var_B * n / (n - 1)`` fed to the running variance under ``running_var="unbiased"``
(§3.4). The weights come from :meth:`bn_ref.Convention.update_weights` and the factor from
:meth:`bn_ref.Convention.variance_correction`; this module keeps no copy of those rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch

from .. import _checks
from ..conventions import DEFAULT, Convention, ConventionLike, resolve

__all__ = [
    "IMPLEMENTATIONS",
    "DeviceMismatchError",
    "batch_norm",
    "batch_statistics",
    "compute_dtype",
    "inverse_std",
    "normalize",
    "update_running_",
    "BatchNormTrainFunction",
    "BatchNormEvalFunction",
]

IMPLEMENTATIONS = ("function", "autograd")
"""Valid values of ``implementation``: the closed-form ``torch.autograd.Function`` or plain ops."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class DeviceMismatchError(ValueError, RuntimeError):
    """A per-channel tensor (weight, bias, running statistics) on another device than the input.

    A ``ValueError`` (bn-ref's contract for bad input) and the ``RuntimeError`` torch.nn raises for
    the same mistake, as :class:`bn_ref._checks.ShapeMismatchError` is for shapes.
    """


# -- small helpers ---------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype BN arithmetic runs in for an input of ``dtype`` (§8.3).

    float16 and bfloat16 accumulate in float32; float32 and float64 stay as they are.
    """
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _per_channel(t: torch.Tensor | None, dtype: torch.dtype, bshape: Sequence[int]) -> torch.Tensor | None:
    """A (C,) tensor cast to ``dtype`` and shaped to broadcast against x; None stays None."""
    return None if t is None else t.to(dtype).reshape(bshape)


def check_implementation(implementation: object) -> str:
    """``implementation`` must be one of :data:`IMPLEMENTATIONS` (ValueError otherwise)."""
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
    return implementation


# -- the numerical building blocks (differentiable, pure) ------------------------------------
#
# Each formula is written once: the statistics in batch_statistics (§2.1), 1/sqrt(var + eps) in
# inverse_std (§2.2), x_hat in _standardize (§2.2, §4), the affine map in _affine (§2.3), their
# composition in _normalized, the input gradient in _input_grad (§5.1) and the running update in
# update_running_ (§3). The Functions below, the "autograd" path and SyncBatchNorm call them.


def batch_statistics(x: torch.Tensor, ax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and *biased* batch variance, two-pass (§2.1, §8.1).

    ``mean = sum(x) / n``, ``var = sum((x - mean)^2) / n`` over every axis but ``ax``, computed in
    :func:`compute_dtype` of ``x`` (float32 for float16/bfloat16, §8.3).

    Args:
        x: (N, ..., C, ...) floating tensor; ``ax`` is its (non-negative) feature axis.
        ax: the feature axis.

    Returns:
        ``(mean, var)``, both (C,) in the compute dtype. Differentiable.
    """
    red = _checks.reduction_axes(x.ndim, ax)
    xa = x.to(compute_dtype(x.dtype))
    mean = xa.mean(dim=red, keepdim=True)  # §2.1, first pass
    centred = xa - mean
    var = (centred * centred).mean(dim=red, keepdim=True)  # §2.1, second pass (§8.1)
    return mean.reshape(-1), var.reshape(-1)


def inverse_std(var: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """§2.2 / §4: ``1 / sqrt(var + eps)`` per channel, (C,) in ``dtype`` (the compute dtype)."""
    # 1/sqrt rather than rsqrt: autograd of rsqrt forms (var + eps)^(-3/2), which underflows to 0 in
    # float32 once var > ~1e25 (the "autograd" implementation differentiates this); sqrt then the
    # reciprocal keep every factor in range. The closed-form backward (§5.1) needs only the value.
    return 1.0 / torch.sqrt(var.to(dtype) + eps)


def _standardize(x: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor, bshape: Sequence[int]) -> torch.Tensor:
    """§2.2 (training) / §4 (eval): ``x_hat = (x - mean) * inv_std``, in the compute dtype of x.

    ``mean`` and ``inv_std`` are (C,) (batch or running statistics); ``bshape`` is
    :func:`bn_ref._checks.broadcast_shape` of ``x``.
    """
    acc = compute_dtype(x.dtype)
    return (x.to(acc) - mean.to(acc).reshape(bshape)) * inv_std.to(acc).reshape(bshape)


def _affine(
    x_hat: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    acc: torch.dtype,
    bshape: Sequence[int],
) -> torch.Tensor:
    """§2.3: ``y = weight * x_hat + bias``; either term may be absent."""
    y = x_hat
    if weight is not None:
        y = y * _per_channel(weight, acc, bshape)
    if bias is not None:
        y = y + _per_channel(bias, acc, bshape)
    return y


def _normalized(
    x: torch.Tensor,
    mean: torch.Tensor,
    inv_std: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    bshape: Sequence[int],
) -> torch.Tensor:
    """The normalization of §2.2-§2.3 (training) and §4 (eval), in ``x``'s dtype and shape::

        y = weight * (x - mean) * inv_std + bias

    The single place every forward in this backend (both implementations, both modes,
    SyncBatchNorm) turns statistics into outputs.
    """
    acc = compute_dtype(x.dtype)
    return _affine(_standardize(x, mean, inv_std, bshape), weight, bias, acc, bshape).to(x.dtype)


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float,
    ax: int,
) -> torch.Tensor:
    """``y = weight * (x - mean) / sqrt(var + eps) + bias`` per channel (§2.2, §2.3, §4).

    ``mean``/``var`` (C,) are the batch statistics in training and the running statistics in
    eval. Computed in the compute dtype of ``x``; returns a tensor of ``x``'s dtype and shape.
    Differentiable with plain tensor ops (this is the ``"autograd"`` implementation's forward).
    """
    bshape = _checks.broadcast_shape(x.ndim, ax, x.shape[ax])
    return _normalized(x, mean, inverse_std(var, eps, compute_dtype(x.dtype)), weight, bias, bshape)


def _cast_grad(g: torch.Tensor, dtype: torch.dtype | None, needed: bool) -> torch.Tensor | None:
    """A per-channel gradient in the dtype of the tensor it belongs to (None if not needed)."""
    if not needed or dtype is None:
        return None
    return g.to(dtype)


def _input_grad(
    dya: torch.Tensor,
    x_hat: torch.Tensor,
    inv_std_b: torch.Tensor,
    weight: torch.Tensor | None,
    sum_dy: torch.Tensor,
    sum_dy_xhat: torch.Tensor,
    n: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """§5.1: dx = g * inv_std * (dy - sum(dy)/n - x_hat * sum(dy * x_hat)/n), per channel.

    ``dya``, ``x_hat`` are in the compute dtype, ``inv_std_b`` is broadcastable against them, and
    the sums are (C,) over the ``n`` values of each channel (the global ones under §11.6).

    The Jacobian of x -> y in training is this same map (§5.3: it is symmetric per channel), so
    the forward-mode tangent of ``y`` for an input tangent ``t`` is ``_input_grad(t, ...)`` with
    the sums of ``t`` and ``t * x_hat``.
    """
    bshape = inv_std_b.shape
    scale = inv_std_b if weight is None else _per_channel(weight, dya.dtype, bshape) * inv_std_b
    dx = scale * (dya - (sum_dy / n).reshape(bshape) - x_hat * (sum_dy_xhat / n).reshape(bshape))
    return dx.to(out_dtype)


def _add(acc: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if acc is None else acc + term


def _affine_tangent(
    dy: torch.Tensor | None,
    x_hat: torch.Tensor,
    dweight: torch.Tensor | None,
    dbias: torch.Tensor | None,
    bshape: Sequence[int],
    out: torch.Tensor,
) -> torch.Tensor:
    """§2.3 differentiated in ``weight`` and ``bias``: ``dy + dweight * x_hat + dbias``, in out's dtype."""
    acc = x_hat.dtype
    if dweight is not None:
        dy = _add(dy, _per_channel(dweight, acc, bshape) * x_hat)
    if dbias is not None:
        dy = _add(dy, _per_channel(dbias, acc, bshape).expand(x_hat.shape))
    if dy is None:
        return torch.zeros_like(out)
    if dy.shape != x_hat.shape:  # only per-channel tangents (running statistics, bias): broadcast them
        dy = dy.expand(x_hat.shape).contiguous()
    return dy.to(out.dtype)


# -- the closed-form backward as autograd Functions ------------------------------------------


class _TrainCore(torch.autograd.Function):
    """:class:`BatchNormTrainFunction` without the forward-mode rule; see there.

    TorchDynamo cannot trace an ``autograd.Function`` that defines ``jvp``, so
    :func:`batch_norm` applies this class while ``torch.compile`` traces (forward-mode AD does not
    reach compiled code) and :class:`BatchNormTrainFunction` otherwise. Same numbers.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, ax: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, var = batch_statistics(x, ax)  # §2.1
        return normalize(x, mean, var, weight, bias, eps=eps, ax=ax), mean, var  # §2.2, §2.3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        x, weight, bias, eps, ax = inputs
        _, mean, var = output
        inv_std = inverse_std(var, eps, mean.dtype)  # §2.2, bit for bit the forward's
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.save_for_forward(x, weight, mean, inv_std)
        ctx.eps, ctx.layout = eps, _checks.layout(x.shape, ax)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, _dmean: Any, _dvar: Any):  # type: ignore[override]
        x, weight, mean, inv_std = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        if dy is None:
            return None, None, None, None, None
        lay = ctx.layout
        acc = compute_dtype(x.dtype)
        if torch.is_grad_enabled():
            # §5.4: double backward -- recompute the statistics differentiably from x.
            mean, var = batch_statistics(x, lay.axis)
            inv_std = inverse_std(var, ctx.eps, acc)
        dya = dy.to(acc)
        x_hat = _standardize(x, mean, inv_std, lay.bshape)  # §2.2
        dbeta = dya.sum(dim=lay.reduce)  # §5.1
        dgamma = (dya * x_hat).sum(dim=lay.reduce)  # §5.1
        inv_std_b = inv_std.reshape(lay.bshape)
        dx = _input_grad(dya, x_hat, inv_std_b, weight, dbeta, dgamma, lay.n, x.dtype) if needs_x else None
        d_weight = _cast_grad(dgamma, None if weight is None else weight.dtype, needs_w)
        d_bias = _cast_grad(dbeta, ctx.bias_dtype, needs_b)
        return dx, d_weight, d_bias, None, None


class BatchNormTrainFunction(_TrainCore):
    """Training-mode BN with the closed-form gradient of §5.1.

    ``apply(x, weight, bias, eps, ax) -> (y, mean, var)``; ``weight``/``bias`` may be None.
    ``mean`` and ``var`` (C,) are the batch statistics in the compute dtype, returned for the
    running update and marked non-differentiable (the gradient through them is already part of
    the closed form of ``dx``).

    The context keeps ``x``, ``weight``, the batch mean and the inverse standard deviation. The
    first-order backward uses them directly (no recomputation)::

        x_hat  = (x - mean) * inv_std
        dbeta  = sum(dy)                                                  (§5.1)
        dgamma = sum(dy * x_hat)                                          (§5.1)
        dx     = weight * inv_std * (dy - dbeta / n - x_hat * dgamma / n) (§5.1)

    Forward mode (:meth:`jvp`, for ``torch.autograd.forward_ad`` and ``torch.func.jvp``): the
    Jacobian in ``x`` is the same per-channel map, so for tangents ``(tx, tw, tb)``::

        ty = weight * inv_std * (tx - mean(tx) - x_hat * mean(tx * x_hat)) + tw * x_hat + tb

    Double backward (§5.4): when the backward itself is being differentiated
    (``create_graph=True``, seen as ``torch.is_grad_enabled()`` inside ``backward``), the saved
    mean and inverse std are constants to autograd, which would drop their dependence on ``x``
    and give wrong second derivatives. In that case the backward recomputes the statistics from
    the saved ``x`` with differentiable ops (§2.1) and evaluates the same closed form, so autograd
    differentiates an exact expression of ``dx(x, weight, dy)``. Only the double-backward path
    pays for the recomputation.

    ``torch.func.vmap`` runs the forward per sample of the mapped dimension
    (``generate_vmap_rule``).
    """

    @staticmethod
    def jvp(ctx: Any, tx: torch.Tensor | None, tw: torch.Tensor | None, tb: torch.Tensor | None, *_: Any):  # type: ignore[override]
        x, weight, mean, inv_std = ctx.saved_tensors
        lay = ctx.layout
        x_hat = _standardize(x, mean, inv_std, lay.bshape)  # §2.2
        ty = None
        if tx is not None:
            txa = tx.to(x_hat.dtype)
            s_t = txa.sum(dim=lay.reduce)
            s_tx = (txa * x_hat).sum(dim=lay.reduce)
            # §5.1/§5.3: the Jacobian in x is the same per-channel map as the input gradient
            ty = _input_grad(txa, x_hat, inv_std.reshape(lay.bshape), weight, s_t, s_tx, lay.n, x_hat.dtype)
        return _affine_tangent(ty, x_hat, tw, tb, lay.bshape, x), None, None  # §2.3


class _EvalCore(torch.autograd.Function):
    """:class:`BatchNormEvalFunction` without the forward-mode rule (for ``torch.compile``, as
    :class:`_TrainCore`); see there."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        ax: int,
    ) -> torch.Tensor:
        return normalize(x, running_mean, running_var, weight, bias, eps=eps, ax=ax)  # §4, §2.3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, running_mean, running_var, weight, bias, eps, ax = inputs
        inv_std = inverse_std(running_var, eps, compute_dtype(x.dtype))  # §4, bit for bit the forward's
        ctx.save_for_backward(x, running_mean, running_var, weight, inv_std)
        ctx.save_for_forward(x, running_mean, running_var, weight, inv_std)
        ctx.eps, ctx.layout = eps, _checks.layout(x.shape, ax)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None):  # type: ignore[override]
        x, running_mean, running_var, weight, inv_std = ctx.saved_tensors
        needs_x, needs_rm, needs_rv, needs_w, needs_b = ctx.needs_input_grad[:5]
        if dy is None:
            return (None,) * 7
        lay = ctx.layout
        acc = compute_dtype(x.dtype)
        if torch.is_grad_enabled():
            inv_std = inverse_std(running_var, ctx.eps, acc)  # §5.4: keep the dependence on running_var
        dya = dy.to(acc)
        x_hat = _standardize(x, running_mean, inv_std, lay.bshape)  # §4
        dbeta = dya.sum(dim=lay.reduce)  # §5.2
        dgamma = (dya * x_hat).sum(dim=lay.reduce)  # §5.2
        g = None if weight is None else weight.to(acc)
        scale = inv_std if g is None else g * inv_std  # (C,)
        dx = (scale.reshape(lay.bshape) * dya).to(x.dtype) if needs_x else None  # §5.2
        d_rm = (-scale * dbeta).to(running_mean.dtype) if needs_rm else None
        d_rv = (-0.5 * scale * inv_std * dgamma).to(running_var.dtype) if needs_rv else None
        d_weight = _cast_grad(dgamma, None if weight is None else weight.dtype, needs_w)
        d_bias = _cast_grad(dbeta, ctx.bias_dtype, needs_b)
        return dx, d_rm, d_rv, d_weight, d_bias, None, None


class BatchNormEvalFunction(_EvalCore):
    """Eval-mode BN (running statistics) with the closed-form gradient of §5.2.

    ``apply(x, running_mean, running_var, weight, bias, eps, ax) -> y``. The running statistics
    are constants of the layer, so the gradient is the affine map's (§5.2)::

        inv_std = 1 / sqrt(running_var + eps),   x_hat = (x - running_mean) * inv_std
        dx      = weight * inv_std * dy
        dgamma  = sum(dy * x_hat),               dbeta = sum(dy)

    Should the running statistics require grad (unusual; PyTorch's kernel ignores it), their
    gradients are returned too, so this implementation agrees with ``"autograd"``::

        d running_mean = -weight * inv_std * dbeta,   d running_var = -weight * inv_std^2 * dgamma / 2

    Forward mode (:meth:`jvp`) is the same linearization: for tangents ``(tx, tm, tv, tw, tb)``::

        ty = weight * inv_std * (tx - tm - x_hat * inv_std * tv / 2) + tw * x_hat + tb

    The context keeps ``x``, the running statistics, ``weight`` and ``inv_std``; the backward
    reuses ``inv_std`` unless it is being differentiated (``create_graph=True``), in which case it
    is recomputed from ``running_var`` so that its dependence is visible to autograd (§5.4).
    """

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any,
        tx: torch.Tensor | None,
        tm: torch.Tensor | None,
        tv: torch.Tensor | None,
        tw: torch.Tensor | None,
        tb: torch.Tensor | None,
        *_: Any,
    ) -> torch.Tensor:
        x, running_mean, running_var, weight, inv_std = ctx.saved_tensors
        lay = ctx.layout
        x_hat = _standardize(x, running_mean, inv_std, lay.bshape)  # §4
        acc = x_hat.dtype
        # §4 differentiated (as §5.2): tx - tm - x_hat * inv_std * tv / 2 is the tangent of x_hat over inv_std
        inner = None
        if tx is not None:
            inner = tx.to(acc)
        if tm is not None:
            inner = _add(inner, -_per_channel(tm, acc, lay.bshape))
        if tv is not None:
            inner = _add(inner, -0.5 * x_hat * (inv_std.to(acc) * tv.to(acc)).reshape(lay.bshape))
        ty = None
        if inner is not None:
            scale = inv_std.to(acc) if weight is None else weight.to(acc) * inv_std.to(acc)
            ty = scale.reshape(lay.bshape) * inner
        return _affine_tangent(ty, x_hat, tw, tb, lay.bshape, x)  # §2.3


# -- the running update (§3) ---------------------------------------------------------------------


def _ema_(running: torch.Tensor, batch: torch.Tensor, w_running: Any, w_batch: Any) -> None:
    """In place: ``running <- w_running * running + w_batch * batch`` (§3), in the wider dtype."""
    dt = torch.promote_types(running.dtype, batch.dtype)
    running.copy_(running.to(dt) * w_running + batch.to(dt) * w_batch)


def update_running_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    n: Union[int, torch.Tensor],
    *,
    convention: Convention,
    count: Union[int, torch.Tensor] = 0,
) -> None:
    """One training step of the running statistics, in place and outside autograd (§3).

    With ``(w_r, w_b) = convention.update_weights(count)`` (§3.1 momentum on the batch term, §3.2
    on the running term, §3.3 cumulative average for ``momentum=None``)::

        running_mean <- w_r * running_mean + w_b * mean
        running_var  <- w_r * running_var  + w_b * var * convention.variance_correction(n)   # §3.4

    Args:
        running_mean, running_var: (C,) buffers, updated in place (their dtype is kept).
        mean, var: (C,) biased batch statistics; no gradient flows from the update into them.
        n: values per channel behind ``mean``/``var`` (global under cross-replica statistics, §11.3).
        convention: the resolved :class:`bn_ref.Convention`.
        count: training steps already taken (an int, or a 0-d integer tensor such as
            ``num_batches_tracked`` before its increment); only ``momentum=None`` reads it.
    """
    with torch.no_grad():
        if isinstance(count, torch.Tensor):
            count = count.to(torch.float64)  # §3.3: 1 / (count + 1) in float64, not the default dtype
        w_running, w_batch = convention.update_weights(count)  # §3.1-§3.3
        correction = convention.variance_correction(n)  # §3.4
        _ema_(running_mean, mean.detach(), w_running, w_batch)
        _ema_(running_var, var.detach() * correction, w_running, w_batch)


# -- the functional entry point ----------------------------------------------------------------


def _check_tensor(name: str, t: Any, *, optional: bool) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor; got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    _checks.check_float_dtype(name, _dtype_name(t.dtype))


def _check_count(count: Any) -> Union[int, torch.Tensor]:
    """``count``: an int >= 0 or a 0-d integer tensor (such as ``num_batches_tracked``)."""
    if isinstance(count, torch.Tensor):
        if count.ndim != 0 or count.dtype.is_floating_point or count.dtype.is_complex or count.dtype == torch.bool:
            raise ValueError(
                f"count must be an int >= 0 or a 0-d integer tensor (training steps already taken); "
                f"got a tensor of shape {tuple(count.shape)} and dtype {_dtype_name(count.dtype)}"
            )
        return count
    return _checks.check_count(count)


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    training: bool,
    convention: ConventionLike = "pytorch",
    eps: float | None = None,
    momentum: Any = DEFAULT,
    axis: int | None = None,
    count: Union[int, torch.Tensor] = 0,
    implementation: str = "function",
) -> torch.Tensor:
    """Batch Normalization of ``x`` under a convention, updating running statistics in place.

    Training (``training=True``, §2, §3)::

        mean, var = per-channel batch mean and biased variance of x          (§2.1)
        y = weight * (x - mean) / sqrt(var + eps) + bias                      (§2.2, §2.3)
        w_r, w_b = convention.update_weights(count)                           (§3.1-§3.3)
        running_mean <- w_r * running_mean + w_b * mean                       (in place)
        running_var  <- w_r * running_var + w_b * var * variance_correction(n)   (§3.4)

    Eval (``training=False``, §4)::

        y = weight * (x - running_mean) / sqrt(running_var + eps) + bias

    Args:
        x: (N, C, ...) or (N, ..., C) floating tensor of rank >= 2 (float16, bfloat16, float32,
            float64); any strides (channels_last, transposed or sliced views).
        running_mean, running_var: (C,) floating tensors, or None. In training they are updated
            in place under ``torch.no_grad`` when given (both or neither); in eval they are
            required.
        weight, bias: (C,) floating tensors or None (no scale / no shift).
        training: use batch statistics and update the running ones (True), or normalize with
            the running statistics (False). A real bool.
        convention: preset name or :class:`bn_ref.Convention`.
        eps, momentum, axis: per-call overrides of the convention's ``eps``, ``momentum`` and
            ``feature_axis`` (:func:`bn_ref.conventions.resolve`). ``momentum=None`` selects the
            cumulative average (§3.3); the default ``DEFAULT`` keeps the convention's momentum.
        count: training steps already taken (an int, or a 0-d integer tensor such as a module's
            ``num_batches_tracked`` before its increment); only ``momentum=None`` reads it.
        implementation: ``"function"`` (:class:`BatchNormTrainFunction` /
            :class:`BatchNormEvalFunction`, closed-form backward of §5.1/§5.2 with double
            backward) or ``"autograd"`` (plain differentiable ops).

    Returns:
        ``y``, shaped like ``x``, with ``x``'s dtype.

    Raises:
        TypeError: ``x`` or a per-channel argument is not a floating tensor; ``training`` not a
            bool.
        ValueError: rank < 2 or a bad feature axis; a per-channel tensor not shaped (C,) or not
            on the device of ``x``; only
            one of the running statistics given; running statistics missing in eval; an empty
            batch, or n = 1 under ``single_value="error"`` in training (§7.1, §7.3); a bad
            ``count`` or ``implementation``; an invalid override.

    All checks run before anything is computed or updated (§7.5).
    """
    # -- validation (§7.5): everything before any computation or state change --------------------
    training = _checks.check_flag("training", training)
    implementation = check_implementation(implementation)
    conv: Convention = resolve(convention, eps=eps, momentum=momentum, feature_axis=axis)
    _check_tensor("x", x, optional=False)
    lay = _checks.layout(x.shape, conv.feature_axis)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_tensor(name, t, optional=True)
        _checks.check_per_channel(name, None if t is None else t.shape, lay.c, lay.axis, x.shape)
        if t is not None and t.device != x.device:
            raise DeviceMismatchError(f"{name} must be on the device of x ({x.device}); got {t.device}")
    _checks.check_running_pair(running_mean is not None, running_var is not None, training=training)
    count = _check_count(count)
    _checks.check_batch(lay.n, x.shape, conv, training=training)

    # -- eval (§4, §5.2) ---------------------------------------------------------------------------
    if not training:
        if implementation == "function":
            eval_fn = _EvalCore if torch.compiler.is_compiling() else BatchNormEvalFunction
            return eval_fn.apply(x, running_mean, running_var, weight, bias, conv.eps, lay.axis)
        return normalize(x, running_mean, running_var, weight, bias, eps=conv.eps, ax=lay.axis)

    # -- training (§2, §5.1) -------------------------------------------------------------------------
    if implementation == "function":
        train_fn = _TrainCore if torch.compiler.is_compiling() else BatchNormTrainFunction
        y, mean, var = train_fn.apply(x, weight, bias, conv.eps, lay.axis)
    else:
        mean, var = batch_statistics(x, lay.axis)  # §2.1
        y = normalize(x, mean, var, weight, bias, eps=conv.eps, ax=lay.axis)

    # -- running update (§3), outside autograd ---------------------------------------------------------
    if running_mean is not None:
        update_running_(running_mean, running_var, mean, var, lay.n, convention=conv, count=count)  # §3
    return y
