"""bn-ref's Flax layers: Batch Normalization under any convention, for linen and NNX.

* :class:`BatchNorm` -- ``flax.linen`` module with ``flax.linen.BatchNorm``'s attributes and
  variables (``params/{scale, bias}``, ``batch_stats/{mean, var}``; a ``count`` only for
  ``momentum=None``);
* :class:`bn_ref.flax.nnx.BatchNorm` -- the same layer for ``flax.nnx``, with
  ``flax.nnx.BatchNorm``'s arguments and state.

The d2l LeNet-BN built on the linen layer is application code: :mod:`bn_ref.apps.lenet_flax`.

Both layers are thin shells over the pure function :func:`bn_ref.jax.batch_norm`
(``docs/spec.md`` §2-§4, §11), so they compute the same bits. With ``variant=`` (a
:class:`bn_ref.variants.Variant`: Batch Renormalization, ghost batches, frozen BN, no running
statistics; §13-§17) both run :func:`bn_ref.jax.variants.batch_norm_variant` instead.
"""

from __future__ import annotations

from . import nnx
from .linen import BatchNorm

__all__ = [
    "BatchNorm",
    "nnx",
]
