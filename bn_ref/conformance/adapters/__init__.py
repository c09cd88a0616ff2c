"""Built-in adapters, and loading of third-party ones (``package.module:factory``).

Each entry of :data:`BUILTIN` is a factory spec; a factory returns one adapter or a list. A
factory whose framework is not installed makes its row *skip* (with the reason); any other
failure to build is an *error* row -- the run goes on either way.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .base import THIRD_PARTY, Adapter, axis_reason, numpy_out

__all__ = ["BUILTIN", "Adapter", "Loaded", "load", "numpy_out", "axis_reason"]

BUILTIN: tuple[str, ...] = (
    "bn_ref.conformance.adapters.oracle_check:factory",
    "bn_ref.conformance.adapters.bnref_torch:factory",
    "bn_ref.conformance.adapters.bnref_jax:factory",
    "bn_ref.conformance.adapters.frameworks_torch:factory",
    "bn_ref.conformance.adapters.frameworks_flax:factory",
    "bn_ref.conformance.adapters.keras_adapter:factory",
    "bn_ref.conformance.adapters.onnx_adapter:factory",
    "bn_ref.conformance.adapters.d2l:factory",
    "bn_ref.conformance.adapters.distributed_torch:factory",
    "bn_ref.conformance.adapters.distributed_jax:factory",
)
"""The built-in rows, in report order."""


@dataclass
class Loaded:
    """The result of building one factory: adapters, or why there are none."""

    spec: str
    adapters: list[Any]
    error: str | None = None
    skip: str | None = None


def _missing_third_party(exc: BaseException) -> str | None:
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] in THIRD_PARTY:
            return exc.name
        exc = exc.__cause__ or exc.__context__
    return None


def load(spec: str) -> Loaded:
    """Import ``package.module:factory`` and call it; never raises."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        return Loaded(spec, [], error=f"--adapter {spec!r}: expected package.module:factory")
    try:
        mod = importlib.import_module(mod_name)
        fac = getattr(mod, attr)
        made = fac()
    except Exception as exc:  # noqa: BLE001 - reported as a row
        missing = _missing_third_party(exc)
        if missing:
            return Loaded(spec, [], skip=f"{missing} is not installed")
        return Loaded(spec, [], error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    adapters = list(made) if isinstance(made, (list, tuple)) else [made]
    for a in adapters:
        bad = [k for k in ("name", "convention", "run") if not hasattr(a, k)]
        if bad:
            return Loaded(spec, [], error=f"{spec}: factory returned {type(a).__name__} without {', '.join(bad)}")
    return Loaded(spec, adapters)
