"""Folding an eval-mode BN into the preceding convolution or dense layer (``docs/spec.md`` §12).

Eval BN is the per-channel affine map ``y = a z + d`` with ``a = gamma / sqrt(var + eps)`` and
``d = beta - a mean`` (§4). When ``z = W x + b`` is a convolution or dense layer, the pair is the
single layer (§12.1)::

    W'[o, ...] = a[o] * W[o, ...]          b'[o] = a[o] * (b[o] - mean[o]) + beta[o]

``o`` is the output-channel axis of the weight: 0 for PyTorch (conv ``(O, I, *k)``, Linear
``(out, in)``), -1 for Flax (conv ``(*k, I, O)``, Dense ``(in, out)``). The factors are computed
in float64 by the oracle and in ``promote(dtype, float32)`` by the backends, and ``W'``, ``b'``
are rounded once to the layer's parameter dtype (§12.2); :func:`fold_error_units` measures a
fold against the oracle with the elementwise bound of §12.3.

* :func:`fold_numpy` -- the oracle (NumPy, float64 arithmetic);
* :func:`fold_torch` -- torch tensors, and :func:`fold_torch_modules` for a ``Conv*d``/``Linear``
  followed by any BN module with running statistics (returns a new layer with a bias);
* :func:`fold_jax` -- JAX arrays (Flax layouts by default);
* :func:`fold` -- dispatches on the argument types (``bn_ref.fold``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..conventions import ConventionLike, get_convention

__all__ = ["fold", "fold_numpy", "fold_torch", "fold_torch_modules", "fold_jax", "fold_error_units", "C_FOLD",
           "eval_bn_affine"]

C_FOLD = 8.0
"""Elementwise bound of a fold in units of the parameter dtype's unit round-off (§12.3)."""


def _eps(convention: ConventionLike, eps: float | None) -> float:
    return float(eps) if eps is not None else get_convention(convention).eps


def _check(weight_shape: tuple[int, ...], out_axis: int, bias: Any, **per_channel: Any) -> int:
    if len(weight_shape) < 2:
        raise ValueError(f"weight must have rank >= 2 (a dense or conv weight); got shape {weight_shape}")
    ax = out_axis % len(weight_shape)
    c = weight_shape[ax]
    for name, v in list(per_channel.items()) + [("bias", bias)]:
        if v is None:
            continue
        if tuple(np.shape(v)) != (c,):
            raise ValueError(f"{name} must have shape ({c},) (the weight's {c} output channels on axis {out_axis}); "
                             f"got {tuple(np.shape(v))}")
    return ax


def eval_bn_affine(gamma: Any, beta: Any, mean: Any, var: Any, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The float64 per-channel ``(a, d)`` of eval BN (§4): ``a = gamma / sqrt(var + eps)``, ``d = beta - a mean``.

    ``gamma``/``beta`` None mean 1 / 0."""
    mean = np.asarray(mean, np.float64)
    var = np.asarray(var, np.float64)
    g = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64)
    b = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64)
    a = g / np.sqrt(var + eps)
    return a, b - a * mean


def fold_numpy(
    weight: Any, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any, *,
    convention: ConventionLike = "pytorch", eps: float | None = None, out_axis: int = 0,
    dtype: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The oracle fold (§12.1): float64 arithmetic, ``W'`` and ``b'`` rounded once to ``dtype``.

    Args:
        weight: conv or dense weight with output channels on ``out_axis``; ``bias``: (C,) or None.
        gamma, beta: (C,) BN scale and shift or None; ``mean``, ``var``: (C,) running statistics.
        convention, eps: eps is the convention's unless given (§4).
        dtype: the dtype to round to; default the weight's (float64 for non-arrays).

    Returns:
        ``(W', b')`` as NumPy arrays of ``dtype`` (``b'`` always present).
    """
    e = _eps(convention, eps)
    w = np.asarray(weight)
    ax = _check(w.shape, out_axis, bias, gamma=gamma, beta=beta, mean=mean, var=var)
    out_dtype = np.dtype(dtype) if dtype is not None else (w.dtype if np.issubdtype(w.dtype, np.floating) else np.float64)
    a, _ = eval_bn_affine(gamma, beta, mean, var, e)
    bshape = [1] * w.ndim
    bshape[ax] = -1
    b0 = np.zeros_like(a) if bias is None else np.asarray(bias, np.float64)
    beta64 = np.zeros_like(a) if beta is None else np.asarray(beta, np.float64)
    w_f = np.asarray(w, np.float64) * a.reshape(bshape)
    b_f = a * (b0 - np.asarray(mean, np.float64)) + beta64
    return w_f.astype(out_dtype), b_f.astype(out_dtype)


def fold_torch(
    weight: Any, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any, *,
    convention: ConventionLike = "pytorch", eps: float | None = None, out_axis: int = 0,
) -> tuple[Any, Any]:
    """The fold on torch tensors (§12.1-12.2): computed in ``promote(weight.dtype, float32)``,
    rounded to ``weight.dtype``. Returns detached ``(W', b')``."""
    import torch

    e = _eps(convention, eps)
    ax = _check(tuple(weight.shape), out_axis, bias, gamma=gamma, beta=beta, mean=mean, var=var)
    ct = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        m = mean.to(ct)
        a = torch.rsqrt(var.to(ct) + e)
        if gamma is not None:
            a = gamma.to(ct) * a
        shape = [1] * weight.ndim
        shape[ax] = -1
        w_f = (weight.to(ct) * a.reshape(shape)).to(weight.dtype)
        b0 = torch.zeros_like(m) if bias is None else bias.to(ct)
        b_f = a * (b0 - m)
        if beta is not None:
            b_f = b_f + beta.to(ct)
        return w_f.detach(), b_f.to(weight.dtype).detach()


def fold_torch_modules(layer: Any, bn: Any, *, convention: ConventionLike = "pytorch") -> Any:
    """A new ``Conv1d/2d/3d`` or ``Linear`` equal to ``bn(layer(x))`` in eval (§12), with a bias.

    ``bn``: ``torch.nn.BatchNorm*d`` or ``bn_ref.torch.BatchNorm*`` with running statistics (its own
    ``eps`` is used when it has one). The input modules are not modified.

    Raises:
        TypeError: ``layer`` is not a Conv*d or Linear (transposed convs are refused).
        ValueError: ``bn`` has no running statistics, or its size differs from the layer's outputs.
    """
    import copy

    import torch

    if isinstance(layer, torch.nn.modules.conv._ConvTransposeNd) or not isinstance(
            layer, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)):
        raise TypeError(f"layer must be torch.nn.Conv1d/2d/3d or Linear; got {type(layer).__name__}")
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): there is no eval affine map to fold")
    eps = getattr(bn, "eps", None)
    w_f, b_f = fold_torch(layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                          convention=convention, eps=eps, out_axis=0)
    new = copy.deepcopy(layer)
    if new.bias is None:
        new.bias = torch.nn.Parameter(torch.empty_like(b_f))
    with torch.no_grad():
        new.weight.copy_(w_f)
        new.bias.copy_(b_f)
    return new


def fold_jax(
    kernel: Any, bias: Any, scale: Any, bn_bias: Any, mean: Any, var: Any, *,
    convention: ConventionLike = "flax", eps: float | None = None, out_axis: int = -1,
) -> tuple[Any, Any]:
    """The fold on JAX arrays (§12.1-12.2), Flax layouts by default (output channels last).

    Computed in ``promote(kernel.dtype, float32)``, rounded to ``kernel.dtype``; jit-compatible."""
    import jax.numpy as jnp

    e = _eps(convention, eps)
    kernel = jnp.asarray(kernel)
    ax = _check(tuple(kernel.shape), out_axis, bias, scale=scale, bn_bias=bn_bias, mean=mean, var=var)
    ct = jnp.promote_types(kernel.dtype, jnp.float32)
    a = 1.0 / jnp.sqrt(jnp.asarray(var, ct) + e)
    if scale is not None:
        a = jnp.asarray(scale, ct) * a
    shape = [1] * kernel.ndim
    shape[ax] = -1
    m = jnp.asarray(mean, ct)
    b0 = jnp.zeros_like(m) if bias is None else jnp.asarray(bias, ct)
    b_f = a * (b0 - m)
    if bn_bias is not None:
        b_f = b_f + jnp.asarray(bn_bias, ct)
    return (kernel.astype(ct) * a.reshape(shape)).astype(kernel.dtype), b_f.astype(kernel.dtype)


def fold(weight: Any, bias: Any, gamma: Any = None, beta: Any = None, mean: Any = None, var: Any = None, **kw: Any) -> Any:
    """Fold an eval-mode BN into the preceding layer (``docs/spec.md`` §12).

    * ``fold(conv_or_linear, bn_module)`` -- PyTorch modules: a new layer (:func:`fold_torch_modules`);
    * ``fold(W, b, gamma, beta, mean, var, convention=..., out_axis=...)`` -- torch tensors
      (:func:`fold_torch`), JAX arrays (:func:`fold_jax`, default ``out_axis=-1``) or NumPy
      arrays (:func:`fold_numpy`, the oracle).
    """
    mod = type(weight).__module__
    if hasattr(weight, "weight") and hasattr(bias, "running_mean"):
        return fold_torch_modules(weight, bias, **kw)
    if mod.startswith("torch"):
        return fold_torch(weight, bias, gamma, beta, mean, var, **kw)
    if mod.startswith("jax") or mod.startswith("jaxlib"):
        return fold_jax(weight, bias, gamma, beta, mean, var, **kw)
    return fold_numpy(weight, bias, gamma, beta, mean, var, **kw)


def fold_error_units(
    weight: Any, bias: Any, expected_weight: Any, expected_bias: Any, dtype: Any, *,
    gamma: Any, beta: Any, mean: Any, var: Any, layer_bias: Any, eps: float, out_axis: int = 0,
) -> dict[str, float]:
    """A fold's error against the oracle's float64 fold, in units of the §12.3 bound.

    Weight: ``|W' - W'_exact| <= C_FOLD * u * |W'_exact|`` elementwise; bias:
    ``|b' - b'_exact| <= C_FOLD * u * (|a| (|b| + |mean|) + |beta|)``, plus the dtype's smallest
    subnormal (values that underflow). ``expected_*`` are float64 (``fold_numpy(..., dtype=float64)``
    on the inputs rounded to ``dtype``). Returns ``{"weight": units, "bias": units}``.
    """
    from ..tolerances import tolerance

    dt = np.dtype(dtype) if str(dtype) != "bfloat16" else None
    u = tolerance(dtype).u
    tiny = float(np.finfo(dt).smallest_subnormal) if dt is not None else 2.0**-133
    ew = np.asarray(expected_weight, np.float64)
    eb = np.asarray(expected_bias, np.float64)
    a, _ = eval_bn_affine(gamma, beta, mean, var, eps)
    b0 = np.zeros_like(a) if layer_bias is None else np.abs(np.asarray(layer_bias, np.float64))
    bt = np.zeros_like(a) if beta is None else np.abs(np.asarray(beta, np.float64))
    bound_b = C_FOLD * u * (np.abs(a) * (b0 + np.abs(np.asarray(mean, np.float64))) + bt) + tiny
    bound_w = C_FOLD * u * np.abs(ew) + tiny
    dw = np.abs(np.asarray(weight, np.float64) - ew)
    db = np.abs(np.asarray(bias, np.float64) - eb)
    del out_axis
    return {"weight": float(np.max(dw / bound_w)), "bias": float(np.max(db / bound_b))}
