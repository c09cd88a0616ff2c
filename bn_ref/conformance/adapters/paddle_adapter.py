"""PaddlePaddle ``paddle.nn.BatchNorm1D/2D/3D`` (the ``paddle`` family; CPU build).

Paddle's layers keep ``momentum`` on the running term (default 0.9), eps 1e-5, the biased running
variance, and the features on axis 1 (``data_format="NCHW"`` and kin) or last (``"NHWC"`` and kin)
-- the ``paddle`` preset. Parameters and running statistics are created in Paddle's default dtype,
so the adapter sets it to the case's float dtype while building the layer. Gradients of
``sum(y * dy)`` come from ``y.backward(dy)``. Rows: under the preset with eps, momentum and
data format passed, and a *defaults* row ``BatchNorm{1D,2D,3D}(C)`` (features on axis 1).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from ...conventions import FAMILY_PRESETS  # noqa: E402
from ..cases import Case  # noqa: E402
from ._defaults import as_f64, defaults_skip  # noqa: E402

__all__ = ["PaddleAdapter", "factory"]

_CLS = {2: "BatchNorm1D", 3: "BatchNorm1D", 4: "BatchNorm2D", 5: "BatchNorm3D"}
_FORMATS = {(2, True): "NC", (3, True): "NCL", (4, True): "NCHW", (5, True): "NCDHW",
            (2, False): "NC", (3, False): "NLC", (4, False): "NHWC", (5, False): "NDHWC"}

paddle.set_device("cpu")


class PaddleAdapter:
    def __init__(self, defaults: bool) -> None:
        self.defaults = defaults
        self.convention = FAMILY_PRESETS["paddle"]
        self.name = "paddle.nn.BatchNorm{1D,2D,3D}(C) @paddle (defaults)" if defaults else "paddle.nn.BatchNorm{1D,2D,3D} @paddle"
        self.description = f"paddlepaddle {paddle.__version__} nn.BatchNorm1D/2D/3D on CPU"

    def skip(self, case: Case) -> str | None:
        if case.dtype in ("float16", "bfloat16"):
            return f"Paddle's CPU build registers no {case.dtype} batch_norm kernel (NotFound)"
        if self.defaults:
            return defaults_skip(case, 1, "paddle.nn.BatchNorm*D")
        if case.momentum is None:
            return "paddle.nn.BatchNorm*D has no cumulative-average mode (momentum=None)"
        if case.feature_axis not in (1, case.rank - 1):
            return "paddle.nn.BatchNorm*D takes the features on axis 1 or the last axis only"
        return None

    def run(self, case: Case) -> dict[str, Any]:
        c = case.x.shape[case.feature_axis]
        pdt = "float64" if case.dtype == "float64" else "float32"
        old = paddle.get_default_dtype()
        paddle.set_default_dtype(pdt)
        try:
            cls = getattr(paddle.nn, _CLS[case.rank])
            if self.defaults:
                bn = cls(c)
            else:
                affine = None if case.affine else False
                bn = cls(c, momentum=case.momentum, epsilon=case.eps, weight_attr=affine, bias_attr=affine,
                         data_format=_FORMATS[(case.rank, case.feature_axis == 1)])
        finally:
            paddle.set_default_dtype(old)
        if bn.weight is not None:
            bn.weight.set_value(np.asarray(case.gamma if case.affine else np.ones(c), pdt))
            bn.bias.set_value(np.asarray(case.beta if case.affine else np.zeros(c), pdt))
        bn._mean.set_value(np.asarray(case.running_mean, pdt))
        bn._variance.set_value(np.asarray(case.running_var, pdt))
        bn.train() if case.training else bn.eval()
        x = paddle.to_tensor(np.asarray(case.x, np.float32 if case.dtype != "float64" else np.float64))
        x = paddle.cast(x, case.dtype)
        x.stop_gradient = False
        y = bn(x)
        y.backward(paddle.cast(paddle.to_tensor(np.asarray(case.dy, np.float32 if case.dtype != "float64" else np.float64)), y.dtype))
        f64 = lambda t: as_f64(paddle.cast(t, "float64").numpy())  # noqa: E731
        out = {"y": f64(y), "dx": f64(x.grad), "running_mean": f64(bn._mean), "running_var": f64(bn._variance)}
        if case.affine:
            out["dgamma"], out["dbeta"] = f64(bn.weight.grad), f64(bn.bias.grad)
        return out


def factory() -> list[Any]:
    return [PaddleAdapter(defaults=False), PaddleAdapter(defaults=True)]
