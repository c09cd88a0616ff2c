"""bn-ref: the reference for Batch Normalization across frameworks.

``import bn_ref`` needs NumPy only. The framework backends are subpackages imported on demand:
``bn_ref.torch`` (PyTorch), ``bn_ref.jax`` and ``bn_ref.flax`` (JAX, Flax linen and NNX).
The normative text is ``docs/spec.md``; :mod:`bn_ref.oracle` is its executable form.
"""

from __future__ import annotations

import importlib
from typing import Any

from .conventions import DEFAULT, PRESETS, Convention, get_convention, resolve

__version__ = "0.1.0"

SPEC_VERSION = "2026.12"
"""The version of ``docs/spec.md`` this package implements (year.month; see the spec's changelog).

Reports and golden-vector manifests record it, so a result can be traced to the text it was
checked against."""

__all__ = [
    "Convention", "PRESETS", "DEFAULT", "SPEC_VERSION", "get_convention", "resolve", "oracle", "tolerances",
    "__version__",
]

_LAZY = {"oracle", "tolerances", "torch", "jax", "flax", "conformance", "apps", "d2l_scratch",
         "porting", "variants"}
_LAZY_FUNCTIONS = {"translate": "porting.translate", "fold": "porting.fold"}
"""Functions importable as ``bn_ref.<name>`` on first use: ``bn_ref.translate(source, target)``
(``docs/spec.md`` §3.5, §9) and ``bn_ref.fold(layer, bn)`` (§12)."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(f".{_LAZY_FUNCTIONS[name]}", __name__), name)
    raise AttributeError(f"module 'bn_ref' has no attribute {name!r}")
