"""Framework facts, executed: every statement ``docs/spec.md`` §9 makes about a framework's BN.

The spec's conventions table (§9) is not typed by hand: each cell is *observed* by running the
installed framework on a fixed probe, here. A :class:`Profile` is one row — the framework's
defaults (read from its constructor, nothing passed), the running-update term and estimator
(solved from one training step), the n = 1 and n = 0 behaviour, the variance algorithm (from a
large-mean probe, §8.2) and the output dtype for bfloat16 input (§8.3). :func:`render_table`
turns profiles into the Markdown table the spec carries between ``facts-table`` markers, and
``tests/test_facts.py`` fails when the spec's table and the installed frameworks disagree — so a
stale cell fails CI.

Run ``python -m bn_ref.conformance.facts`` to print the observed table with the versions probed
(``--check docs/spec.md`` exits 1 when the spec's table differs, ``--write docs/spec.md`` rewrites it).

The rows of this module (:data:`PROBES`) are the frameworks of bn-ref's own environment, executed
by the tests. The framework *families* (:mod:`bn_ref.conformance.families`: tf.keras, Keras 3 on its
other backends, Haiku, Equinox, stax, tinygrad, Paddle, MLX, OpenVINO, MindSpore) are probed by
:mod:`.facts_families` in their own venvs (``--family NAME --json OUT``, run by the family runner
after the harness); their rows are committed as ``conformance/facts/NAME.json`` (``--collect DIR``
copies a run's ``NAME.facts.json`` files there) and follow the core rows in the table, so CI, which
has no family venvs, checks the table against those files.

Probes (all NumPy ``default_rng`` seeded, float64 unless said):

* *step*: x of shape (8, 3), one training step from running statistics (0, 1) with γ = 1, β = 0.
  The running mean after it is ``w_b·b``, which gives the batch weight ``w_b``; the momentum
  term is ``B`` when ``w_b`` equals the framework's momentum number, ``R`` when it equals
  ``1 − m`` (§3.5). The running variance ``(1 − w_b) + w_b·c·σ²_B`` gives the estimator factor
  ``c``: ``n/(n − 1)`` is *unbiased*, 1 is *biased* (§3.4).
* *n = 1*: x of shape (1, 3) (normal × 30, seed 1) in float32 with β normal (seed 2): an error
  (its type), or ``max|y − β|`` — 0 means ``y = β`` exactly (§7.1).
* *n = 0*: x of shape (0, 3) in training: an error, or what happens to the running statistics
  (§7.3).
* *variance algorithm*: x = 1000 + 0.01·z, shape (64, 4), float32 (§8.2): *two-pass* when the
  output matches the float64 oracle on the same float32 data to 1e-2, else *one-pass* (the
  cancelling ``E[x²] − E[x]²``).
* *bf16 out*: the dtype returned for bfloat16 input with the framework's default parameters.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import oracle
from ..conventions import Convention

__all__ = ["Profile", "PROBES", "profile", "profiles", "render_table", "spec_table", "full_table", "load_family_facts",
           "family_facts_json", "collect", "write_spec_table", "FACTS_DIR", "main"]

BEGIN = "<!-- facts-table:begin -->"
END = "<!-- facts-table:end -->"

_N1_X = np.round(np.random.default_rng(1).normal(size=(1, 3)) * 30.0, 1)
_N1_BETA = np.round(np.random.default_rng(2).normal(size=3), 2)


@dataclass(frozen=True)
class Profile:
    """One executed row of the §9 table (strings as they appear in the table)."""

    framework: str
    version: str
    eps: str
    momentum: str
    running_var: str
    feature_axis: str
    n1: str
    n0: str
    var_alg: str
    bf16_out: str
    preset: str

    def to_dict(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        missing = [f for f in cls.__dataclass_fields__ if f not in d]
        if missing:
            raise ValueError(f"a facts row lacks {missing}: {d}")
        return cls(**{f: str(d[f]) for f in cls.__dataclass_fields__})

    def row(self) -> str:
        cells = [f"{self.framework} ({self.version})", self.eps, self.momentum, self.running_var,
                 self.feature_axis, self.n1, self.n0, self.var_alg, self.bf16_out, self.preset]
        return "| " + " | ".join(cells) + " |"


HEADER = (
    "| framework (version) | eps | momentum | running var | feature axis | n = 1 (training) | "
    "n = 0 (training) | var. alg. | bf16 in → out | bn-ref preset |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


# -- helpers shared by the probes ------------------------------------------------------------------

def _rng_x(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape) * 2.0 + 0.5


def _fmt_num(v: float) -> str:
    """A default as its users write it: 1e-05 → 1e-5, 0.1 → 0.1."""
    s = repr(float(v))
    if 0 < abs(float(v)) < 1e-2:
        s = f"{float(v):.15e}".rstrip("0").replace(".e", "e")
        mant, exp = s.split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return s


def _classify_step(x: np.ndarray, axis: int, rm: np.ndarray, rv: np.ndarray, momentum: float) -> tuple[str, str]:
    """Solve one training step's running update for its momentum term and estimator (§3.4, §3.5)."""
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    n = x.size // x.shape[axis]
    b = x.mean(axis=red)
    var = x.var(axis=red)
    w_b = float(np.median(np.asarray(rm, np.float64) / b))
    # float32 running statistics carry ~1e-7 relative round-off; the alternatives differ by far more.
    if math.isclose(w_b, momentum, rel_tol=1e-4):
        term = "B"
    elif math.isclose(w_b, 1.0 - momentum, rel_tol=1e-4):
        term = "R"
    else:
        term = f"batch weight {w_b:.6g} (neither m nor 1 − m)"
    c = float(np.median((np.asarray(rv, np.float64) - (1.0 - w_b)) / (w_b * var)))
    if math.isclose(c, n / (n - 1), rel_tol=1e-4):
        est = "unbiased"
    elif math.isclose(c, 1.0, rel_tol=1e-4):
        est = "biased"
    else:
        est = f"factor {c:.6g}"
    return term, est


def _n1_text(y: np.ndarray | None, error: BaseException | None) -> str:
    if error is not None:
        return f"`{type(error).__name__}`"
    assert y is not None
    if np.array_equal(np.asarray(y, np.float64).reshape(-1, 3), _N1_X.astype(np.float32).astype(np.float64)):
        return "allowed, y = x (input returned unchanged)"
    # β as the float32 layer holds it: the probe runs in float32.
    beta32 = _N1_BETA.astype(np.float32).astype(np.float64)
    d = float(np.max(np.abs(np.asarray(y, np.float64).reshape(-1, 3) - beta32)))
    if d == 0.0:
        return "allowed, y = β exactly"
    return f"allowed, max abs(y − β) = {d:.0e}"


def _n0_text(error: BaseException | None, rm: Any, rv: Any, extra: str = "") -> str:
    if error is not None:
        return f"`{type(error).__name__}`"
    rm = np.asarray(rm, np.float64)
    rv = np.asarray(rv, np.float64)
    if np.isnan(rm).all() and np.isnan(rv).all():
        text = "no error; running stats become NaN"
    elif np.array_equal(rm, np.zeros_like(rm)) and np.array_equal(rv, np.ones_like(rv)):
        text = "no error; running stats unchanged"
    elif np.ptp(rm) == 0 and np.ptp(rv) == 0:  # the same in every channel: say what they became
        text = f"no error; running stats → mean {rm[0]:.3g}, var {rv[0]:.3g}"
    else:
        text = "no error; running stats changed"
    return text + extra


def _var_alg(run: Callable[[np.ndarray], np.ndarray], axis: int, eps: float) -> str:
    """Large-mean probe (§8.2): does the float32 output match the oracle on the same data?"""
    z = np.random.default_rng(0).normal(size=(64, 4))
    x32 = (1000.0 + 0.01 * z).astype(np.float32)
    conv = Convention("probe", float(eps), 0.1, "batch", "biased", axis, "allow")
    want = oracle.forward(x32, None, None, None, None, training=True, convention=conv).y
    got = np.asarray(run(x32), np.float64)
    err = float(np.max(np.abs(got - want)))
    # Two-pass float32 on these data is off by ~1e-2 at most (rounding x near 1000, κ ~ 1e5·u);
    # the one-pass formula returns a variance of 0 or a multiple of 0.0625, an O(1) error in y.
    if not math.isfinite(err):  # an unclipped one-pass variance below -eps: sqrt of a negative number
        return "one-pass (large-mean output NaN)"
    return "two-pass" if err < 0.1 else f"one-pass (large-mean error {err:.1g})"


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as exc:  # the framework's own error is the observation
        return None, exc


# -- PyTorch ---------------------------------------------------------------------------------------

def _torch_profile() -> Profile:
    import torch

    sig = inspect.signature(torch.nn.BatchNorm1d)
    eps, mom = sig.parameters["eps"].default, sig.parameters["momentum"].default

    def module(dtype: Any = torch.float64, c: int = 3) -> Any:
        m = torch.nn.BatchNorm1d(c, dtype=dtype)
        m.train()
        return m

    x = _rng_x((8, 3))
    m = module()
    with torch.no_grad():
        m(torch.from_numpy(x))
    term, est = _classify_step(x, 1, m.running_mean.numpy(), m.running_var.numpy(), mom)

    def n1() -> Any:
        m1 = module(torch.float32)
        with torch.no_grad():
            m1.bias.copy_(torch.tensor(_N1_BETA))
            return m1(torch.tensor(_N1_X, dtype=torch.float32)).numpy()

    y1, e1 = _attempt(n1)

    m0 = module()
    _, e0 = _attempt(lambda: m0(torch.zeros(0, 3, dtype=torch.float64)))
    extra = f"; num_batches_tracked → {int(m0.num_batches_tracked)}" if e0 is None else ""
    if e0 is None:
        # momentum=None after an empty step: the next real batch's weight (§3.3 says 1).
        mc = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
        with torch.no_grad():
            mc(torch.zeros(0, 3, dtype=torch.float64))
            mc(torch.from_numpy(x))
        w = float(np.median(mc.running_mean.numpy() / x.mean(axis=0)))
        extra += f"; with `momentum=None` the next batch gets weight {w:.3g}"
    n0 = _n0_text(e0, m0.running_mean.numpy(), m0.running_var.numpy(), extra)

    def run32(x32: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.float32, x32.shape[1])(torch.from_numpy(x32)).numpy()

    bf = module(torch.float32)
    with torch.no_grad():
        out = bf(torch.from_numpy(_rng_x((8, 3)).astype(np.float32)).to(torch.bfloat16))
    return Profile("PyTorch `torch.nn.BatchNorm1d`, CPU", f"torch {torch.__version__.split('+')[0]}", _fmt_num(eps),
                   f"{_fmt_num(mom)} {term}; `None` = cumulative", est, "1", _n1_text(y1, e1), n0,
                   _var_alg(run32, 1, eps),
                   str(out.dtype).replace("torch.", ""), "`pytorch`")


# -- Flax linen and nnx ----------------------------------------------------------------------------

def _flax_linen_profile() -> Profile:
    import flax
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    sig = inspect.signature(nn.BatchNorm)
    eps, mom = sig.parameters["epsilon"].default, sig.parameters["momentum"].default

    def step(x: np.ndarray, beta: np.ndarray | None = None, dtype: Any = None) -> tuple[Any, Any, Any]:
        layer = nn.BatchNorm(use_running_average=False)
        xj = jnp.asarray(x) if dtype is None else jnp.asarray(x, dtype)
        variables = layer.init(jax.random.PRNGKey(0), xj)
        params = dict(variables["params"])
        if beta is not None:
            params["bias"] = jnp.asarray(beta, params["bias"].dtype)
        y, upd = layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, xj, mutable=["batch_stats"])
        return y, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

    with jax.enable_x64(True):
        x = _rng_x((8, 3))
        _, rm, rv = step(x)
        term, est = _classify_step(x, -1, rm, rv, mom)
        y1, e1 = _attempt(lambda: step(_N1_X.astype(np.float32), _N1_BETA)[0])
        r0, e0 = _attempt(lambda: step(np.zeros((0, 3))))
        n0 = _n0_text(e0, *(r0[1:] if r0 else (None, None)))
    var_alg = _var_alg(lambda x32: step(x32)[0], -1, eps)
    two = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    if var_alg != "two-pass":
        def run_two(x32: np.ndarray) -> Any:
            v = two.init(jax.random.PRNGKey(0), x32)
            return two.apply(v, x32, mutable=["batch_stats"])[0]

        var_alg += f"; `use_fast_variance=False`: {_var_alg(run_two, -1, eps)}"
    out = step(_rng_x((8, 3)).astype(np.float32), dtype=jnp.bfloat16)[0]
    return Profile("Flax `linen.BatchNorm`", f"flax {flax.__version__}", _fmt_num(eps), f"{_fmt_num(mom)} {term}", est,
                   f"{sig.parameters['axis'].default}", _n1_text(y1, e1), n0, var_alg, str(out.dtype),
                   "`flax` (with `use_fast_variance=False`)")


def _flax_nnx_profile() -> Profile:
    import flax
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sig = inspect.signature(nnx.BatchNorm.__init__)
    eps, mom = sig.parameters["epsilon"].default, sig.parameters["momentum"].default

    def step(x: np.ndarray, beta: np.ndarray | None = None, dtype: Any = None, **kw: Any) -> tuple[Any, Any, Any]:
        layer = nnx.BatchNorm(x.shape[-1], rngs=nnx.Rngs(0), **kw)
        if beta is not None:
            layer.bias.value = jnp.asarray(beta, layer.bias.value.dtype)
        y = layer(jnp.asarray(x) if dtype is None else jnp.asarray(x, dtype))
        return y, layer.mean.value, layer.var.value

    with jax.enable_x64(True):
        x = _rng_x((8, 3))
        _, rm, rv = step(x, param_dtype=jnp.float64)
        term, est = _classify_step(x, -1, rm, rv, mom)
        y1, e1 = _attempt(lambda: step(_N1_X.astype(np.float32), _N1_BETA)[0])
        r0, e0 = _attempt(lambda: step(np.zeros((0, 3))))
        n0 = _n0_text(e0, *(r0[1:] if r0 else (None, None)))
    var_alg = _var_alg(lambda x32: step(x32)[0], -1, eps)
    if var_alg != "two-pass":
        two = _var_alg(lambda x32: step(x32, use_fast_variance=False)[0], -1, eps)
        var_alg += f"; `use_fast_variance=False`: {two}"
    out = step(_rng_x((8, 3)).astype(np.float32), dtype=jnp.bfloat16)[0]
    return Profile("Flax `nnx.BatchNorm`", f"flax {flax.__version__}", _fmt_num(eps), f"{_fmt_num(mom)} {term}", est,
                   f"{sig.parameters['axis'].default}", _n1_text(y1, e1), n0, var_alg, str(out.dtype),
                   "`flax` (with `use_fast_variance=False`)")


# -- Keras 3 (whichever backend this process imported; the JAX one under nox) ----------------------

def _keras_profile() -> Profile:
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    sig = inspect.signature(keras.layers.BatchNormalization)
    eps, mom = sig.parameters["epsilon"].default, sig.parameters["momentum"].default

    def layer_for(x: np.ndarray, dtype: str) -> Any:
        layer = keras.layers.BatchNormalization(dtype=dtype)
        layer.build(x.shape)
        return layer

    def step(x: np.ndarray, dtype: str = "float32", beta: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        layer = layer_for(x, dtype)
        if beta is not None:
            layer.beta.assign(beta.astype(dtype))
        y = layer(keras.ops.convert_to_tensor(x), training=True)
        return (keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(layer.moving_mean),
                keras.ops.convert_to_numpy(layer.moving_variance))

    x = _rng_x((8, 3))
    _, rm, rv = step(x.astype(np.float32))
    term, est = _classify_step(x.astype(np.float32).astype(np.float64), -1, rm, rv, mom)
    y1, e1 = _attempt(lambda: step(_N1_X.astype(np.float32), beta=_N1_BETA)[0])
    r0, e0 = _attempt(lambda: step(np.zeros((0, 3), np.float32)))
    n0 = _n0_text(e0, *(r0[1:] if r0 else (None, None)))
    var_alg = _var_alg(lambda x32: step(x32)[0], -1, eps)
    import ml_dtypes

    bl = keras.layers.BatchNormalization()
    out = bl(keras.ops.convert_to_tensor(_rng_x((8, 3)).astype(ml_dtypes.bfloat16)), training=True)
    backend = keras.backend.backend()
    return Profile(f"Keras 3 `layers.BatchNormalization`, {backend} backend", f"keras {keras.__version__}",
                   _fmt_num(eps), f"{_fmt_num(mom)} {term}", est, str(sig.parameters["axis"].default), _n1_text(y1, e1), n0, var_alg,
                   keras.backend.standardize_dtype(out.dtype), "`keras`")


# -- ONNX: the reference evaluator and onnxruntime -------------------------------------------------

def _onnx_defaults() -> tuple[float, float]:
    import onnx

    schema = onnx.defs.get_schema("BatchNormalization", 15)
    return schema.attributes["epsilon"].default_value.f, schema.attributes["momentum"].default_value.f


def _onnx_profile(kind: str) -> Profile:
    import onnx
    from onnx import TensorProto, helper

    eps32, mom32 = _onnx_defaults()
    eps, mom = float(np.float32(eps32)), float(np.float32(mom32))
    types = {np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.float32): TensorProto.FLOAT,
             np.dtype(np.float16): TensorProto.FLOAT16}

    def run(x: np.ndarray, beta: np.ndarray | None = None) -> list[np.ndarray]:
        dt = x.dtype
        t = types[np.dtype(dt)]
        c = x.shape[1]
        ins = [helper.make_tensor_value_info("X", t, list(x.shape))] + [
            helper.make_tensor_value_info(n, t, [c]) for n in ("s", "b", "m", "v")]
        outs = [helper.make_tensor_value_info(n, t, None) for n in ("Y", "rm", "rv")]
        # No epsilon/momentum attribute: the operator's own defaults.
        node = helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["Y", "rm", "rv"], training_mode=1)
        model = helper.make_model(helper.make_graph([node], "bn", ins, outs),
                                  opset_imports=[helper.make_opsetid("", 15)])
        model.ir_version = min(model.ir_version, 8)
        feeds = {"X": x, "s": np.ones(c, dt), "b": (np.zeros(c) if beta is None else beta).astype(dt),
                 "m": np.zeros(c, dt), "v": np.ones(c, dt)}
        if kind == "reference":
            from onnx.reference import ReferenceEvaluator

            return list(ReferenceEvaluator(model).run(None, feeds))
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return list(sess.run(None, feeds))

    x = _rng_x((8, 3))
    _, rm, rv = run(x)
    term, est = _classify_step(x, 1, rm, rv, mom)
    y1, e1 = _attempt(lambda: run(_N1_X.astype(np.float32), _N1_BETA)[0])
    r0, e0 = _attempt(lambda: run(np.zeros((0, 3))))
    n0 = _n0_text(e0, *(r0[1:] if r0 else (None, None)))
    var_alg = _var_alg(lambda x32: run(x32)[0], 1, eps)
    if kind == "reference":
        name, version = "ONNX `BatchNormalization`-15, reference evaluator", f"onnx {onnx.__version__}"
    else:
        import onnxruntime as ort

        name, version = "ONNX `BatchNormalization`-15, onnxruntime CPU", f"onnxruntime {ort.__version__}"
    # The attributes are float32: show them as their shortest float32 decimals (1e-05 → 1e-5).
    return Profile(name, version, _fmt_num(float(str(np.float32(eps32)))),
                   f"{_fmt_num(float(str(np.float32(mom32))))} {term} (float32 attribute)", est, "1",
                   _n1_text(y1, e1), n0, var_alg, _onnx_bf16(kind), "`onnx`")


def _onnx_bf16(kind: str) -> str:
    """Eval with bfloat16 X and float32 scale, B and statistics (opset 15 allows T1, T2 apart)."""
    import ml_dtypes
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info("X", TensorProto.BFLOAT16, [4, 3])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("s", "b", "m", "v")]
    node = helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["Y"])
    model = helper.make_model(
        helper.make_graph([node], "bn", ins, [helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, None)]),
        opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = min(model.ir_version, 8)
    feeds = {"X": _rng_x((4, 3)).astype(ml_dtypes.bfloat16), "s": np.ones(3, np.float32),
             "b": np.zeros(3, np.float32), "m": np.zeros(3, np.float32), "v": np.ones(3, np.float32)}

    def run() -> Any:
        if kind == "reference":
            from onnx.reference import ReferenceEvaluator

            return ReferenceEvaluator(model).run(None, feeds)[0]
        import onnxruntime as ort

        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    out, err = _attempt(run)
    if err is not None:
        return f"not run: `{type(err).__name__}`"
    return str(np.asarray(out).dtype)


# -- the d2l book's classic layer, executed as the book writes it ----------------------------------

def _d2l_profile() -> Profile:
    import torch

    from .. import d2l_scratch

    def step(x: np.ndarray, beta: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        layer = d2l_scratch.BatchNorm(x.shape[1], num_dims=2)
        layer = layer.to(torch.float64) if x.dtype == np.float64 else layer
        if beta is not None:
            with torch.no_grad():
                layer.beta.copy_(torch.tensor(beta).reshape(1, -1))
        y = layer(torch.from_numpy(x))
        return y.detach().numpy(), layer.moving_mean.reshape(-1).numpy(), layer.moving_var.reshape(-1).numpy()

    x = _rng_x((8, 3))
    _, rm, rv = step(x)
    term, est = _classify_step(x, 1, rm, rv, 0.9)
    y1, e1 = _attempt(lambda: step(_N1_X.astype(np.float32), _N1_BETA)[0])
    r0, e0 = _attempt(lambda: step(np.zeros((0, 3))))
    n0 = _n0_text(e0, *(r0[1:] if r0 else (None, None)))
    var_alg = _var_alg(lambda x32: step(x32)[0], 1, 1e-5)
    layer = d2l_scratch.BatchNorm(3, num_dims=2)
    out = layer(torch.from_numpy(_rng_x((8, 3))).to(torch.bfloat16))
    return Profile("d2l classic scratch layer (PyTorch, book 0.17)", "as in the seed notes", "1e-5", f"0.9 {term}",
                   est, "1 (2-D or 4-D only)", _n1_text(y1, e1), n0, var_alg, str(out.dtype).replace("torch.", ""),
                   "`d2l`")


PROBES: dict[str, Callable[[], Profile]] = {
    "torch": _torch_profile,
    "flax.linen": _flax_linen_profile,
    "flax.nnx": _flax_nnx_profile,
    "keras": _keras_profile,
    "onnx.reference": lambda: _onnx_profile("reference"),
    "onnxruntime": lambda: _onnx_profile("onnxruntime"),
    "d2l": _d2l_profile,
}
"""The executed rows, in table order."""


def profile(key: str) -> Profile:
    """Run one framework's probes (imports the framework).

    The n = 0 probes make the frameworks divide 0 by 0 on purpose; their warnings are silenced.
    """
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return PROBES[key]()


def profiles(keys: list[str] | None = None) -> list[Profile]:
    return [profile(k) for k in (keys or list(PROBES))]


FACTS_DIR = Path(__file__).resolve().parents[2] / "conformance" / "facts"
"""The committed family facts (``NAME.json``), written by ``nox -s conformance``: CI has no family venvs."""

SCHEMA = "bn-ref-facts/1"


def family_order() -> list[str]:
    """The families with fact probes, in the family table's order (the §9 rows after the core ones)."""
    from .facts_families import FAMILY_PROBES
    from .families import FAMILIES

    return [f.name for f in FAMILIES if f.name in FAMILY_PROBES]


def family_facts_json(family: str) -> dict[str, Any]:
    """Run a family's probes here (its frameworks must import) and return the JSON document."""
    from .facts_families import FAMILY_PROBES, family_profiles

    rows = [dict(key=k, **p.to_dict()) for k, p in family_profiles(family)] if family in FAMILY_PROBES else []
    return {"schema": SCHEMA, "family": family, "rows": rows}


def load_family_facts(facts_dir: Path | None = None) -> list[tuple[str, list[Profile]]]:
    """The committed family rows, ``(family, profiles)`` in family order; a missing file is an error."""
    d = FACTS_DIR if facts_dir is None else Path(facts_dir)
    out = []
    for fam in family_order():
        path = d / f"{fam}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no facts for family {fam!r}; run `nox -s conformance -- --only {fam}`")
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("schema") != SCHEMA or doc.get("family") != fam:
            raise ValueError(f"{path}: not a {SCHEMA} document of family {fam!r}")
        out.append((fam, [Profile.from_dict(r) for r in doc["rows"]]))
    return out


def full_table(core: list[Profile], facts_dir: Path | None = None) -> str:
    """The whole §9 table: the core rows (executed here) then every family's committed rows."""
    return render_table(core + [p for _, rows in load_family_facts(facts_dir) for p in rows])


def write_spec_table(spec_text: str, table: str) -> str:
    """``spec_text`` with the table between the ``facts-table`` markers replaced by ``table``."""
    spec_table(spec_text)  # raises when the markers are missing
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?\n" + re.escape(END), re.S)
    return pattern.sub(lambda _m: f"{BEGIN}\n{table}\n{END}", spec_text, count=1)


def collect(src: Path, facts_dir: Path | None = None, only: list[str] | None = None) -> list[str]:
    """Copy the family runner's ``src/NAME.facts.json`` to ``facts_dir/NAME.json``; return the families copied.

    A family whose run wrote no facts (its environment could not be built, its probes crashed)
    keeps its committed file: the table never loses a row because a venv was missing.
    """
    d = FACTS_DIR if facts_dir is None else Path(facts_dir)
    d.mkdir(parents=True, exist_ok=True)
    copied = []
    for fam in family_order():
        if only is not None and fam not in only:  # a file left by an earlier run is not this run's
            continue
        path = Path(src) / f"{fam}.facts.json"
        if path.is_file():
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("schema") == SCHEMA and doc.get("rows"):
                (d / f"{fam}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
                copied.append(fam)
    return copied


def render_table(rows: list[Profile]) -> str:
    """The §9 table as Markdown, one line per executed row."""
    return HEADER + "\n" + "\n".join(p.row() for p in rows)


def spec_table(spec_text: str) -> str:
    """The table between the ``facts-table`` markers of the spec."""
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), spec_text, re.S)
    if m is None:
        raise ValueError(f"the spec has no table between {BEGIN} and {END}")
    return m.group(1).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_ref.conformance.facts", description=__doc__.split("\n")[0])
    parser.add_argument("--check", metavar="SPEC", help="exit 1 when SPEC's §9 table differs from the observed one "
                        "(the core rows executed here, the family rows from the committed facts)")
    parser.add_argument("--write", metavar="SPEC", help="write the table into SPEC between the facts-table markers")
    parser.add_argument("--only", action="append", choices=list(PROBES), help="probe only these core rows")
    parser.add_argument("--family", metavar="NAME", help="run the probes of one framework family (in its venv)")
    parser.add_argument("--json", metavar="PATH", help="with --family: write its rows here (bn-ref-facts/1)")
    parser.add_argument("--collect", metavar="DIR", help="copy DIR/NAME.facts.json (the family runs) to the "
                        "committed facts (conformance/facts/NAME.json) before building the table")
    parser.add_argument("--families", metavar="A,B", help="with --collect: only these families (the ones just run)")
    parser.add_argument("--facts-dir", metavar="DIR", default=None, help="the committed family facts (default "
                        "conformance/facts of the checkout)")
    args = parser.parse_args(argv)
    if args.family:
        from .families import get

        try:
            get(args.family)
        except ValueError as exc:
            parser.error(str(exc))
        doc = family_facts_json(args.family)
        text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text, encoding="utf-8")
        print(render_table([Profile.from_dict(r) for r in doc["rows"]]))
        return 0
    facts_dir = Path(args.facts_dir) if args.facts_dir else None
    if args.collect:
        only = [n.strip() for n in args.families.split(",") if n.strip()] if args.families else None
        copied = collect(Path(args.collect), facts_dir, only)
        print(f"facts collected for: {', '.join(copied) or '(none)'}", file=sys.stderr)
    core = profiles(args.only)
    table = render_table(core) if args.only else full_table(core, facts_dir)
    print(table)
    if args.write:
        path = Path(args.write)
        path.write_text(write_spec_table(path.read_text(encoding="utf-8"), table), encoding="utf-8")
        print(f"wrote the §9 table into {path}", file=sys.stderr)
    if args.check:
        want = spec_table(Path(args.check).read_text(encoding="utf-8"))
        if want != table:
            print(f"\n{args.check}: the §9 table differs from the frameworks installed here", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
