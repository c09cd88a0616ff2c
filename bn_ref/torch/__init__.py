"""bn-ref's PyTorch backend: a readable, convention-driven Batch Normalization layer.

* :func:`batch_norm` -- the functional form (``docs/spec.md`` §2-§5), any rank >= 2, running
  statistics updated in place in training;
* :class:`BatchNorm` (any rank >= 2) and :class:`BatchNorm1d` / :class:`BatchNorm2d` /
  :class:`BatchNorm3d` (rank-checked like PyTorch's) -- drop-in replacements for
  ``torch.nn.BatchNorm*d`` whose ``state_dict`` loads both ways, under any convention; with
  ``variant=`` a :class:`bn_ref.variants.Variant` (Batch Renormalization, ghost batches, frozen BN,
  no running statistics: ``docs/spec.md`` §13-§17) through :func:`batch_norm_variant`;
* :class:`FrozenBatchNorm2d` -- a drop-in for ``torchvision.ops.FrozenBatchNorm2d`` (§15);
  :func:`precise_bn_` -- precise BN statistics over K batches (§16.2).

The d2l LeNet-BN built on these layers is application code: :mod:`bn_ref.apps.lenet_torch`.

Example::

    >>> import torch, bn_ref.torch as bnt
    >>> layer = bnt.BatchNorm2d(3, convention="flax", feature_axis=1)
    >>> layer(torch.randn(4, 3, 5, 5)).shape
    torch.Size([4, 3, 5, 5])
"""

from __future__ import annotations

from .functional import (
    IMPLEMENTATIONS,
    BatchNormEvalFunction,
    BatchNormTrainFunction,
    DeviceMismatchError,
    batch_norm,
    batch_statistics,
    compute_dtype,
    inverse_std,
    normalize,
    update_running_,
)
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm, SyncBatchNormFunction, convert_sync_batchnorm, merge_statistics
from .variant_modules import FrozenBatchNorm2d, precise_bn_
from .variants import RenormState, batch_norm_variant

__all__ = [
    "IMPLEMENTATIONS",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormEvalFunction",
    "BatchNormTrainFunction",
    "DeviceMismatchError",
    "FrozenBatchNorm2d",
    "RenormState",
    "SyncBatchNorm",
    "SyncBatchNormFunction",
    "batch_norm",
    "batch_norm_variant",
    "batch_statistics",
    "compute_dtype",
    "convert_sync_batchnorm",
    "inverse_std",
    "merge_statistics",
    "normalize",
    "precise_bn_",
    "update_running_",
]
