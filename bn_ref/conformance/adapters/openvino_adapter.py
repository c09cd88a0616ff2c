"""OpenVINO ``BatchNormInference`` (opset 5+; the ``openvino`` family): an eval-only row.

The operation normalizes with given mean and variance (channel axis 1) and has no training form,
no running update and no gradient, so only eval steps compute: a training step returns nothing (each
of its checks is reported as skipped, never as passed, and the harness carries the reference's
running statistics into the next step), and no running statistics or gradients are returned. ``epsilon`` is a required attribute, so
there is no *defaults* row. The row runs under the ``onnx`` preset (eps 1e-5, channels on axis 1),
the model OpenVINO imports its BatchNormalization from. The graph is compiled for the CPU plugin
with ``INFERENCE_PRECISION_HINT`` set to the case's dtype, so float32 is not silently lowered to
bfloat16 on CPUs that support it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import openvino as ov
from openvino import opset15 as ops

from ...conventions import PRESETS
from ..cases import Case
from ._defaults import as_f64

__all__ = ["OpenVINOAdapter", "factory"]

_NP = {"float64": np.float64, "float32": np.float32, "float16": np.float16}


class OpenVINOAdapter:
    defaults = False

    def __init__(self) -> None:
        self.convention = PRESETS["onnx"]
        self.name = "openvino.opset15.batch_norm_inference @onnx (eval only)"
        self.description = f"OpenVINO {ov.__version__} BatchNormInference on the CPU plugin"
        self._core = ov.Core()
        self._compiled: dict[Any, Any] = {}

    def skip(self, case: Case) -> str | None:
        if case.feature_axis != 1:
            return "BatchNormInference takes the channels on axis 1 only"
        if case.dtype not in _NP:
            return f"the CPU plugin has no {case.dtype} input type for this graph"
        return None

    def run(self, case: Case) -> dict[str, Any]:
        if case.training:  # no training form: nothing computed, every key of the step shows as skipped
            return {}
        npdt = _NP[case.dtype]
        c = case.x.shape[1]
        key = (case.x.shape, case.dtype, case.eps)
        compiled = self._compiled.get(key)
        if compiled is None:
            x = ops.parameter(list(case.x.shape), npdt, name="x")
            p = [ops.parameter([c], npdt, name=n) for n in ("gamma", "beta", "mean", "var")]
            y = ops.batch_norm_inference(x, p[0], p[1], p[2], p[3], float(case.eps))
            model = ov.Model([y], [x, *p], "bn")
            hint = {"float64": "f32", "float32": "f32", "float16": "f16"}[case.dtype]
            compiled = self._compiled[key] = self._core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        g = case.gamma if case.affine else np.ones(c)
        b = case.beta if case.affine else np.zeros(c)
        res = compiled([np.asarray(a, npdt) for a in (case.x, g, b, case.running_mean, case.running_var)])
        return {"y": as_f64(res[0])}


def factory() -> list[Any]:
    return [OpenVINOAdapter()]
