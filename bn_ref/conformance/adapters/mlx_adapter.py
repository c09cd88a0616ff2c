"""MLX ``mlx.nn.BatchNorm`` (the ``mlx`` family; ``mlx[cpu]`` on Linux).

MLX's layer takes the features last, input ranks 2-4, eps 1e-5, momentum 0.1 on the batch term,
the unbiased running variance (``ddof=1``, since MLX 0.32.1) and refuses n = 1 in training -- the
``mlx`` preset. The module is called for y and the running statistics; the gradients of
``sum(y * dy)`` come from ``mx.vjp`` of the same call (its running update discarded). Rows: under
the preset with eps/momentum passed, and a *defaults* row ``nn.BatchNorm(C)``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...conventions import FAMILY_PRESETS
from ..cases import Case
from ._defaults import as_f64, defaults_skip

__all__ = ["MLXAdapter", "factory"]

_DT = {"float64": mx.float64, "float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class MLXAdapter:
    def __init__(self, defaults: bool) -> None:
        self.defaults = defaults
        self.convention = FAMILY_PRESETS["mlx"]
        self.name = "mlx.nn.BatchNorm(C) @mlx (defaults)" if defaults else "mlx.nn.BatchNorm @mlx"
        self.description = f"mlx {mx.__version__} nn.BatchNorm, device {mx.default_device()}"

    def skip(self, case: Case) -> str | None:
        if case.rank > 4:
            return "mlx.nn.BatchNorm accepts input ranks 2 to 4 only"
        if self.defaults:
            return defaults_skip(case, -1, "mlx.nn.BatchNorm")
        if case.momentum is None:
            return "mlx.nn.BatchNorm has no cumulative-average mode (momentum=None)"
        if case.feature_axis != case.rank - 1:
            return "mlx.nn.BatchNorm takes the features on the last axis only"
        return None

    def _module(self, case: Case, c: int, dt: Any) -> Any:
        bn = nn.BatchNorm(c) if self.defaults else nn.BatchNorm(c, eps=case.eps, momentum=case.momentum,
                                                                affine=case.affine)
        if "weight" in bn:
            bn.weight = mx.array(np.asarray(case.gamma if case.affine else np.ones(c)), dtype=dt)
            bn.bias = mx.array(np.asarray(case.beta if case.affine else np.zeros(c)), dtype=dt)
        bn.running_mean = mx.array(np.asarray(case.running_mean), dtype=dt)
        bn.running_var = mx.array(np.asarray(case.running_var), dtype=dt)
        bn.train(case.training)
        return bn

    def run(self, case: Case) -> dict[str, Any]:
        c = case.x.shape[-1]
        dt = _DT[case.dtype]
        x = mx.array(np.asarray(case.x), dtype=dt)
        bn = self._module(case, c, dt)
        y = bn(x)
        mx.eval(y, bn.running_mean, bn.running_var)

        def f(x: Any, w: Any, b: Any) -> Any:
            m = self._module(case, c, dt)
            if "weight" in m:
                m.weight, m.bias = w, b
            return m(x)

        w = mx.array(np.asarray(case.gamma if case.affine else np.ones(c)), dtype=dt)
        b = mx.array(np.asarray(case.beta if case.affine else np.zeros(c)), dtype=dt)
        _, grads = mx.vjp(f, [x, w, b], [mx.array(np.asarray(case.dy), dtype=y.dtype)])
        f64 = (lambda a: as_f64(np.array(a.astype(mx.float32)))) if case.dtype != "float64" else (lambda a: as_f64(np.array(a)))
        out = {"y": f64(y), "running_mean": f64(bn.running_mean), "running_var": f64(bn.running_var), "dx": f64(grads[0])}
        if case.affine:
            out["dgamma"], out["dbeta"] = f64(grads[1]), f64(grads[2])
        return out


def factory() -> list[Any]:
    return [MLXAdapter(defaults=False), MLXAdapter(defaults=True)]
