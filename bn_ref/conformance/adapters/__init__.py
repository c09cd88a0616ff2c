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

__all__ = ["BUILTIN", "Adapter", "Loaded", "load", "parse_spec", "numpy_out", "axis_reason"]

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


def parse_spec(spec: str) -> tuple[str, str]:
    """``"package.module:factory"`` -> ``("package.module", "factory")``; ValueError if malformed.

    >>> parse_spec("bn_ref.conformance.adapters.d2l:factory")
    ('bn_ref.conformance.adapters.d2l', 'factory')
    >>> parse_spec("my_adapter")
    Traceback (most recent call last):
    ...
    ValueError: --adapter 'my_adapter': expected package.module:factory (the module, a colon, the factory's name)
    """
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name.strip() or not attr.strip() or not attr.isidentifier():
        raise ValueError(f"--adapter {spec!r}: expected package.module:factory (the module, a colon, the factory's name)")
    return mod_name.strip(), attr.strip()


def _missing_module(exc: BaseException | None, own_package: str | None) -> str | None:
    """The missing framework behind ``exc``, if the factory failed only because it is not installed.

    For a built-in factory (``own_package`` None) that is one of :data:`THIRD_PARTY`; for a
    third-party one, any module outside the adapter's own top-level package.
    """
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.split(".")[0]
            if (top in THIRD_PARTY) if own_package is None else (top != own_package):
                return exc.name
        exc = exc.__cause__ or exc.__context__
    return None


def load(spec: str, *, third_party: bool = False) -> Loaded:
    """Import ``package.module:factory`` and call it; never raises.

    ``third_party``: a module the harness does not ship; a missing module other than its own
    package then makes the row skip (naming the module), as a missing framework does for the
    built-in rows.
    """
    try:
        mod_name, attr = parse_spec(spec)
    except ValueError as exc:
        return Loaded(spec, [], error=str(exc))
    own = mod_name.split(".")[0] if third_party else None
    try:
        mod = importlib.import_module(mod_name)
        fac = getattr(mod, attr)
        made = fac()
    except Exception as exc:  # noqa: BLE001 - reported as a row
        missing = _missing_module(exc, own)
        if missing:
            return Loaded(spec, [], skip=f"{missing} is not installed" + (f" (needed by {mod_name})" if own else ""))
        return Loaded(spec, [], error=f"{type(exc).__name__}: {_first_line(exc)}")
    adapters = list(made) if isinstance(made, (list, tuple)) else [made]
    if not adapters:
        return Loaded(spec, [], error=f"{spec}: the factory returned no adapter (an empty {type(made).__name__})")
    for a in adapters:
        bad = [k for k in ("name", "convention", "run") if not hasattr(a, k)]
        if bad:
            return Loaded(spec, [], error=f"{spec}: factory returned {type(a).__name__} without {', '.join(bad)}")
    return Loaded(spec, adapters)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
