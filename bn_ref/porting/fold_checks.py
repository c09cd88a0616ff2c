"""Conformance rows for BN folding (``docs/spec.md`` §12): frameworks' Conv+BN fusion against the oracle.

Each row folds one fixed Conv2d + BN case in float32 and float16 and reports, in units of the
bounds (1.0 = the edge of conformance):

* ``weight``, ``bias`` -- the fused parameters against :func:`bn_ref.porting.fold.fold_numpy`
  (elementwise bound of §12.3), where the row exposes them;
* ``y`` -- the fused layer's output against the oracle's *unfolded* eval output (float64
  convolution, then §4 BN) with the §8.4 tolerance of the dtype;
* ``y_unfused`` -- for ONNX Runtime, the same graph with graph optimisations off.

Rows: ``torch.nn.utils.fusion.fuse_conv_bn_eval``; ONNX Runtime's Conv+BatchNormalization fusion
(a session at ``ORT_ENABLE_BASIC`` with fusion on, its optimised graph saved to read the fused
weights, against ``ORT_DISABLE_ALL``); and bn-ref's own ``fold_torch`` and ``fold_jax``.

``python -m bn_ref.porting.fold_checks`` prints the table; :func:`run_all` returns the rows as dicts
and :func:`markdown_table` renders them (the hook for the conformance matrix).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..tolerances import error_units
from .fold import eval_bn_affine, fold_error_units, fold_numpy

__all__ = ["FoldCase", "FoldResult", "make_case", "oracle_output", "ROWS", "run_row", "run_all", "main"]

DTYPES = ("float32", "float16")
EPS = 1e-5


@dataclass(frozen=True)
class FoldCase:
    """Conv2d (O, I, kh, kw) with bias, then eval BN over O channels; every array float64 holding
    values exactly representable in ``dtype`` (§8.4). ``x``: (N, I, H, W), NCHW, stride 1, no padding."""

    dtype: str
    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float = EPS


def make_case(dtype: str, seed: int = 0) -> FoldCase:
    """A small fixed case; one channel has a small running variance (a large factor ``a``)."""
    rng = np.random.default_rng(seed)
    o, i = 6, 3

    def r(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float64).astype(dtype).astype(np.float64)

    var = rng.uniform(0.5, 1.5, o)
    var[2] = 1e-3
    return FoldCase(
        dtype=dtype,
        x=r(rng.normal(0.2, 1.0, (2, i, 7, 7))),
        weight=r(rng.normal(0.0, 0.3, (o, i, 3, 3))),
        bias=r(rng.normal(0.0, 0.2, o)),
        gamma=r(1.0 + 0.3 * rng.standard_normal(o)),
        beta=r(0.2 * rng.standard_normal(o)),
        mean=r(0.3 * rng.standard_normal(o)),
        var=r(var),
    )


def _conv2d64(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))  # (N, I, H', W', kh, kw)
    return np.einsum("nihwab,oiab->nohw", win, w) + b.reshape(1, -1, 1, 1)


def oracle_output(case: FoldCase) -> np.ndarray:
    """The unfolded eval output in float64: conv, then ``a z + d`` (§4)."""
    z = _conv2d64(case.x, case.weight, case.bias)
    a, d = eval_bn_affine(case.gamma, case.beta, case.mean, case.var, case.eps)
    return z * a.reshape(1, -1, 1, 1) + d.reshape(1, -1, 1, 1)


@dataclass
class FoldResult:
    """One row at one dtype: ``units`` per check, or why there are none."""

    row: str
    dtype: str
    units: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    skip: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.skip is None and bool(self.units) and all(v <= 1.0 for v in self.units.values())

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "dtype": self.dtype, "units": dict(self.units), "error": self.error,
                "skip": self.skip, "passed": self.passed}


def _param_units(case: FoldCase, w: Any, b: Any) -> dict[str, float]:
    """Fused (O, I, kh, kw) weight and (O,) bias against the oracle fold (§12.3)."""
    ew, eb = fold_numpy(case.weight, case.bias, case.gamma, case.beta, case.mean, case.var, eps=case.eps,
                        dtype=np.float64)
    return fold_error_units(w, b, ew, eb, case.dtype, gamma=case.gamma, beta=case.beta, mean=case.mean,
                            var=case.var, layer_bias=case.bias, eps=case.eps)


def _torch_fuse(case: FoldCase) -> dict[str, float]:
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    dt = getattr(torch, case.dtype)
    o, i = case.weight.shape[:2]
    conv = torch.nn.Conv2d(i, o, 3, dtype=dt)
    bn = torch.nn.BatchNorm2d(o, eps=case.eps, dtype=dt)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(case.weight))
        conv.bias.copy_(torch.from_numpy(case.bias))
        bn.weight.copy_(torch.from_numpy(case.gamma))
        bn.bias.copy_(torch.from_numpy(case.beta))
        bn.running_mean.copy_(torch.from_numpy(case.mean))
        bn.running_var.copy_(torch.from_numpy(case.var))
    conv.eval()
    bn.eval()
    fused = fuse_conv_bn_eval(conv, bn)
    out = _param_units(case, fused.weight.detach().double().numpy(), fused.bias.detach().double().numpy())
    with torch.no_grad():
        y = fused(torch.from_numpy(case.x).to(dt)).double().numpy()
    out["y"] = error_units(y, oracle_output(case), case.dtype)
    return out


def _bnref_torch(case: FoldCase) -> dict[str, float]:
    import torch

    from .fold import fold_torch

    dt = getattr(torch, case.dtype)

    def t(a: np.ndarray) -> Any:
        return torch.from_numpy(a).to(dt)

    w, b = fold_torch(t(case.weight), t(case.bias), t(case.gamma), t(case.beta), t(case.mean), t(case.var), eps=case.eps)
    out = _param_units(case, w.double().numpy(), b.double().numpy())
    y = torch.nn.functional.conv2d(t(case.x), w, b).double().numpy()
    out["y"] = error_units(y, oracle_output(case), case.dtype)
    return out


def _bnref_jax(case: FoldCase) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from .fold import fold_jax

    dt = jnp.dtype(case.dtype)
    k = jnp.asarray(np.transpose(case.weight, (2, 3, 1, 0)), dt)  # HWIO
    w, b = fold_jax(k, jnp.asarray(case.bias, dt), jnp.asarray(case.gamma, dt), jnp.asarray(case.beta, dt),
                    jnp.asarray(case.mean, dt), jnp.asarray(case.var, dt), eps=case.eps)
    out = _param_units(case, np.transpose(np.asarray(w, np.float64), (3, 2, 0, 1)), np.asarray(b, np.float64))
    x = jnp.asarray(np.moveaxis(case.x, 1, -1), dt)
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    out["y"] = error_units(np.moveaxis(np.asarray(y, np.float64), -1, 1), oracle_output(case), case.dtype)
    return out


def _onnx_model(case: FoldCase) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    et = TensorProto.FLOAT if case.dtype == "float32" else TensorProto.FLOAT16
    o = case.weight.shape[0]
    inits = [numpy_helper.from_array(getattr(case, k).astype(case.dtype), name=k)
             for k in ("weight", "bias", "gamma", "beta", "mean", "var")]
    nodes = [
        helper.make_node("Conv", ["x", "weight", "bias"], ["z"], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["y"], epsilon=case.eps),
    ]
    n, _, h, w = case.x.shape
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", et, list(case.x.shape))],
                              [helper.make_tensor_value_info("y", et, [n, o, h - 2, w - 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _ort(case: FoldCase) -> dict[str, float]:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = _onnx_model(case).SerializeToString()
    x = case.x.astype(case.dtype)
    expected = oracle_output(case)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fused.onnx")
        for level, key in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "y_unfused"),
                           (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "y")):
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            if key == "y":
                so.optimized_model_filepath = path
            sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            y = sess.run(None, {"x": x})[0].astype(np.float64)
            out[key] = error_units(y, expected, case.dtype)
        fused = onnx.load(path)
        ops = [nd.op_type for nd in fused.graph.node]
        if "BatchNormalization" in ops:
            raise RuntimeError(f"ONNX Runtime did not fuse Conv+BatchNormalization at ORT_ENABLE_BASIC (nodes: {ops})")
        conv = next(nd for nd in fused.graph.node if nd.op_type == "Conv")
        inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in fused.graph.initializer}
        producers = {o: nd for nd in fused.graph.node for o in nd.output}

        def source(name: str) -> np.ndarray:
            # float16: ORT may keep the fused initializers in float32 behind inserted Cast nodes
            while name not in inits and name in producers and producers[name].op_type == "Cast":
                name = producers[name].input[0]
            return inits[name]

        out.update(_param_units(case, source(conv.input[1]), source(conv.input[2])))
    return out


ROWS: dict[str, Callable[[FoldCase], dict[str, float]]] = {
    "torch.nn.utils.fusion.fuse_conv_bn_eval": _torch_fuse,
    "onnxruntime Conv+BatchNormalization fusion (ORT_ENABLE_BASIC vs ORT_DISABLE_ALL)": _ort,
    "bn_ref.porting.fold.fold_torch": _bnref_torch,
    "bn_ref.porting.fold.fold_jax": _bnref_jax,
}
"""Row name -> check function (case -> units per check)."""

def run_row(name: str, dtype: str) -> FoldResult:
    """Run one row at one dtype; a missing framework is a skip, any other exception an error."""
    fn = ROWS[name]
    try:
        return FoldResult(name, dtype, fn(make_case(dtype)))
    except ModuleNotFoundError as exc:
        return FoldResult(name, dtype, skip=f"{exc.name} is not installed")
    except Exception as exc:  # noqa: BLE001 - reported in the row
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return FoldResult(name, dtype, error=f"{type(exc).__name__}: {msg}")


def run_all(dtypes: Sequence[str] = DTYPES, rows: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every row at every dtype, as dicts ``{row, dtype, units, error, skip, passed}``."""
    return [run_row(r, d).as_dict() for r in (rows or list(ROWS)) for d in dtypes]


def _cell(r: dict[str, Any], markdown: bool) -> str:
    if r["skip"]:
        return f"skip ({r['skip']})"
    if r["error"]:
        return ("**ERROR**" if markdown else "ERROR") + f" {r['error']}"
    worst = max(r["units"].values())
    label = "pass" if r["passed"] else ("**FAIL**" if markdown else "FAIL")
    return f"{label} {worst:.2g}"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """The fold rows as a Markdown table (row x dtype, worst units per cell), for the conformance report."""
    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    rows = list(dict.fromkeys(r["row"] for r in results))
    cell = {(r["row"], r["dtype"]): _cell(r, True) for r in results}
    lines = ["### Folding BN into the preceding layer (spec §12)", "",
             "Fused weight and bias against the oracle's fold (§12.3 bound) and the fused layer's output against the "
             "unfolded oracle (§8.4); worst of the checks in units of the bound.", "",
             "| row | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
    lines += [f"| `{row}` | " + " | ".join(cell.get((row, d), "-") for d in dtypes) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bn_ref.porting.fold_checks [--dtype float32 ...]``: print the fold rows; exit 1 on a failure."""
    p = argparse.ArgumentParser(prog="python -m bn_ref.porting.fold_checks", description=__doc__.splitlines()[0])
    p.add_argument("--dtype", action="append", choices=DTYPES, help="dtypes to run (default: all)")
    args = p.parse_args(argv)
    results = run_all(tuple(args.dtype or DTYPES))
    bad = False
    for r in results:
        if r["skip"]:
            status = f"skipped: {r['skip']}"
        elif r["error"]:
            status, bad = f"ERROR {r['error']}", True
        else:
            status = ("pass" if r["passed"] else "FAIL") + "  " + "  ".join(f"{k} {v:.3g}" for k, v in r["units"].items())
            bad |= not r["passed"]
        print(f"{r['row']:<80} {r['dtype']:<8} {status}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
