"""Cross-replica (synchronized) Batch Normalization on ``torch.distributed`` (``docs/spec.md`` §11).

:class:`SyncBatchNorm` is :class:`bn_ref.torch.BatchNorm` whose training statistics are those of
the *global* batch: the concatenation of the batches of every rank of a process group. It works
with any backend that implements ``all_gather`` and ``all_reduce`` on the input's device -- gloo
on CPU, NCCL on CUDA -- and needs no CUDA-only call. :func:`convert_sync_batchnorm` swaps the BN
layers of a model for it.

Per training call on a group of P > 1 ranks, rank p holding ``n_p`` values per channel (§11)::

    1. all_gather (C, n_p, ok)                               tiny int64 exchange, checked on every rank (§11.4)
    2. local two-pass (mu_p, M2_p = n_p * var_p)             (§2.1, §8.1); (0, 0) when n_p = 0
       all_gather (mu_p, M2_p) in float64, merged exactly    (Chan et al., §11.1)
           n   = sum_p n_p
           mu  = sum_p n_p mu_p / n
           M2  = sum_p (M2_p + n_p (mu_p - mu)^2),   var = M2 / n
    3. y = weight * (x - mu) / sqrt(var + eps) + bias        (§2.2, §2.3)
    4. running update with the global mu, var and c_n of the global n (§3, §3.4, §11.3)

Backward (§5.1 with the global n and global sums, §11.6): one ``all_reduce`` (float64) of the two
per-channel sums ``sum(dy)`` and ``sum(dy * x_hat)``; then on every rank
``dx = weight * s * (dy - sum_g(dy) / n - x_hat * sum_g(dy * x_hat) / n)``. The gradients of
``weight`` and ``bias`` are each rank's *own* share (local sums), as for every other parameter in
data-parallel training: their sum over ranks (what DDP's gradient all-reduce forms, up to its
1/P averaging) is the single-process gradient on the global batch.

Every rank must call forward (and, when gradients are needed, backward) the same number of
times, as with any collective; a rank with an empty batch (N = 0) takes part, contributes
nothing, returns an empty output and updates its buffers exactly like the others.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .. import _checks
from ..conventions import Convention, ConventionLike, get_convention
from .functional import (
    DeviceMismatchError,
    _cast_grad,
    _dtype_name,
    _input_grad,
    _normalized,
    _standardize,
    batch_statistics,
    compute_dtype,
    inverse_std,
    update_running_,
)
from .modules import TORCH_EPS, TORCH_MOMENTUM, BatchNorm

__all__ = ["SyncBatchNorm", "SyncBatchNormFunction", "convert_sync_batchnorm", "merge_statistics"]


# -- torch.distributed helpers ----------------------------------------------------------------------


def _dist() -> Any:
    """``torch.distributed`` when it is available, else None."""
    if not torch.distributed.is_available():  # pragma: no cover - builds without distributed
        return None
    return torch.distributed


def group_size(process_group: Any = None) -> int:
    """World size of ``process_group`` (the default group when None); 1 when not distributed."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return 1
    return int(dist.get_world_size(process_group))


def _all_gather(t: torch.Tensor, group: Any) -> torch.Tensor:
    """(P, *t.shape): ``t`` of every rank of ``group``, in group-rank order."""
    dist = _dist()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


# -- the exact merge (§11) ----------------------------------------------------------------------------


def merge_statistics(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count-weighted merge of per-replica statistics (Chan et al.; ``docs/spec.md`` §11.1).

    Args:
        counts: (P,) values per channel on each replica, ``n_p >= 0``.
        means: (P, C) per-replica means ``mu_p`` (any finite value where ``n_p = 0``).
        m2s: (P, C) per-replica sums of squared deviations about the replica's own mean,
            ``M2_p = sum (x - mu_p)^2`` (0 where ``n_p = 0``).

    Returns:
        ``(n, mean, var)``: the global count (0-d), the global mean and the global *biased*
        variance (C,), computed in float64::

            n = sum_p n_p,   mu = sum_p n_p mu_p / n,
            M2 = sum_p (M2_p + n_p (mu_p - mu)^2),   var = M2 / n          (§11.1)

    Replicas with ``n_p = 0`` contribute nothing. With ``n = 0`` the statistics are NaN.
    """
    n_p = counts.to(torch.float64).reshape(-1, 1)
    mu_p = means.to(torch.float64)
    n = n_p.sum()
    mean = (n_p * mu_p).sum(dim=0) / n  # §11.1: count-weighted mean
    dev = mu_p - mean
    m2 = (m2s.to(torch.float64) + n_p * dev * dev).sum(dim=0)  # §11.1: Chan's M2
    return n, mean, m2 / n


# -- the autograd Function ----------------------------------------------------------------------------


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BN over the global batch of a process group, closed-form backward (§5.1, §11.6).

    ``apply(x, weight, bias, eps, ax, counts, group) -> (y, mean, var)``:

    * ``x``: this rank's (N, ..., C, ...) input, any N >= 0; ``weight``/``bias``: (C,) or None;
    * ``counts``: tuple of every rank's n (values per channel), in group-rank order, from the
      exchange :class:`SyncBatchNorm` performs first; their sum n must be > 0;
    * ``mean``, ``var``: the global mean and biased variance (C,) in the compute dtype (§8.3),
      non-differentiable (their gradient is part of the closed form of ``dx``).

    Forward: one float64 ``all_gather`` of (mu_p, M2_p), merged by :func:`merge_statistics`.
    Backward: one float64 ``all_reduce`` of (sum dy, sum dy * x_hat); returns ``dx`` for the
    global loss and this rank's share of ``dweight``/``dbias``. Not twice differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        ax: int,
        counts: tuple[int, ...],
        group: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        acc = compute_dtype(x.dtype)
        lay = _checks.layout(x.shape, ax)
        if lay.n > 0:
            mean_l, var_l = batch_statistics(x, ax)  # §2.1, §8.1: two-pass, local
            local = torch.cat([mean_l.to(torch.float64), var_l.to(torch.float64) * lay.n])
        else:
            local = torch.zeros(2 * lay.c, dtype=torch.float64, device=x.device)  # contributes nothing
        gathered = _all_gather(local, group)  # (P, 2C)
        count_t = torch.tensor(counts, dtype=torch.float64, device=x.device)
        n, mean64, var64 = merge_statistics(count_t, gathered[:, : lay.c], gathered[:, lay.c :])  # §11.1
        mean = mean64.to(acc)
        var = var64.to(acc)
        inv_std = inverse_std(var, eps, acc)  # §2.2
        y = _normalized(x, mean, inv_std, weight, bias, lay.bshape)  # §2.2, §2.3
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.layout, ctx.n, ctx.group = lay, int(sum(counts)), group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor | None, _dmean: Any, _dvar: Any):  # type: ignore[override]
        x, weight, mean, inv_std = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        lay, n = ctx.layout, ctx.n
        acc = compute_dtype(x.dtype)
        # Every rank must reach the all_reduce, even one whose output received no gradient.
        dya = torch.zeros(x.shape, dtype=acc, device=x.device) if dy is None else dy.to(acc)
        x_hat = _standardize(x, mean, inv_std, lay.bshape)  # §2.2
        dbeta = dya.sum(dim=lay.reduce)  # §5.1, this rank's share
        dgamma = (dya * x_hat).sum(dim=lay.reduce)  # §5.1, this rank's share
        sums = torch.cat([dbeta, dgamma]).to(torch.float64)
        torch.distributed.all_reduce(sums, group=ctx.group)  # §11.6: global sum(dy), sum(dy * x_hat)
        dbeta_g, dgamma_g = sums[: lay.c].to(acc), sums[lay.c :].to(acc)
        # §5.1 with the global n and the global sums (§11.6)
        inv_std_b = inv_std.reshape(lay.bshape)
        dx = _input_grad(dya, x_hat, inv_std_b, weight, dbeta_g, dgamma_g, n, x.dtype) if needs_x else None
        d_weight = _cast_grad(dgamma, None if weight is None else weight.dtype, needs_w)
        d_bias = _cast_grad(dbeta, ctx.bias_dtype, needs_b)
        return dx, d_weight, d_bias, None, None, None, None


# -- the module ---------------------------------------------------------------------------------------


class SyncBatchNorm(BatchNorm):
    """:class:`bn_ref.torch.BatchNorm` with statistics over the global batch of a process group (§11).

    Same parameters, buffers, ``state_dict`` and conventions as :class:`bn_ref.torch.BatchNorm`
    (any input rank >= 2), plus ``process_group`` (None: the default group). The constructor
    takes ``torch.nn.SyncBatchNorm``'s arguments in torch 2.13's order and with its defaults
    (``process_group`` sixth, ``bias=`` keyword-only), then bn-ref's options keyword-only.

    In training, when ``torch.distributed`` is initialized and the group has more than one rank,
    every rank normalizes with the global mean and biased variance of the concatenated batch
    (exact, count-weighted merge in float64), updates its running statistics with them -- the
    unbiased correction uses the global n (§3.4, §11) -- and the backward pass gives the
    gradients of single-process BN on the global batch (see :class:`SyncBatchNormFunction`).
    Otherwise (eval, not distributed, a group of one rank) it is exactly
    :class:`bn_ref.torch.BatchNorm`.

    Shapes: input (N, C, ...) or (N, ..., C) per the feature axis; N may differ between ranks and
    may be 0 on some of them (not on all). Output: the input's shape and dtype.

    Errors, raised on *every* rank of the group (no rank is left waiting in a collective):
        ValueError: ranks disagree on the number of features (the message lists each rank's);
            an input that fails the local checks on some rank (that rank raises its own error,
            the others name it); a global batch with n = 0 (§7.3) or n = 1 under
            ``single_value="error"`` (§7.1).
    """

    process_group: Any

    def __init__(
        self,
        num_features: int,
        eps: float = TORCH_EPS,
        momentum: float | None = TORCH_MOMENTUM,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        convention: ConventionLike = "pytorch",
        feature_axis: int | None = None,
        implementation: str = "function",
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            convention=convention,
            feature_axis=feature_axis,
            implementation=implementation,
        )
        self.process_group = process_group

    def _synchronized(self) -> bool:
        return self.training and group_size(self.process_group) > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x`` with the global batch statistics in distributed training (§11).

        Falls back to :meth:`bn_ref.torch.BatchNorm.forward` when not training or when the group
        has one rank (or ``torch.distributed`` is not initialized).
        """
        if not self._synchronized():
            return super().forward(x)
        group = self.process_group
        dist = _dist()
        rank = dist.get_rank(group)

        # 1. Local checks (§7.5, §11.4), without raising yet: a rank that raised alone would leave the others
        #    waiting in the next collective.
        local_error: Exception | None = None
        n_local = 0
        try:
            self._check_input_dim(x)
            _checks.check_float_dtype("input", _dtype_name(x.dtype))
            lay = _checks.layout(x.shape, self.feature_axis, name="input")
            ax, n_local = lay.axis, lay.n
            for name, t in (("weight", self.weight), ("bias", self.bias)) + tuple(self.named_buffers(recurse=False)):
                if t is not None and t.device != x.device:
                    raise DeviceMismatchError(f"{name} must be on the device of the input ({x.device}); got {t.device}")
        except (ValueError, TypeError) as exc:
            local_error = exc
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        info = torch.tensor([self.num_features, n_local, int(local_error is None)], dtype=torch.int64, device=device)
        table = _all_gather(info, group).cpu().tolist()  # [[C_p, n_p, ok_p], ...]
        if local_error is not None:
            raise local_error
        bad = [p for p, row in enumerate(table) if not row[2]]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: the input on rank(s) {bad} of the process group failed validation "
                f"(see the error raised there); rank {rank} stops too instead of waiting in a collective"
            )
        channels = [row[0] for row in table]
        if any(cp != self.num_features for cp in channels):
            others = {p: cp for p, cp in enumerate(channels) if p != rank}
            raise ValueError(
                f"{type(self).__name__}: ranks disagree on the number of features: rank {rank} has "
                f"num_features={self.num_features}, the other ranks have {others} (rank: num_features); "
                "every rank of the process group must hold the same layer"
            )
        counts = tuple(int(row[1]) for row in table)
        n = sum(counts)
        # §7.3 / §7.1 on the global batch (§11.4: every rank sees the same n and raises alike).
        try:
            _checks.check_batch(n, x.shape, self.convention, training=True)
        except ValueError as exc:
            raise ValueError(f"{exc}; global n over the {len(counts)} ranks = {n}, per rank {list(counts)}") from None

        # 2.-3. Global statistics and normalization (§11.1, §2.2, §2.3).
        y, mean, var = SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, ax, counts, group)

        # 4. Running update (§3) with the global statistics and the global n (§3.4, §11.3).
        tracked = self.running_mean is not None and self.running_var is not None
        if self.track_running_stats and tracked:
            nbt = self.num_batches_tracked
            count: Any = 0 if nbt is None else nbt
            update_running_(self.running_mean, self.running_var, mean, var, n, convention=self.convention, count=count)
            if nbt is not None:
                nbt.add_(1)
        return y

    def extra_repr(self) -> str:
        pg = "" if self.process_group is None else f", process_group={self.process_group!r}"
        return super().extra_repr() + pg


# -- conversion ---------------------------------------------------------------------------------------

_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _factory_of(module: nn.Module) -> dict[str, Any]:
    """device and dtype of a BN layer's floating tensors (None, None when it has none)."""
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t is not None and t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {"device": None, "dtype": None}


def _to_sync(module: nn.Module, process_group: Any) -> SyncBatchNorm:
    if getattr(module, "variant", None) is not None:  # §13-§16 are single-process rules here
        raise ValueError(f"convert_sync_batchnorm: a layer with variant={module.variant!r} has no synchronized form; "
                         "use variant=None")
    factory = _factory_of(module)
    if isinstance(module, BatchNorm):
        conv: Convention = module.convention
        new = SyncBatchNorm(
            module.num_features,
            convention=conv,
            affine=module.affine,
            bias=module.bias is not None,
            track_running_stats=module.track_running_stats,
            process_group=process_group,
            implementation=module.implementation,
            **factory,
        )
    else:
        # torch.nn BN weights the batch term (§3.1) and stores the unbiased variance (§3.4): the
        # pytorch convention, with the layer's own eps and momentum (None: cumulative, §3.3).
        new = SyncBatchNorm(
            module.num_features,
            convention=get_convention("pytorch"),
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            bias=module.bias is not None,
            track_running_stats=module.track_running_stats,
            feature_axis=1,
            process_group=process_group,
            **factory,
        )
    # Share (not copy) the parameters and buffers, so optimizers keep pointing at them.
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias  # None under bias=False
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(module, name, None))
    new.train(module.training)
    return new


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BN layer of ``module`` by :class:`SyncBatchNorm` (recursively) and return it.

    Converted: :class:`bn_ref.torch.BatchNorm` and its subclasses (their convention is kept,
    ``SyncBatchNorm`` included, which is rebuilt with ``process_group``), and
    ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` (the ``"pytorch"`` convention
    with the layer's ``eps`` and ``momentum``, feature axis 1). The new layers share the old ones'
    parameters and buffers (weights, running statistics, ``num_batches_tracked``: same tensors,
    so same device and dtype) and keep their training mode. Other modules are left as they are;
    if ``module`` itself is a BN layer the new layer is returned. The input rank checks of the
    ``*1d/2d/3d`` classes are not kept (``SyncBatchNorm`` takes any rank >= 2).

    Args:
        module: a model (or a single BN layer).
        process_group: the group the statistics are synchronized over (None: the default group).
    """
    if isinstance(module, (BatchNorm,) + _TORCH_BN):
        return _to_sync(module, process_group)
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, process_group)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
