"""MindSpore ``mindspore.nn.BatchNorm1d/2d/3d`` (the ``mindspore`` family; CPU, PyNative mode).

MindSpore's layers keep ``momentum`` on the running term (default 0.9, passed to the kernel as
``1 - momentum``), eps 1e-5, the features on axis 1 and the unbiased running variance -- the
``mindspore`` preset (Paddle's numbers but the unbiased estimator). Its CPU kernel takes float16
and float32 only, so float64 cases are declined with that reason. The
module is called for y and the running statistics; the gradients of ``sum(y * dy)`` come from
``mindspore.grad`` of the same call with the running statistics restored first (so the update is
applied once). Rows: under the preset with eps and momentum passed, and a *defaults* row
``BatchNorm{1d,2d,3d}(C)``.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import nn  # noqa: E402

from ...conventions import FAMILY_PRESETS  # noqa: E402
from ..cases import Case  # noqa: E402
from ._defaults import as_f64, defaults_skip  # noqa: E402

__all__ = ["MindSporeAdapter", "factory"]

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU") if hasattr(ms, "set_device") else ms.set_context(device_target="CPU")
_CLS = {2: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
_DT = {"float64": ms.float64, "float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def _param(net: Any, name: str) -> Any:
    """The parameter whose name ends with ``name`` (BatchNorm3d keeps its own inside a BatchNorm2d)."""
    inner = getattr(net, "bn2d", None)
    return getattr(net, name, None) if inner is None else getattr(inner, name, None)


class MindSporeAdapter:
    def __init__(self, defaults: bool) -> None:
        self.defaults = defaults
        self.convention = FAMILY_PRESETS["mindspore"]
        self.name = ("mindspore.nn.BatchNorm{1d,2d,3d}(C) @mindspore (defaults)" if defaults
                     else "mindspore.nn.BatchNorm{1d,2d,3d} @mindspore")
        self.description = f"mindspore {ms.__version__} nn.BatchNorm1d/2d/3d on CPU"

    def skip(self, case: Case) -> str | None:
        if case.rank not in _CLS:
            return "mindspore.nn has BatchNorm1d for (N, C), BatchNorm2d for rank 4 and BatchNorm3d for rank 5 only"
        if case.dtype in ("float64", "bfloat16"):
            return f"MindSpore's CPU BatchNorm kernel takes float16 and float32 only, not {case.dtype}"
        if self.defaults:
            return defaults_skip(case, 1, "mindspore.nn.BatchNorm*d")
        if case.momentum is None:
            return "mindspore.nn.BatchNorm*d has no cumulative-average mode (momentum=None)"
        if case.feature_axis != 1:
            return "this row builds MindSpore's layers with the features on axis 1 (data_format NCHW)"
        return None

    def _net(self, case: Case, c: int) -> Any:
        cls = getattr(nn, _CLS[case.rank])
        net = cls(c) if self.defaults else cls(c, eps=case.eps, momentum=case.momentum, affine=case.affine)
        dt = _DT[case.dtype] if case.dtype == "float64" else ms.float32
        for name, val in (("gamma", case.gamma), ("beta", case.beta), ("moving_mean", case.running_mean),
                          ("moving_variance", case.running_var)):
            p = _param(net, name)
            if p is None:
                continue
            if val is None:
                val = np.ones(c) if name == "gamma" else np.zeros(c)
            p.set_data(ms.Tensor(np.asarray(val), dt))
        net.set_train(case.training)
        return net

    def run(self, case: Case) -> dict[str, Any]:
        c = case.x.shape[1]
        dt = _DT[case.dtype]
        x = ms.Tensor(np.asarray(case.x, np.float64 if case.dtype == "float64" else np.float32)).astype(dt)
        net = self._net(case, c)
        y = net(x)
        f64 = lambda t: as_f64(t.astype(ms.float32).asnumpy() if case.dtype != "float64" else t.asnumpy())  # noqa: E731
        out = {"y": f64(y), "running_mean": f64(_param(net, "moving_mean")), "running_var": f64(_param(net, "moving_variance"))}
        gnet = self._net(case, c)
        dy = ms.Tensor(np.asarray(case.dy, np.float64 if case.dtype == "float64" else np.float32)).astype(y.dtype)
        weights = [_param(gnet, "gamma"), _param(gnet, "beta")] if case.affine else None
        fn = ms.grad(lambda x: (gnet(x) * dy).sum(), grad_position=0, weights=weights)
        g = fn(x)
        if case.affine:
            dx, (dg, db) = g
            out["dgamma"], out["dbeta"] = f64(dg), f64(db)
        else:
            dx = g
        out["dx"] = f64(dx)
        return out


def factory() -> list[Any]:
    return [MindSporeAdapter(defaults=False), MindSporeAdapter(defaults=True)]
