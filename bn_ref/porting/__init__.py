"""Porting Batch-Normalized models between frameworks (``docs/porting.md``).

* :mod:`bn_ref.porting.convert` -- per-layer weight converters (conv N-d OIHW <-> HWIO, dense,
  BN parameters, running statistics and counter under their conventions), the NCHW <-> NHWC
  flatten permutation, and model-agnostic PyTorch <-> Flax (linen variables or NNX modules)
  porting that pairs layers by an explicit name map or by order, with shape checks;
* :mod:`bn_ref.porting.divergence` -- run a model and its port on the same input and name the
  first layer whose outputs differ beyond ``docs/spec.md`` §8.4, in eval and after one step;
* :mod:`bn_ref.porting.translate` -- the target framework's constructor that reproduces a
  source convention (also ``bn_ref.translate``);
* :mod:`bn_ref.porting.fold` -- folding an eval-mode BN into the preceding conv/dense layer
  (``docs/spec.md`` §12; also ``bn_ref.fold``), and :mod:`bn_ref.porting.fold_checks`, the fold
  conformance rows (PyTorch's ``fuse_conv_bn_eval``, ONNX Runtime's Conv+BN fusion).

Submodules import their framework (torch, jax, flax) on demand.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["convert", "divergence", "translate", "fold", "fold_checks"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'bn_ref.porting' has no attribute {name!r}")
