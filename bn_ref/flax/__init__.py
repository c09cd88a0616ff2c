"""bn-ref's Flax layers: Batch Normalization under any convention, for linen and NNX.

* :class:`BatchNorm` -- ``flax.linen`` module with ``flax.linen.BatchNorm``'s attributes and
  variables (``params/{scale, bias}``, ``batch_stats/{mean, var}``; a ``count`` only for
  ``momentum=None``);
* :class:`bn_ref.flax.nnx.BatchNorm` -- the same layer for ``flax.nnx``, with
  ``flax.nnx.BatchNorm``'s arguments and state;
* :class:`LeNet` -- the d2l LeNet-BN (NHWC) with bn-ref's, Flax's own, or no BN, and a jitted
  optax SGD step (:func:`create_train_state`, :func:`train_step`).

Both layers are thin shells over the pure function :func:`bn_ref.jax.batch_norm`
(``docs/spec.md`` §2-§4, §11), so they compute the same bits.
"""

from __future__ import annotations

from . import nnx
from .lenet import LeNet, TrainState, create_train_state, loss_and_accuracy, native_batchnorm_kwargs, train_step
from .linen import BatchNorm

__all__ = [
    "BatchNorm",
    "nnx",
    "LeNet",
    "TrainState",
    "create_train_state",
    "train_step",
    "loss_and_accuracy",
    "native_batchnorm_kwargs",
]
