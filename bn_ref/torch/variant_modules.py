"""Module-level pieces of the BN variants on the PyTorch backend (``docs/spec.md`` §15, §16.2).

* :class:`FrozenBatchNorm2d` -- a drop-in for ``torchvision.ops.FrozenBatchNorm2d``: BN whose
  statistics and affine parameters are all buffers, ``Variant(frozen="all")`` in both modes (§15).
* :func:`precise_bn_` -- recompute the population statistics of every BN layer of a model over K
  batches after training (§16.2, the cumulative average of §3.3).

The layers with a :class:`bn_ref.variants.Variant` themselves are :class:`bn_ref.torch.BatchNorm1d`
/ ``2d`` / ``3d`` (``variant=``).

Example::

    >>> import torch, bn_ref.torch as bnt
    >>> from bn_ref.variants import Variant
    >>> layer = bnt.BatchNorm2d(3, variant=Variant(renorm=True, rmax=3.0, dmax=5.0))
    >>> layer(torch.randn(4, 3, 2, 2)).shape
    torch.Size([4, 3, 2, 2])
    >>> frozen = bnt.FrozenBatchNorm2d(3)
    >>> frozen.load_state_dict(layer.state_dict())  # num_batches_tracked is dropped
    <All keys matched successfully>
    >>> torch.equal(frozen.running_mean, layer.running_mean)
    True
    >>> bnt.precise_bn_(layer, [torch.randn(8, 3, 2, 2) for _ in range(4)])
    4
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .. import _checks
from .modules import BatchNorm

__all__ = ["FrozenBatchNorm2d", "precise_bn_"]


class FrozenBatchNorm2d(nn.Module):
    """BN with frozen statistics and affine parameters, for (N, C, H, W) input (§15, ``frozen="all"``).

    A drop-in for ``torchvision.ops.FrozenBatchNorm2d``: the same constructor
    ``(num_features, eps=1e-5)``, the same four buffers ``weight`` (ones), ``bias`` (zeros),
    ``running_mean`` (zeros), ``running_var`` (ones), all (C,) in the default dtype, the same
    ``repr``, and the same forward numbers -- computed in torchvision's order, the fold of §12::

        scale = weight * rsqrt(running_var + eps)          # (C,)
        shift = bias - running_mean * scale
        y     = x * scale + shift                          # §4 with the statistics constant

    Nothing is a parameter, so no gradient reaches ``weight`` and ``bias``; ``dx = dy * scale``
    (§5.2). ``.train()`` changes nothing. A ``state_dict`` of ``torch.nn.BatchNorm2d`` or
    :class:`bn_ref.torch.BatchNorm2d` loads strictly: ``num_batches_tracked`` is dropped on load,
    as torchvision does.

    ``eps``: torchvision added it with default 0 in 2020 (pytorch/vision#2190; before, the layer had
    no eps at all) and changed the default to 1e-5 later that year (pytorch/vision#2933), so that a
    frozen backbone matches the ``torch.nn.BatchNorm2d`` it was trained with; its detection models
    whose weights were made under eps 0 set it back with ``overwrite_eps(model, 0.0)``
    (pytorch/vision#2940). A checkpoint made under eps 0 needs ``eps=0.0`` here too. 1e-5 is the
    ``"pytorch"`` convention's eps (§9).

    Shapes: input (N, C, H, W) floating; output the same shape, in the type promotion of the
    input's and the buffers' dtypes (as torchvision).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = _checks.check_num_features(num_features)
        if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite real number >= 0; got {eps!r}")
        self.eps: float = float(eps)
        self.register_buffer("weight", torch.ones(self.num_features))
        self.register_buffer("bias", torch.zeros(self.num_features))
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_var", torch.ones(self.num_features))

    @classmethod
    def from_batch_norm(cls, bn: nn.Module) -> FrozenBatchNorm2d:
        """A frozen copy of a channels-first BN layer with running statistics (``torch.nn`` or bn-ref).

        Raises:
            ValueError: ``bn`` keeps no running statistics, or (bn-ref) its feature axis is not 1.
        """
        rm, rv = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
        if rm is None or rv is None:
            raise ValueError(f"from_batch_norm needs a BN layer with running statistics; got {type(bn).__name__} without")
        if isinstance(bn, BatchNorm) and _checks.normalize_axis(4, bn.feature_axis) != 1:
            raise ValueError(f"from_batch_norm needs feature axis 1 (NCHW); got feature_axis={bn.feature_axis}")
        new = cls(int(rm.shape[0]), eps=float(bn.eps))
        with torch.no_grad():
            w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
            new.weight.copy_(w.detach() if w is not None else torch.ones_like(new.weight))
            new.bias.copy_(b.detach() if b is not None else torch.zeros_like(new.bias))
            new.running_mean.copy_(rm)
            new.running_var.copy_(rv)
        return new.to(device=rm.device)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d checkpoint loads strictly
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x * scale + shift`` with the (C,) buffers folded as above (§15, §12)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor; got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"FrozenBatchNorm2d expected 4D input (N, C, H, W) (got {x.ndim}D input of shape {tuple(x.shape)})")
        if x.shape[1] != self.num_features:
            raise _checks.ShapeMismatchError(
                f"FrozenBatchNorm2d({self.num_features}) expected {self.num_features} channels on axis 1; "
                f"got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()  # §12.1: a = gamma / sqrt(var + eps)
        shift = b - rm * scale  # beta - mean * a
        return x * scale + shift

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weight.shape[0]}, eps={self.eps})"


_TORCH_BN = nn.modules.batchnorm._BatchNorm


def _precise_targets(model: nn.Module) -> list[nn.Module]:
    out = []
    for m in model.modules():
        if isinstance(m, BatchNorm):
            v = m.variant
            if m.track_running_stats and m.running_mean is not None and (v is None or v.frozen == "no"):
                out.append(m)
        elif isinstance(m, _TORCH_BN) and m.track_running_stats and m.running_mean is not None:
            out.append(m)
    return out


def _input_of(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def precise_bn_(model: nn.Module, batches: Iterable[Any], *, num_batches: int | None = None) -> int:
    """Recompute the running statistics of every BN layer of ``model`` over K batches (§16.2).

    Each layer's ``running_mean`` / ``running_var`` becomes the cumulative average of §3.3 over the
    K batches -- the mean of its K batch means and of its K estimator-corrected batch variances
    (the convention's §3.4 rule), fvcore's precise BN and :func:`bn_ref.variants.precise_statistics`
    with ``pooled=False``. During the pass the BN layers run in training mode as plain BN (a
    ``variant`` is set aside: each layer normalizes the whole batch with its statistics), the other
    modules keep their mode, and nothing is differentiated.

    Layers: :class:`bn_ref.torch.BatchNorm` (any subclass) and ``torch.nn`` BN with running
    statistics; frozen layers (``variant.frozen != "no"``) and :class:`FrozenBatchNorm2d` are left
    alone. Afterwards every layer gets back its momentum, variant, training flag and
    ``num_batches_tracked``, and renorm's correction pair is untouched. If a forward call raises,
    every layer's statistics are restored before the error propagates.

    Args:
        model: the network (a module).
        batches: an iterable of inputs -- tensors, or tuples/lists whose first item is the input
            (a data loader's ``(x, y)``).
        num_batches: use at most this many batches (None: all).

    Returns:
        K, the number of batches used.

    Raises:
        ValueError: ``model`` has no BN layer with running statistics; no batch was given;
            ``num_batches`` not an int >= 1.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if num_batches is not None and (not isinstance(num_batches, numbers.Integral) or isinstance(num_batches, bool)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be an int >= 1 or None; got {num_batches!r}")
    layers = _precise_targets(model)
    if not layers:
        raise ValueError("precise_bn_: the model has no BN layer with running statistics to recompute")
    saved = []
    for m in layers:
        nbt = m.num_batches_tracked
        saved.append((m.training, m.running_mean.clone(), m.running_var.clone(),
                      None if nbt is None else nbt.clone(),
                      m.convention if isinstance(m, BatchNorm) else m.momentum,
                      m._variant if isinstance(m, BatchNorm) else None))
    k = 0
    try:
        for m in layers:
            if isinstance(m, BatchNorm):
                m.momentum = None  # §3.3 under the layer's convention (its estimator and eps kept)
                m._variant = None
            else:
                m.momentum = None  # torch.nn: cumulative average, 1 / num_batches_tracked
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.zero_()
            m.train()
        for batch in batches:
            if num_batches is not None and k >= num_batches:
                break
            model(_input_of(batch))
            k += 1
        if k == 0:
            raise ValueError("precise_bn_ needs at least one batch; got none")
    except BaseException:
        for m, (_, rm, rv, _, _, _) in zip(layers, saved):
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
        raise
    finally:
        for m, (training, _, _, nbt, hyper, variant) in zip(layers, saved):
            if isinstance(m, BatchNorm):
                m.convention = hyper
                m._variant = variant
            else:
                m.momentum = hyper
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
            m.train(training)
    return k
