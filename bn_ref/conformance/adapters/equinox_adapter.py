"""Equinox ``eqx.nn.BatchNorm`` (the ``jax-libraries`` family).

Equinox's layer runs on one sample of shape (C, ...) under ``jax.vmap(..., axis_name=...)``: the
features are on axis 1 of the batch. Two modes keep different state:

* ``mode="ema"`` (the default, chosen with a warning when ``mode`` is not passed): running
  ``(mean, var)`` plus a ``first_time`` flag. The first training step normalizes with the batch
  statistics and *stores them* as the running ones; every later training step normalizes with the
  *blended* statistics ``momentum·running + (1 - momentum)·batch`` and stores those.
* ``mode="batch"``: training normalizes with the batch statistics; the state is a counter and a
  hidden average that starts at (mean 0, var 1) and is zero-debiased at inference,
  ``hidden / (1 - momentum**counter)``.

The adapter maps the harness's running statistics onto that state: ``ema`` -- running = (r_mean,
r_var), ``first_time = (count == 0)``; ``batch`` -- counter = count, hidden = r·(1 - m**count)
(r itself at count 0, the hidden values a fresh layer starts from when r = (0, 1)), and reports
the debiased value Equinox's inference would use. Rows: each mode under the ``equinox`` preset
(eps, momentum passed) and a *defaults* row ``BatchNorm(C, axis_name)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ...conventions import FAMILY_PRESETS
from ..cases import Case
from . import _jax_util as ju
from ._defaults import defaults_skip

# This family runs in its own process (bn_ref/conformance/families.py), so float64 is turned on for
# the whole process here; the core adapters use the per-call ju.x64() context instead.
jax.config.update("jax_enable_x64", True)

__all__ = ["EquinoxAdapter", "factory"]

AXIS = "batch"


class EquinoxAdapter:
    def __init__(self, mode: str | None) -> None:
        self.mode = mode
        self.defaults = mode is None
        self.convention = FAMILY_PRESETS["equinox"]
        self.name = ("equinox.nn.BatchNorm(C, axis_name) @equinox (defaults)" if self.defaults
                     else f"equinox.nn.BatchNorm(mode={mode!r}) @equinox")
        self.description = f"equinox {eqx.__version__} eqx.nn.BatchNorm" + (", mode unset (ema)" if self.defaults else "")
        self._fns: dict[Any, Any] = {}

    def skip(self, case: Case) -> str | None:
        if self.defaults:
            return defaults_skip(case, 1, "eqx.nn.BatchNorm")
        if case.momentum is None:
            return "eqx.nn.BatchNorm has no cumulative-average mode (momentum=None)"
        if case.feature_axis != 1:
            return "eqx.nn.BatchNorm takes the features on axis 0 of each sample (axis 1 of the batch) only"
        return None

    def _make(self, case: Case, c: int) -> tuple[Any, Any]:
        dt = ju.DTYPES[case.dtype]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the defaults row's "mode is unspecified" warning
            if self.defaults:
                return eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, AXIS, dtype=dt)
            return eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, AXIS, eps=case.eps, momentum=case.momentum,
                                                             channelwise_affine=case.affine, mode=self.mode, dtype=dt)

    def run(self, case: Case) -> dict[str, Any]:
        c = case.x.shape[1]
        model, state = self._make(case, c)  # a fresh state each step (an Equinox State is used once)
        dt = ju.DTYPES[case.dtype]
        m = model.momentum
        mode = model.mode
        rm, rv = jnp.asarray(case.running_mean, dt), jnp.asarray(case.running_var, dt)
        if mode == "ema":
            state = state.set(model.ema_state_index, (rm, rv))
            state = state.set(model.ema_first_time_index, jnp.array(case.count == 0))
        else:
            scale = (1.0 - m ** case.count) if case.count > 0 else 1.0
            state = state.set(model.batch_counter, jnp.array(case.count))
            state = state.set(model.batch_state_index, (jnp.asarray(case.running_mean * scale, dt),
                                                        jnp.asarray(case.running_var * scale, dt)))
        affine = model.weight is not None
        w = jnp.asarray(case.gamma if case.affine else np.ones(c), dt) if affine else None
        b = jnp.asarray(case.beta if case.affine else np.zeros(c), dt) if affine else None
        y, new, dx, dwb = _step(model, state, jnp.asarray(case.x, dt), (w, b) if affine else None,
                                jnp.asarray(case.dy, dt), not case.training)
        if mode == "ema":
            nm, nv = new.get(model.ema_state_index)
        else:
            cnt = int(new.get(model.batch_counter))
            hm, hv = new.get(model.batch_state_index)
            s = 1.0 - m ** cnt if cnt > 0 else 1.0
            nm, nv = hm / s, hv / s
        out = {"y": ju.out(y), "dx": ju.out(dx), "running_mean": ju.out(nm), "running_var": ju.out(nv)}
        if case.affine:
            out["dgamma"], out["dbeta"] = ju.out(dwb[0]), ju.out(dwb[1])
        return out


@eqx.filter_jit
def _step(model: Any, state: Any, x: Any, wb: Any, dy: Any, inference: bool) -> Any:
    """One step under vmap with its VJP: (y, new state, dx, (dweight, dbias))."""
    affine = wb is not None

    def f(x: Any, wb: Any) -> Any:
        mod = eqx.tree_at(lambda t: (t.weight, t.bias), model, wb) if affine else model
        return jax.vmap(lambda xi, st: mod(xi, st, inference=inference), axis_name=AXIS,
                        in_axes=(0, None), out_axes=(0, None))(x, state)

    y, vjp, new = jax.vjp(f, x, wb, has_aux=True)
    dx, dwb = vjp(dy.astype(y.dtype))
    return y, new, dx, dwb


def factory() -> list[Any]:
    return [EquinoxAdapter("ema"), EquinoxAdapter("batch"), EquinoxAdapter(None)]
