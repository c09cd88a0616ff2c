"""The BN variants of ``docs/spec.md`` §13-§16 on the PyTorch backend.

One function, :func:`batch_norm_variant`, does for a :class:`bn_ref.variants.Variant` what
:func:`bn_ref.torch.batch_norm` does for plain BN: it normalizes ``x``, updates the running
statistics in place, and is differentiable by autograd. It is built from the backend's own
helpers (:func:`~bn_ref.torch.functional.batch_statistics`, :func:`~bn_ref.torch.functional.normalize`,
:func:`~bn_ref.torch.functional.update_running_`) and the :class:`~bn_ref.Convention` rules, so
every variant follows exactly the numerics of the plain layer (two-pass statistics in the compute
dtype, §8). ``bn_ref.variants`` is its NumPy reference.

Shapes: ``x`` (N, C, ...) or (N, ..., C); every per-channel tensor (C,).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .. import _checks
from ..conventions import ConventionLike, get_convention
from ..variants import Variant
from .functional import batch_norm, batch_statistics, normalize, update_running_

__all__ = ["RenormState", "batch_norm_variant"]


@dataclass
class RenormState:
    """The correction pair of Batch Renormalization (§13.3), (C,) tensors updated in place.

    ``stat`` is a variance (``Variant.renorm_track="variance"``) or a stddev (``"stddev"``).
    :meth:`from_running` starts it from the running statistics, the paper's single pair.
    """

    mean: torch.Tensor
    stat: torch.Tensor

    @classmethod
    def from_running(cls, running_mean: torch.Tensor, running_var: torch.Tensor, variant: Variant,
                     eps: float) -> RenormState:
        stat = running_var.clone() if variant.renorm_track == "variance" else torch.sqrt(running_var + eps)
        return cls(running_mean.clone(), stat)


def _chunks(n_batch: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n_batch)) for i in range(0, n_batch, size)]


def batch_norm_variant(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    training: bool,
    variant: Variant,
    convention: ConventionLike = "pytorch",
    count: int = 0,
    renorm: RenormState | None = None,
    implementation: str = "function",
) -> tuple[torch.Tensor, int]:
    """One step of a BN variant; returns ``(y, count after the step)``.

    * ``track_running_stats=False`` (§16.1): batch statistics in training and eval, nothing kept.
    * ``frozen`` (§15) or eval: the running statistics, never updated; ``frozen="all"`` also
      detaches ``weight`` and ``bias`` (no gradient reaches them).
    * ghost batches (§14): each sub-batch of ``ghost_batch_size`` samples is normalized with its own
      statistics; the running statistics take one update per sub-batch (§14.2) or one from the
      mean of the sub-batch statistics (``ghost_update="mean"``, §14.3).
    * renorm (§13): ``y = weight * (x_hat * r + d) + bias`` with ``r``, ``d`` from ``renorm`` (the
      correction pair, updated in place; required) before its update, detached (§13.2).

    ``implementation`` is :func:`~bn_ref.torch.batch_norm`'s, for every step that is plain BN on
    the whole batch or on a sub-batch (renorm's step is built from differentiable ops).
    """
    training = _checks.check_flag("training", training)
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a bn_ref.variants.Variant; got {type(variant).__name__}")
    conv = get_convention(convention)
    count = _checks.check_count(count)
    if not variant.track_running_stats:  # §16.1
        if running_mean is not None or running_var is not None:
            raise ValueError("track_running_stats=False keeps no running statistics: pass running_mean=running_var=None")
        return batch_norm(x, None, None, weight, bias, training=True, convention=conv,
                          implementation=implementation), count
    if variant.frozen != "no" or not training:  # §15, §4
        if variant.frozen == "all":
            weight = None if weight is None else weight.detach()
            bias = None if bias is None else bias.detach()
        return batch_norm(x, running_mean, running_var, weight, bias, training=False, convention=conv,
                          implementation=implementation), count
    if variant.ghost_batch_size is not None:
        return _ghost(x, running_mean, running_var, weight, bias, conv, variant, count, implementation)
    if variant.renorm:
        if renorm is None or running_mean is None or running_var is None:
            raise ValueError("Batch Renormalization needs running_mean, running_var and renorm (a RenormState, §13.3)")
        return _renorm(x, running_mean, running_var, weight, bias, conv, variant, count, renorm)
    return batch_norm(x, running_mean, running_var, weight, bias, training=True, convention=conv, count=count,
                      implementation=implementation), count + 1


def _ghost(x, rm, rv, weight, bias, conv, variant, count, implementation) -> tuple[torch.Tensor, int]:
    lay = _checks.layout(x.shape, conv.feature_axis)
    parts = _chunks(x.shape[0], int(variant.ghost_batch_size))
    for sl in parts:  # every sub-batch is checked before any state changes (§7.5)
        sub = x[sl]
        _checks.check_batch(sub.numel() // max(sub.shape[lay.axis], 1), tuple(sub.shape), conv, training=True)
    if variant.ghost_update == "sequential" or rm is None:  # §14.2
        ys = []
        for j, sl in enumerate(parts):
            ys.append(batch_norm(x[sl], rm, rv, weight, bias, training=True, convention=conv, count=count + j,
                                 implementation=implementation))
        return torch.cat(ys, dim=0), count + len(parts)
    # §14.3: normalize each sub-batch, then one update from the mean of the sub-batch statistics.
    ys, means, fed = [], [], []
    for sl in parts:
        sub = x[sl]
        ys.append(batch_norm(sub, None, None, weight, bias, training=True, convention=conv,
                             implementation=implementation))
        mean, var = batch_statistics(sub.detach(), lay.axis)
        n_j = sub.numel() // sub.shape[lay.axis]
        means.append(mean)
        fed.append(var * conv.variance_correction(n_j))
    # n = 1: the variances fed are already estimator-corrected per sub-batch (factor 1, §3.4).
    update_running_(rm, rv, torch.stack(means).mean(0), torch.stack(fed).mean(0), 1, convention=conv, count=count)
    return torch.cat(ys, dim=0), count + 1


def _renorm(x, rm, rv, weight, bias, conv, variant, count, state: RenormState) -> tuple[torch.Tensor, int]:
    lay = _checks.layout(x.shape, conv.feature_axis)
    _checks.check_batch(lay.n, tuple(x.shape), conv, training=True)
    eps = conv.eps
    mean, var = batch_statistics(x, lay.axis)  # §2.1, differentiable
    std_b = torch.sqrt(var.detach() + eps)
    if variant.renorm_track == "variance":
        sigma = torch.sqrt(state.stat.to(std_b.dtype) + eps)
    else:
        sigma = torch.clamp(state.stat.to(std_b.dtype), min=math.sqrt(eps))
    lo, hi = variant.r_bounds
    r = torch.clamp(std_b / sigma, min=lo, max=hi)  # §13.1, constants of the step (§13.2)
    d = (mean.detach() - state.mean.to(std_b.dtype)) / sigma
    if variant.dmax is not None:
        d = torch.clamp(d, min=-variant.dmax, max=variant.dmax)
    g = torch.ones_like(r) if weight is None else weight.to(r.dtype)
    b = torch.zeros_like(r) if bias is None else bias.to(r.dtype)
    y = normalize(x, mean, var, g * r, g * d + b, eps=eps, ax=lay.axis)  # gamma * (x_hat r + d) + beta
    update_running_(rm, rv, mean, var, lay.n, convention=conv, count=count)  # §3
    m = conv.momentum if variant.renorm_momentum is None else variant.renorm_momentum
    w_r, w_b = dataclasses.replace(conv, momentum=m).update_weights(count)  # §13.3: the pair's own weights
    with torch.no_grad():
        batch_stat = var.detach() * conv.variance_correction(lay.n) if variant.renorm_track == "variance" else std_b
        state.mean.copy_(w_r * state.mean + w_b * mean.detach().to(state.mean.dtype))
        state.stat.copy_(w_r * state.stat + w_b * batch_stat.to(state.stat.dtype))
    return y, count + 1
