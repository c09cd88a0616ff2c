"""Flax's own Batch Normalization under the ``flax`` preset: ``flax.linen.BatchNorm`` and
``flax.nnx.BatchNorm``, each with the default ``use_fast_variance=True`` (E[x^2] - E[x]^2) and with
``use_fast_variance=False`` (two-pass); CPU, and GPU when JAX has one."""

from __future__ import annotations

from typing import Any

import flax
from flax import linen as nn
from flax import nnx

from ...conventions import PRESETS
from ..cases import Case
from . import _jax_util as ju
from .bnref_jax import _Base, nnx_runner

__all__ = ["FlaxLinenAdapter", "FlaxNNXAdapter", "factory"]


def _reason(case: Case) -> str | None:
    if case.momentum is None:
        return "Flax's BatchNorm has no cumulative-average mode (momentum=None)"
    return None


class FlaxLinenAdapter(_Base):
    def __init__(self, fast: bool, device_name: str, device: Any, defaults: bool = False) -> None:
        self.kind = f"flax.linen.BatchNorm(use_fast_variance={fast})"
        self.fast = fast
        self.device_name = device_name
        self._defaults = defaults
        super().__init__(PRESETS["flax"], device_name, device)
        self.description = f"flax {flax.__version__} linen BatchNorm"

    def defaults(self) -> "FlaxLinenAdapter":
        """``nn.BatchNorm(use_running_average=...)`` with Flax's own axis, momentum and epsilon
        (only ``use_fast_variance=False`` is passed for the two-pass row, and the dtypes)."""
        return FlaxLinenAdapter(self.fast, self.device_name, self.device, defaults=True)

    def skip(self, case: Case) -> str | None:
        return _reason(case)

    def variant_skip(self, case: Case) -> str | None:
        """Flax expresses one variant in the layer: ``use_running_average=True`` in a training step
        with gradients taken is ``frozen="statistics"`` (§15, §17)."""
        if self._defaults:
            return "the defaults row runs the plain catalogue only"
        v = case.variant
        if v.frozen == "statistics":
            return None
        if v.frozen == "all":
            return "freezing gamma/beta is the optimizer's business in Flax (optax), not the layer's"
        if not v.track_running_stats:
            return "flax.linen.BatchNorm has no tracking-off mode (batch_stats are always kept)"
        return "flax.linen.BatchNorm has no Batch Renormalization, ghost batches or cumulative average"

    @ju.with_x64
    def run(self, case: Case) -> dict[str, Any]:
        # frozen="statistics": use_running_average=True during training, gradients still taken (§15)
        training = case.training and (case.variant is None or case.variant.frozen == "no")
        affine = case.affine
        key = (training, affine, case.dtype, case.feature_axis, case.eps, case.momentum)

        def build():
            if self._defaults:
                extra = {} if self.fast else {"use_fast_variance": False}
                mod = nn.BatchNorm(use_running_average=not training, dtype=ju.DTYPES[case.dtype],
                                   param_dtype=ju.param_dtype(case), **extra)
                return ju.linen_train_vjp(mod)
            mod = nn.BatchNorm(use_running_average=not training, axis=case.feature_axis, momentum=case.momentum,
                               epsilon=case.eps, use_scale=affine, use_bias=affine, dtype=ju.DTYPES[case.dtype],
                               param_dtype=ju.param_dtype(case), use_fast_variance=self.fast)

            return ju.linen_train_vjp(mod)

        fn = self._cache.get(key, build)
        i = self._inputs(case)
        params = {"scale": i["gamma"], "bias": i["beta"]} if affine else {}
        y, new, dx, dp = fn(i["x"], params, {"mean": i["rm"], "var": i["rv"]}, i["dy"])
        return {"y": ju.out(y), "running_mean": ju.out(new["mean"]), "running_var": ju.out(new["var"]),
                "dx": ju.out(dx), "dgamma": ju.out(dp.get("scale")), "dbeta": ju.out(dp.get("bias"))}


class FlaxNNXAdapter(_Base):
    def __init__(self, fast: bool, device_name: str, device: Any, defaults: bool = False) -> None:
        self.kind = f"flax.nnx.BatchNorm(use_fast_variance={fast})"
        self.fast = fast
        self.device_name = device_name
        self._defaults = defaults
        super().__init__(PRESETS["flax"], device_name, device)
        self.description = f"flax {flax.__version__} NNX BatchNorm"

    def defaults(self) -> "FlaxNNXAdapter":
        """``nnx.BatchNorm(C, rngs=...)`` with Flax's own axis, momentum and epsilon."""
        return FlaxNNXAdapter(self.fast, self.device_name, self.device, defaults=True)

    def skip(self, case: Case) -> str | None:
        return _reason(case)

    @ju.with_x64
    def run(self, case: Case) -> dict[str, Any]:
        training, affine = case.training, case.affine
        c = case.x.shape[case.feature_axis]
        i = self._inputs(case)

        def make():
            if self._defaults:
                extra = {} if self.fast else {"use_fast_variance": False}
                return nnx.BatchNorm(c, dtype=ju.DTYPES[case.dtype], param_dtype=ju.param_dtype(case),
                                     rngs=nnx.Rngs(0), **extra)
            return nnx.BatchNorm(c, axis=case.feature_axis, momentum=case.momentum, epsilon=case.eps,
                                 use_scale=affine, use_bias=affine, dtype=ju.DTYPES[case.dtype],
                                 param_dtype=ju.param_dtype(case), use_fast_variance=self.fast, rngs=nnx.Rngs(0))

        def set_values(m):
            if affine:
                m.scale.value = i["gamma"]
                m.bias.value = i["beta"]
            m.mean.value, m.var.value = i["rm"], i["rv"]

        key = (training, affine, case.dtype, case.feature_axis, case.eps, case.momentum, c, self._defaults)
        y, rest, dx, dp = nnx_runner(self._cache, key, make, set_values,
                                     lambda m, x: m(x, use_running_average=not training), case, i["dy"], i["x"])
        return {"y": ju.out(y), "running_mean": ju.out(rest["mean"]), "running_var": ju.out(rest["var"]),
                "dx": ju.out(dx), "dgamma": ju.out(dp.get("scale")), "dbeta": ju.out(dp.get("bias"))}


def factory() -> list[Any]:
    out: list[Any] = []
    for dname, dev in ju.devices():
        for fast in (True, False):
            out.append(FlaxLinenAdapter(fast, dname, dev))
            out.append(FlaxNNXAdapter(fast, dname, dev))
    return out
