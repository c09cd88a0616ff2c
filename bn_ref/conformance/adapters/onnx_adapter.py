"""ONNX ``BatchNormalization`` (opset 15) under the ``onnx`` preset: the ONNX reference evaluator
and onnxruntime (CPU). ``training_mode=1`` for training steps (outputs Y, running_mean,
running_var), 0 for eval. The operator defines no gradient, so the backward checks are skipped;
a layer without scale/shift is given scale 1 and bias 0 (the operator requires both inputs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ...conventions import PRESETS
from ..cases import Case
from .base import axis_reason

__all__ = ["OnnxReferenceAdapter", "OnnxRuntimeAdapter", "factory", "batch_norm_model"]

OPSET = 15
_TYPES = {"float64": TensorProto.DOUBLE, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
          "bfloat16": TensorProto.BFLOAT16}


def _np_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def batch_norm_model(rank: int, dtype: str, *, training: bool, eps: float | None, momentum: float | None) -> onnx.ModelProto:
    """A one-node model: BatchNormalization-15 with every tensor in ``dtype``; ``eps`` / ``momentum``
    None leave the attribute out (the operator's defaults)."""
    t = _TYPES[dtype]
    inputs = [helper.make_tensor_value_info("X", t, [None] * rank)] + [
        helper.make_tensor_value_info(n, t, [None]) for n in ("scale", "B", "input_mean", "input_var")
    ]
    outs = ["Y"] + (["running_mean", "running_var"] if training else [])
    outputs = [helper.make_tensor_value_info("Y", t, [None] * rank)] + [
        helper.make_tensor_value_info(n, t, [None]) for n in outs[1:]
    ]
    attrs: dict[str, Any] = {"training_mode": int(training)}
    if eps is not None:
        attrs["epsilon"] = float(eps)
    if momentum is not None:
        attrs["momentum"] = float(momentum)
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "input_mean", "input_var"], outs, **attrs)
    graph = helper.make_graph([node], "bn", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


class _OnnxBase:
    kind = ""

    def __init__(self) -> None:
        self.convention = PRESETS["onnx"]
        self.name = f"{self.kind} @onnx"
        self._sessions: dict[Any, Any] = {}
        self._defaults = False

    def defaults(self) -> "_OnnxBase":
        """The same evaluator with the node's ``epsilon`` and ``momentum`` attributes left out."""
        other = type(self)()
        other._defaults = True
        return other

    def skip(self, case: Case) -> str | None:
        if case.momentum is None:
            return "ONNX BatchNormalization has no cumulative-average mode (momentum=None)"
        return axis_reason(case, (1,), "ONNX BatchNormalization")

    def _feeds(self, case: Case) -> dict[str, np.ndarray]:
        dt = _np_dtype(case.dtype)
        c = case.x.shape[1]
        gamma = np.ones(c) if case.gamma is None else case.gamma
        beta = np.zeros(c) if case.beta is None else case.beta
        return {"X": case.x.astype(dt), "scale": gamma.astype(dt), "B": beta.astype(dt),
                "input_mean": case.running_mean.astype(dt), "input_var": case.running_var.astype(dt)}

    def _session(self, case: Case) -> Any:
        key = (case.rank, case.dtype, case.training, case.eps, case.momentum)
        s = self._sessions.get(key)
        if s is None:
            eps, mom = (None, None) if self._defaults else (case.eps, case.momentum)
            s = self._make(batch_norm_model(case.rank, case.dtype, training=case.training, eps=eps, momentum=mom))
            self._sessions[key] = s
        return s

    def run(self, case: Case) -> dict[str, Any]:
        res = self._run(self._session(case), self._feeds(case))
        out = {"y": np.asarray(res[0]).astype(np.float64)}
        if case.training:
            out["running_mean"] = np.asarray(res[1]).astype(np.float64)
            out["running_var"] = np.asarray(res[2]).astype(np.float64)
        else:  # eval has no running outputs: the running statistics are the inputs, unchanged
            out["running_mean"], out["running_var"] = case.running_mean.copy(), case.running_var.copy()
        return out


class OnnxReferenceAdapter(_OnnxBase):
    kind = "onnx.reference BatchNormalization-15"
    description = f"onnx {onnx.__version__} reference evaluator"

    def _make(self, model: onnx.ModelProto) -> Any:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model)

    def _run(self, sess: Any, feeds: dict[str, np.ndarray]) -> list[Any]:
        return sess.run(None, feeds)


class OnnxRuntimeAdapter(_OnnxBase):
    kind = "onnxruntime BatchNormalization-15[cpu]"

    def __init__(self) -> None:
        import onnxruntime as ort

        super().__init__()
        self._ort = ort
        self.description = f"onnxruntime {ort.__version__} CPUExecutionProvider"

    def skip(self, case: Case) -> str | None:
        if case.dtype == "bfloat16":
            return "onnxruntime (CPU) has no BatchNormalization-15 kernel for bfloat16 (NOT_IMPLEMENTED)"
        return super().skip(case)

    def _make(self, model: onnx.ModelProto) -> Any:
        opts = self._ort.SessionOptions()
        opts.log_severity_level = 3
        return self._ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def _run(self, sess: Any, feeds: dict[str, np.ndarray]) -> list[Any]:
        return sess.run(None, feeds)


def factory() -> list[Any]:
    out: list[Any] = [OnnxReferenceAdapter()]
    try:
        out.append(OnnxRuntimeAdapter())
    except ModuleNotFoundError:
        pass
    return out
