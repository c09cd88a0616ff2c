"""``jax.example_libraries.stax.BatchNorm`` (the ``jax-libraries`` family).

stax's layer keeps no running statistics: it always normalizes with the batch's own (through
``jax.nn.standardize``), so only training steps are checked -- forward and backward; eval steps are
declined and no running statistics are returned (shown as skipped, never as passed). Rows: the
layer with ``axis`` (the reduced axes) and ``epsilon`` passed, under the ``stax`` preset, and a
*defaults* row ``stax.BatchNorm()``, which reduces over axes (0, 1, 2): rank-4 channels-last input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.example_libraries import stax

from ...conventions import FAMILY_PRESETS
from ..cases import Case
from . import _jax_util as ju

__all__ = ["StaxAdapter", "factory"]


class StaxAdapter:
    def __init__(self, defaults: bool) -> None:
        self.defaults = defaults
        self.convention = FAMILY_PRESETS["stax"]
        self.name = "stax.BatchNorm() @stax (defaults)" if defaults else "stax.BatchNorm(axis, epsilon) @stax"
        self.description = f"jax {jax.__version__} jax.example_libraries.stax.BatchNorm (batch statistics only)"
        self._fns: dict[Any, Any] = {}

    def skip(self, case: Case) -> str | None:
        if not case.training:
            return "stax.BatchNorm keeps no running statistics: it has no eval mode"
        if self.defaults and (case.rank != 4 or case.feature_axis != 3):
            return "stax.BatchNorm() reduces over axes (0, 1, 2) by default: rank-4 channels-last input only"
        return None

    @ju.with_x64  # float64 cases; the rest of the process keeps JAX's default
    def run(self, case: Case) -> dict[str, Any]:
        red = tuple(i for i in range(case.rank) if i != case.feature_axis)
        key = (red, case.eps, case.affine)
        fn = self._fns.get(key)
        if fn is None:
            if self.defaults:
                _, apply = stax.BatchNorm()
            else:
                _, apply = stax.BatchNorm(axis=red, epsilon=case.eps, center=case.affine, scale=case.affine)

            def step(x: Any, params: Any, dy: Any) -> Any:
                y, vjp = jax.vjp(lambda x, p: apply(p, x), x, params)
                dx, dp = vjp(dy.astype(y.dtype))
                return y, dx, dp

            fn = self._fns[key] = jax.jit(step)
        dt = ju.DTYPES[case.dtype]
        pdt = ju.param_dtype(case)
        c = case.x.shape[case.feature_axis]
        if self.defaults or case.affine:
            g = case.gamma if case.affine else np.ones(c)
            b = case.beta if case.affine else np.zeros(c)
            params = (jnp.asarray(b, pdt), jnp.asarray(g, pdt))  # stax's order: (beta, gamma)
        else:
            params = ((), ())
        y, dx, dp = fn(jnp.asarray(case.x, dt), params, jnp.asarray(case.dy, dt))
        out = {"y": ju.out(y), "dx": ju.out(dx)}
        if case.affine:
            out["dgamma"], out["dbeta"] = ju.out(dp[1]), ju.out(dp[0])
        return out


def factory() -> list[Any]:
    return [StaxAdapter(defaults=False), StaxAdapter(defaults=True)]
