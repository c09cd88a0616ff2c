"""Helpers for the JAX-based adapters: float64 in a context, devices, dtypes, a per-config function cache.

float64 cases need ``jax_enable_x64``. Importing an adapter does not turn it on: each adapter's
``run`` is wrapped in :func:`x64` (``@ju.with_x64``), which enables it for that call only and
restores the caller's setting afterwards, so the rest of the process keeps JAX's default.

Every JAX adapter builds one function per static configuration (dtype, affine, training,
convention) that returns the outputs and the VJP of ``sum(y * dy)`` together. By default it runs
op by op: JAX caches each primitive per shape and dtype *across all adapters*, which for the
catalogue's many small shapes is several times faster than compiling one program per adapter,
configuration and shape (measured: ~20 s vs ~3-9 s per row on 2 CPU cores). Set
``BN_REF_CONFORMANCE_JIT=1`` to ``jax.jit`` each function instead (what users run in practice;
the numbers agree to the tolerances).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from ..cases import Case

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def x64() -> Iterator[None]:
    """``jax_enable_x64`` on inside the block (this thread), the previous setting restored after."""
    with jax.enable_x64(True):
        yield


def with_x64(fn: F) -> F:
    """Run ``fn`` (an adapter's ``run``) inside :func:`x64`."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with x64():
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]

DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def param_dtype(case: Case) -> Any:
    """Parameters and running statistics: float64 for float64 cases, else float32 (the usual mixed precision)."""
    return jnp.float64 if case.dtype == "float64" else jnp.float32


def devices() -> list[tuple[str, Any]]:
    """("cpu", device), plus ("gpu", device) when JAX sees a GPU."""
    out = [("cpu", jax.devices("cpu")[0])]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if gpus:
        out.append(("gpu", gpus[0]))
    return out


def put(a: np.ndarray | None, dtype: Any, device: Any) -> Any:
    if a is None:
        return None
    return jax.device_put(jnp.asarray(np.asarray(a, dtype=np.float64), dtype=dtype), device)


def out(a: Any) -> np.ndarray | None:
    if a is None:
        return None
    return np.array(np.asarray(a).astype(np.float64), copy=True)


class JitCache:
    """``get(key, build)`` returns the jitted function of a configuration, building it once."""

    def __init__(self) -> None:
        self._fns: dict[Any, Callable[..., Any]] = {}

    def get(self, key: Any, build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
        fn = self._fns.get(key)
        if fn is None:
            fn = jax.jit(build()) if os.environ.get("BN_REF_CONFORMANCE_JIT") else build()
            self._fns[key] = fn
        return fn


def linen_train_vjp(mod: Any) -> Callable[..., Any]:
    """``f(x, params, stats, dy) -> (y, new_batch_stats, dx, dparams)`` for a linen BN module:
    one apply with ``batch_stats`` mutable, and the VJP of y with respect to x and the params."""

    def f(x: Any, params: Any, stats: Any, dy: Any) -> Any:
        def fwd(x: Any, params: Any) -> Any:
            y, upd = mod.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        y, vjp, new = jax.vjp(fwd, x, params, has_aux=True)
        dx, dp = vjp(dy)
        return y, new, dx, dp

    return f
