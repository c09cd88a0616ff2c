"""dm-haiku ``hk.BatchNorm`` (the ``jax-libraries`` family).

Haiku keeps each running statistic in an ``hk.ExponentialMovingAverage`` whose state is
``counter`` (steps taken), ``hidden`` (the raw average) and ``average`` (what eval uses). By default
the average is *zero-debiased*: ``average = hidden / (1 - decay**counter)`` with ``hidden`` starting
at 0, so the first training step stores the batch statistic itself. The adapter maps the harness's
running statistics onto that state (``average = r``, ``hidden = r·(1 - decay**count)``,
``counter = count``), which is exactly the state Haiku holds after ``count`` steps.

Rows: ``hk.BatchNorm`` under the ``haiku`` preset (decay 0.999, as Haiku's own nets pass), with its
default zero-debiasing and with ``zero_debias=False`` (the moving averages replaced, as a user
subclass would); and a *defaults* row passing only the required arguments (``create_scale``,
``create_offset``, ``decay_rate``). Haiku computes the variance as ``E[x^2] - E[x]^2`` and keeps
its parameters in the input dtype.
"""

from __future__ import annotations

from typing import Any

import haiku as hk
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

__all__ = ["HaikuAdapter", "factory"]


class HaikuAdapter:
    def __init__(self, zero_debias: bool, defaults: bool = False) -> None:
        self.zero_debias = zero_debias
        self.defaults = defaults
        self.convention = FAMILY_PRESETS["haiku"]
        if defaults:
            self.name = "haiku.BatchNorm(True, True, decay_rate=0.999) @haiku (defaults)"
        else:
            self.name = f"haiku.BatchNorm(zero_debias={zero_debias}) @haiku"
        self.description = f"dm-haiku {hk.__version__ if hasattr(hk, '__version__') else ''} hk.BatchNorm"
        self._fns: dict[Any, Any] = {}

    def skip(self, case: Case) -> str | None:
        if self.defaults:
            return defaults_skip(case, -1, "hk.BatchNorm")
        if case.momentum is None:
            return "hk.BatchNorm has no cumulative-average mode (momentum=None)"
        return None

    def _fn(self, case: Case) -> Any:
        key = (case.affine, case.feature_axis, case.eps, case.momentum, case.rank)
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        zero_debias, defaults = self.zero_debias, self.defaults

        def forward(x: Any, is_training: bool) -> Any:
            if defaults:
                bn = hk.BatchNorm(True, True, decay_rate=0.999)
            else:
                bn = hk.BatchNorm(case.affine, case.affine, decay_rate=case.momentum, eps=case.eps,
                                  axis=[i for i in range(case.rank) if i != case.feature_axis],
                                  data_format="channels_last" if case.feature_axis == case.rank - 1 else "channels_first")
                if not zero_debias:
                    bn.mean_ema = hk.ExponentialMovingAverage(case.momentum, zero_debias=False, name="mean_ema")
                    bn.var_ema = hk.ExponentialMovingAverage(case.momentum, zero_debias=False, name="var_ema")
            return bn(x, is_training=is_training)

        fn = hk.transform_with_state(forward)
        self._fns[key] = fn
        return fn

    def _step(self, training: bool) -> Any:
        """One jitted training/eval step with its VJP (compiled once per shape and dtype)."""
        key = ("step", training)
        step = self._fns.get(key)
        if step is None:
            def step_fn(fn: Any, params: Any, state: Any, x: Any, dy: Any) -> Any:
                def f(x: Any, p: Any) -> Any:
                    return fn.apply(p, state, None, x, training)

                y, vjp, new = jax.vjp(f, x, params, has_aux=True)
                dx, dp = vjp(dy.astype(y.dtype))
                return y, new, dx, dp

            step = self._fns[key] = jax.jit(step_fn, static_argnums=0)
        return step

    def run(self, case: Case) -> dict[str, Any]:
        fn = self._fn(case)
        dt = ju.DTYPES[case.dtype]
        x = jnp.asarray(case.x, dt)
        c = case.x.shape[case.feature_axis]
        ikey = ("init", id(fn), case.x.shape, case.dtype)
        if ikey not in self._fns:  # the structure only: every value is overwritten below
            self._fns[ikey] = jax.eval_shape(lambda x: fn.init(None, x, True), x)  # training creates the EMA state
        params, state = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self._fns[ikey])
        params, state = dict(params), dict(state)
        mod = next(iter(params)) if params else ""
        ema = {s: next(k for k in state if k.endswith(s)) for s in ("mean_ema", "var_ema")}
        bshape = params[mod]["scale"].shape if params else (c,)
        if params:
            g = case.gamma if case.affine else np.ones(c)
            b = case.beta if case.affine else np.zeros(c)
            params = {mod: {"scale": jnp.asarray(g, dt).reshape(bshape), "offset": jnp.asarray(b, dt).reshape(bshape)}}
        m = case.momentum if case.momentum is not None else 0.999
        debias = (1.0 - m ** case.count) if (self.zero_debias and case.count > 0) else 1.0
        for stat, val in (("mean_ema", case.running_mean), ("var_ema", case.running_var)):
            k = ema[stat]
            shape = state[k]["hidden"].shape
            avg = jnp.asarray(val, dt).reshape(shape)
            hidden = (jnp.asarray(val * debias, dt) if self.zero_debias and case.count > 0
                      else (jnp.zeros(shape, dt) if self.zero_debias else avg)).reshape(shape)
            state[k] = {"counter": jnp.asarray(case.count, jnp.int32), "hidden": hidden, "average": avg}

        y, new, dx, dp = self._step(case.training)(fn, params, state, x, jnp.asarray(case.dy, dt))
        out = {"y": ju.out(y), "dx": ju.out(dx),
               "running_mean": ju.out(new[ema["mean_ema"]]["average"].reshape(c)),
               "running_var": ju.out(new[ema["var_ema"]]["average"].reshape(c))}
        if case.affine:
            out["dgamma"] = ju.out(dp[mod]["scale"].reshape(c))
            out["dbeta"] = ju.out(dp[mod]["offset"].reshape(c))
        return out


def factory() -> list[Any]:
    return [HaikuAdapter(zero_debias=True), HaikuAdapter(zero_debias=False), HaikuAdapter(True, defaults=True)]
