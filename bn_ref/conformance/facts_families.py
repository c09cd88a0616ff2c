"""Executed §9 facts of the framework *families*: the implementations that run in their own venvs.

Each probe here builds the framework's layer from its own defaults and measures the same columns as
:mod:`bn_ref.conformance.facts` (same probe data, same classifiers). They import frameworks that are
not in bn-ref's core environment, so they run inside the family's venv and process: the family
runner (:func:`bn_ref.conformance.families.run_family`) calls

    python -m bn_ref.conformance facts --family NAME --json DIR/NAME.facts.json

after the harness, and ``nox -s conformance`` copies the result to ``conformance/facts/NAME.json``
(committed: CI has no family venvs) and regenerates the §9 table from the core probes, executed,
and those files (``python -m bn_ref.conformance facts --collect DIR --write docs/spec.md``).

Every probe takes its input as 2-D ``(n, C)`` NumPy data; an implementation whose default layout is
rank 4 (the fused tf.keras path, stax) sees it as ``(n, 1, 1, C)``, so n stays the count per channel.
A column that the implementation does not have (no training form, no running statistics) is "—".
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, TypeVar, cast

import numpy as np

from .facts import (
    _N1_BETA,
    _N1_X,
    Profile,
    _attempt,
    _classify_step,
    _fmt_num,
    _n0_text,
    _n1_text,
    _rng_x,
    _var_alg,
)

__all__ = ["FAMILY_PROBES", "family_profiles"]

DASH = "—"

Step = Callable[..., tuple[Any, Any, Any]]
"""``step(x2d, dtype, beta=None) -> (y as float64 (n, C), running mean, running var)`` (stats None if kept none)."""


@dataclass
class _Impl:
    """What the generic probe needs of one implementation."""

    framework: str
    version: str
    eps: float
    momentum: float | None
    axis: str
    preset: str
    step: Step
    bf16_out: Callable[[], str]
    step_dtype: str = "float64"
    momentum_text: str | None = None  # replaces "m TERM" when the update is not one Convention term
    running_var_text: str | None = None
    eps_text: str | None = None
    var_alg_extra: str = ""
    n0: Callable[[], str] | None = None  # replaces the in-process n = 0 probe (one that can hang)


def _generic(impl: _Impl) -> Profile:
    """The §9 columns of one implementation from its training ``step`` (see :mod:`.facts`)."""
    x = _rng_x((8, 3))
    if impl.step_dtype != "float64":
        x = x.astype(impl.step_dtype).astype(np.float64)
    term = est = DASH
    _, rm, rv = impl.step(x, impl.step_dtype)
    if rm is not None and impl.momentum is not None:
        term, est = _classify_step(x, 1, rm, rv, impl.momentum)
    momentum = impl.momentum_text or (f"{_fmt_num(impl.momentum)} {term}" if impl.momentum is not None else DASH)
    y1, e1 = _attempt(lambda: impl.step(_N1_X.astype(np.float32).astype(np.float64), "float32", _N1_BETA)[0])
    r0, e0 = (None, None) if impl.n0 else _attempt(lambda: impl.step(np.zeros((0, 3)), impl.step_dtype))
    if impl.n0 is not None:
        n0 = impl.n0()
    elif e0 is None and r0 is not None and r0[1] is None:
        y0 = np.asarray(r0[0])
        n0 = f"no error; output shape {tuple(y0.shape)}; no running stats"
    else:
        n0 = _n0_text(e0, *(r0[1:] if r0 else (None, None)))
    var_alg = _var_alg(lambda x32: impl.step(x32.astype(np.float64), "float32")[0], 1, impl.eps) + impl.var_alg_extra
    return Profile(impl.framework, impl.version, impl.eps_text or _fmt_num(impl.eps), momentum,
                   impl.running_var_text or est, impl.axis, _n1_text(y1, e1), n0, var_alg, impl.bf16_out(), impl.preset)


def _bf16_attempt(fn: Callable[[], str]) -> str:
    out, err = _attempt(fn)
    return f"not run: `{type(err).__name__}`" if err is not None else str(out)


# -- tf.keras (Keras 2, the tf-keras package) ------------------------------------------------------

def _tf_keras(fused_rank4: bool) -> Profile:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf_keras

    sig = inspect.signature(tf_keras.layers.BatchNormalization)
    eps, mom = sig.parameters["epsilon"].default, sig.parameters["momentum"].default
    shape = (lambda a: a.reshape(a.shape[0], 1, 1, a.shape[-1])) if fused_rank4 else (lambda a: a)
    fused_seen: list[bool] = []

    def step(x: np.ndarray, dtype: str, beta: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        xi = shape(x)
        layer = tf_keras.layers.BatchNormalization(dtype=dtype)
        layer.build((None,) + xi.shape[1:])
        fused_seen.append(bool(layer.fused))
        if beta is not None:
            layer.beta.assign(beta.astype(dtype))
        y = layer(tf.constant(xi, getattr(tf, dtype)), training=True)
        return (np.asarray(y.numpy(), np.float64).reshape(x.shape), layer.moving_mean.numpy(),
                layer.moving_variance.numpy())

    def bf16() -> str:
        layer = tf_keras.layers.BatchNormalization()
        xi = shape(_rng_x((8, 3)))
        return layer(tf.cast(tf.constant(xi, tf.float32), tf.bfloat16), training=True).dtype.name

    # The fused kernel has no float64 CPU kernel: that path is probed in float32 (§8.3).
    prof = _generic(_Impl(
        f"tf.keras `layers.BatchNormalization`, rank-{4 if fused_rank4 else 2} input "
        f"({'fused' if fused_rank4 else 'non-fused'} path)",
        f"tf-keras {tf_keras.__version__}, tensorflow {tf.__version__}", eps, mom, str(sig.parameters["axis"].default),
        "`tf_fused`" if fused_rank4 else "`keras`", step, lambda: _bf16_attempt(bf16),
        step_dtype="float32" if fused_rank4 else "float64"))
    if any(f != fused_rank4 for f in fused_seen):
        raise RuntimeError(f"tf.keras chose fused={not fused_rank4} for the rank-{4 if fused_rank4 else 2} probe")
    return prof


# -- Keras 3 on the family's backend (KERAS_BACKEND set by the family) -----------------------------

def _keras3() -> Profile:
    import importlib

    import keras

    from .facts import _keras_profile

    prof = _keras_profile()
    backend = keras.backend.backend()
    if backend in ("tensorflow", "torch", "numpy"):  # the backend's own version beside Keras's
        version = importlib.import_module(backend).__version__.split("+")[0]
        prof = _replace(prof, version=f"{prof.version}, {backend} {version}")
    return prof


# -- the JAX libraries: Haiku, Equinox, stax -------------------------------------------------------

def _jax_version() -> str:
    import jax

    return jax.__version__


def _x64(dtype: str) -> Any:
    """float64 on for float64 probes only, so the float32 and bfloat16 probes see JAX's defaults."""
    import jax

    return jax.enable_x64(dtype == "float64")


F = TypeVar("F", bound=Callable[..., Any])


def _jax_step(step: F) -> F:
    def wrapped(x: np.ndarray, dtype: str, *args: Any, **kw: Any) -> Any:
        with _x64(dtype):
            return step(x, dtype, *args, **kw)

    return cast(F, wrapped)


def _haiku(zero_debias: bool) -> Profile:
    from importlib import metadata

    import haiku as hk
    import jax.numpy as jnp

    sig = inspect.signature(hk.BatchNorm.__init__)
    eps = sig.parameters["eps"].default
    d_param = sig.parameters["decay_rate"]
    required = d_param.default is inspect.Parameter.empty
    decay = 0.9  # decay_rate has no default: the probe passes 0.9

    def fwd(x: Any) -> Any:
        bn = hk.BatchNorm(True, True, decay_rate=decay)
        if not zero_debias:
            bn.mean_ema = hk.ExponentialMovingAverage(decay, zero_debias=False, name="mean_ema")
            bn.var_ema = hk.ExponentialMovingAverage(decay, zero_debias=False, name="var_ema")
        return bn(x, is_training=True)

    f = hk.transform_with_state(fwd)

    @_jax_step
    def states(x: np.ndarray, dtype: str, beta: np.ndarray | None = None, batches: int = 1) -> Any:
        xj = jnp.asarray(x, dtype)
        params, state = f.init(None, xj)  # init's own training step is discarded (§3.6)
        mod = next(iter(params))
        if beta is not None:
            params = {mod: dict(params[mod], offset=jnp.asarray(beta, dtype).reshape(params[mod]["offset"].shape))}
        state = dict(state)
        for k in state:  # running statistics (0, 1): hidden = average for the plain EMA, 0 for the debiased one
            init = 0.0 if k.endswith("mean_ema") else 1.0
            shape = state[k]["hidden"].shape
            avg = jnp.full(shape, init, dtype)
            state[k] = {"counter": jnp.asarray(0, jnp.int32), "average": avg,
                        "hidden": jnp.zeros(shape, dtype) if zero_debias else avg}
        out = []
        for i in range(batches):
            xi = xj if i == 0 else jnp.asarray(_rng_x(x.shape, seed=i), dtype)
            y, state = f.apply(params, state, None, xi)
            out.append((y, state))
        return out

    def read(state: Any, what: str, field: str = "average") -> np.ndarray:
        k = next(k for k in state if k.endswith(what))
        return np.asarray(state[k][field], np.float64).reshape(-1)

    def step(x: np.ndarray, dtype: str, beta: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        y, st = states(x, dtype, beta)[0]
        return np.asarray(y.astype(jnp.float32) if dtype == "bfloat16" else y, np.float64), \
            read(st, "mean_ema"), read(st, "var_ema")

    momentum_text = None
    if zero_debias:
        x = _rng_x((8, 3))
        (_, s1), (_, s2) = states(x, "float64", batches=2)
        hidden_term, _ = _classify_step(x, 1, read(s1, "mean_ema", "hidden"), 1.0 + read(s1, "var_ema", "hidden"),
                                        decay)
        b1, b2 = x.mean(0), _rng_x(x.shape, seed=1).mean(0)
        w1 = float(np.median(read(s1, "mean_ema") / b1))
        w2 = float(np.linalg.lstsq(np.stack([b1, b2], 1), read(s2, "mean_ema"), rcond=None)[0][1])
        momentum_text = (f"{'required' if required else _fmt_num(d_param.default)} (0.9 passed) {hidden_term} on the "
                         f"hidden average, read zero-debiased: batch weight {w1:.3g} at step 1, {w2:.3g} at step 2")
    def bf16() -> str:
        return str(states(_rng_x((8, 3)), "bfloat16")[0][0].dtype)

    prof = _generic(_Impl(
        "Haiku `hk.BatchNorm`" + ("" if zero_debias else ", EMAs with `zero_debias=False`"),
        f"dm-haiku {metadata.version('dm-haiku')}, jax {_jax_version()}", eps, decay,
        "-1 (`data_format='channels_last'`)", "`haiku`", step, lambda: _bf16_attempt(bf16),
        momentum_text=momentum_text))
    if not zero_debias and required:
        prof = _replace(prof, momentum=f"required (0.9 passed) {prof.momentum.split(' ', 1)[1]}")
    return prof


def _replace(p: Profile, **kw: str) -> Profile:
    from dataclasses import replace

    return replace(p, **kw)


def _equinox(mode: str | None) -> Profile:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    sig = inspect.signature(eqx.nn.BatchNorm.__init__)
    eps, mom = sig.parameters["eps"].default, sig.parameters["momentum"].default

    def make(c: int, dtype: str) -> tuple[Any, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "mode is unspecified" warning of the default
            kw = {} if mode is None else {"mode": mode}
            return eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, "batch", dtype=getattr(jnp, dtype), **kw)

    def call(model: Any, state: Any, x: Any) -> tuple[Any, Any]:
        return jax.vmap(lambda xi, st: model(xi, st, inference=False), axis_name="batch",
                        in_axes=(0, None), out_axes=(0, None))(x, state)

    def read(model: Any, state: Any) -> tuple[np.ndarray, np.ndarray]:
        if model.mode == "ema":
            m, v = state.get(model.ema_state_index)
        else:  # what inference reads: the hidden average zero-debiased
            cnt = int(state.get(model.batch_counter))
            hm, hv = state.get(model.batch_state_index)
            s = 1.0 - model.momentum ** cnt if cnt > 0 else 1.0
            m, v = hm / s, hv / s
        return np.asarray(m, np.float64), np.asarray(v, np.float64)

    @_jax_step
    def step(x: np.ndarray, dtype: str, beta: np.ndarray | None = None, later: bool = False) -> tuple[Any, Any, Any]:
        model, state = make(x.shape[1], "float32" if dtype == "bfloat16" else dtype)
        if beta is not None:
            model = eqx.tree_at(lambda t: t.bias, model, jnp.asarray(beta, model.bias.dtype))
        if later and model.mode == "ema":  # a step after the first: running (0, 1) blended in
            state = state.set(model.ema_first_time_index, jnp.array(False))
            state = state.set(model.ema_state_index, (jnp.zeros(x.shape[1], dtype), jnp.ones(x.shape[1], dtype)))
        y, new = call(model, state, jnp.asarray(x, dtype))
        rm, rv = read(model, new)
        return np.asarray(y.astype(jnp.float32) if dtype == "bfloat16" else y, np.float64), rm, rv

    model0, _ = make(3, "float32")
    x = _rng_x((8, 3))
    _, rm1, rv1 = step(x, "float64")
    w1 = float(np.median(rm1 / x.mean(0)))
    if model0.mode == "ema":
        term, est = _classify_step(x, 1, *step(x, "float64", later=True)[1:], mom)
        momentum_text = f"{_fmt_num(mom)} {term}; the first step stores the batch stats (batch weight {w1:.3g})"
        var_text = est
    else:
        with _x64("float64"):
            model, state = make(3, "float64")
            _, new = call(model, state, jnp.asarray(x))
        hm, hv = (np.asarray(a, np.float64) for a in new.get(model.batch_state_index))
        term, est = _classify_step(x, 1, hm, hv, mom)
        offset = float(np.median(rv1 - est_factor(est, 8) * x.var(0)))
        momentum_text = (f"{_fmt_num(mom)} {term} on the hidden average, read zero-debiased: batch weight "
                         f"{w1:.3g} at step 1")
        var_text = f"{est}; the read variance after step 1 is σ²_B + {offset:.4g} (hidden starts at 1)"

    def bf16() -> str:
        model, state = make(3, "float32")
        return str(call(model, state, jnp.asarray(_rng_x((8, 3)), jnp.bfloat16))[0].dtype)

    return _generic(_Impl(
        f"Equinox `eqx.nn.BatchNorm`, mode {mode!r}" if mode else "Equinox `eqx.nn.BatchNorm`, mode unset (→ 'ema', with a warning)",
        f"equinox {eqx.__version__}, jax {_jax_version()}", eps, mom, "1 (axis 0 of each vmapped sample)",
        "`equinox`", step, lambda: _bf16_attempt(bf16), momentum_text=momentum_text, running_var_text=var_text))


def est_factor(est: str, n: int) -> float:
    return n / (n - 1) if est == "unbiased" else 1.0


def _stax() -> Profile:
    import jax
    import jax.numpy as jnp
    from jax.example_libraries import stax

    sig = inspect.signature(stax.BatchNorm)
    eps, axis = sig.parameters["epsilon"].default, sig.parameters["axis"].default
    init, apply = stax.BatchNorm()

    @_jax_step
    def step(x: np.ndarray, dtype: str, beta: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        x4 = x.reshape(x.shape[0], 1, 1, x.shape[1])
        _, (b, g) = init(jax.random.PRNGKey(0), x4.shape)
        if beta is not None:
            b = jnp.asarray(beta, b.dtype)
        y = apply((b, g), jnp.asarray(x4, dtype))
        return np.asarray(y.astype(jnp.float32) if dtype == "bfloat16" else y, np.float64).reshape(x.shape), None, None

    def bf16() -> str:
        _, params = init(jax.random.PRNGKey(0), (8, 1, 1, 3))
        return str(apply(params, jnp.asarray(_rng_x((8, 3)).reshape(8, 1, 1, 3), jnp.bfloat16)).dtype)

    return _generic(_Impl("jax `example_libraries.stax.BatchNorm` (batch statistics only)",
                          f"jax {_jax_version()}", eps, None, f"3 of rank 4 (reduces axes {tuple(axis)})", "`stax`",
                          step, lambda: _bf16_attempt(bf16), running_var_text=DASH))


# -- tinygrad --------------------------------------------------------------------------------------

def _tinygrad() -> Profile:
    import shutil
    from importlib import metadata

    os.environ.setdefault("DEV", "CPU" if shutil.which("clang") else "PYTHON")
    from tinygrad import Tensor, dtypes, nn
    from tinygrad.helpers import Context

    sig = inspect.signature(nn.BatchNorm.__init__)
    eps, mom = sig.parameters["eps"].default, sig.parameters["momentum"].default
    dts = {"float64": dtypes.float64, "float32": dtypes.float32, "bfloat16": dtypes.bfloat16}

    def step(x: np.ndarray, dtype: str, beta: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        bn = nn.BatchNorm(x.shape[1])
        dt = dts[dtype]
        bn.weight, bn.bias = Tensor.ones(x.shape[1], dtype=dt), Tensor(
            np.zeros(x.shape[1]) if beta is None else np.asarray(beta), dtype=dt)
        bn.running_mean, bn.running_var = Tensor.zeros(x.shape[1], dtype=dt), Tensor.ones(x.shape[1], dtype=dt)
        with Context(TRAINING=1):
            y = bn(Tensor(np.asarray(x), dtype=dt))
            return (y.cast(dtypes.float64).numpy(), bn.running_mean.cast(dtypes.float64).numpy(),
                    bn.running_var.cast(dtypes.float64).numpy())

    def bf16() -> str:
        bn = nn.BatchNorm(3)
        with Context(TRAINING=1):
            y = bn(Tensor(_rng_x((8, 3)).astype(np.float32)).cast(dtypes.bfloat16))
        names = {dtypes.float32: "float32", dtypes.float64: "float64", dtypes.bfloat16: "bfloat16",
                 dtypes.float16: "float16"}
        return names.get(y.dtype, str(y.dtype))

    return _generic(_Impl("tinygrad `nn.BatchNorm`", f"tinygrad {metadata.version('tinygrad')}, DEV={os.environ['DEV']}",
                          eps, mom, "1", "`pytorch`", step, lambda: _bf16_attempt(bf16)))


# -- PaddlePaddle ----------------------------------------------------------------------------------

def _paddle() -> Profile:
    os.environ.setdefault("GLOG_minloglevel", "2")
    import paddle

    paddle.set_device("cpu")
    sig = inspect.signature(paddle.nn.BatchNorm1D.__init__)
    eps, mom = sig.parameters["epsilon"].default, sig.parameters["momentum"].default

    def layer(c: int, dtype: str) -> Any:
        old = paddle.get_default_dtype()
        paddle.set_default_dtype(dtype)
        try:
            return paddle.nn.BatchNorm1D(c)
        finally:
            paddle.set_default_dtype(old)

    def step(x: np.ndarray, dtype: str, beta: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        bn = layer(x.shape[1], dtype)
        if beta is not None:
            bn.bias.set_value(np.asarray(beta, dtype))
        bn.train()
        y = bn(paddle.to_tensor(np.asarray(x, dtype)))
        f64 = lambda t: paddle.cast(t, "float64").numpy()  # noqa: E731
        return f64(y), f64(bn._mean), f64(bn._variance)

    def bf16() -> str:
        bn = layer(3, "float32")
        bn.train()
        y = bn(paddle.cast(paddle.to_tensor(_rng_x((8, 3)).astype(np.float32)), "bfloat16"))
        return str(y.dtype).replace("paddle.", "")

    return _generic(_Impl("PaddlePaddle `nn.BatchNorm1D`, CPU", f"paddlepaddle {paddle.__version__}", eps, mom,
                          f"1 (`data_format={sig.parameters['data_format'].default!r}`)", "`paddle`", step,
                          lambda: _bf16_attempt(bf16)))


# -- MLX -------------------------------------------------------------------------------------------

def _mlx() -> Profile:
    import mlx.core as mx
    import mlx.nn as nn

    sig = inspect.signature(nn.BatchNorm.__init__)
    eps, mom = sig.parameters["eps"].default, sig.parameters["momentum"].default
    dts = {"float64": mx.float64, "float32": mx.float32, "bfloat16": mx.bfloat16}

    def step(x: np.ndarray, dtype: str, beta: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        dt = dts[dtype]
        bn = nn.BatchNorm(x.shape[1])
        bn.weight = mx.ones(x.shape[1], dtype=dt)
        bn.bias = mx.array(np.zeros(x.shape[1]) if beta is None else np.asarray(beta), dtype=dt)
        bn.running_mean, bn.running_var = mx.zeros(x.shape[1], dtype=dt), mx.ones(x.shape[1], dtype=dt)
        bn.train()
        y = bn(mx.array(np.asarray(x), dtype=dt))
        mx.eval(y, bn.running_mean, bn.running_var)
        f64 = lambda a: np.array(a.astype(mx.float32) if dtype == "bfloat16" else a).astype(np.float64)  # noqa: E731
        return f64(y), f64(bn.running_mean), f64(bn.running_var)

    def bf16() -> str:
        bn = nn.BatchNorm(3)
        bn.train()
        y = bn(mx.array(_rng_x((8, 3)).astype(np.float32)).astype(mx.bfloat16))
        mx.eval(y)
        return str(y.dtype).replace("mlx.core.", "")

    return _generic(_Impl(f"MLX `nn.BatchNorm`, {'CPU' if mx.default_device() == mx.cpu else mx.default_device()}", f"mlx {mx.__version__}", eps, mom, "-1",
                          "`mlx`", step, lambda: _bf16_attempt(bf16), n0=_mlx_n0))


_MLX_N0 = """
import numpy as np, mlx.core as mx, mlx.nn as nn
bn = nn.BatchNorm(3)
bn.train()
y = bn(mx.array(np.zeros((0, 3)), dtype=mx.float32))
mx.eval(y, bn.running_mean, bn.running_var)
m, v = np.array(bn.running_mean), np.array(bn.running_var)
print("NAN" if np.isnan(m).all() and np.isnan(v).all() else f"mean {m.tolist()} var {v.tolist()}")
"""


def _mlx_n0(runs: int = 5, timeout_s: float = 10.0) -> str:
    """MLX's empty training step, each run in a child process: it does not always return (§7.3)."""
    import subprocess
    import sys

    hung, seen = 0, set()
    for _ in range(runs):
        try:
            p = subprocess.run([sys.executable, "-c", _MLX_N0], capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            hung += 1
            continue
        out = p.stdout.strip().splitlines()
        seen.add(("running stats become NaN" if out and out[-1] == "NAN" else (out[-1] if out else
                  f"exit {p.returncode}")) if p.returncode == 0 else f"error ({_tail_line(p.stderr)})")
    # The count of hung runs varies from run to run: the cell says only whether any hung (stable).
    parts = [f"hangs intermittently (no return within {timeout_s:g} s in some of {runs} runs)"] if hung else []
    if seen:
        parts.append(("otherwise " if hung else "") + "no error; " + "; ".join(sorted(seen)))
    return "; ".join(parts)


def _tail_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:80] if lines else "no message"


# -- OpenVINO (inference only) ---------------------------------------------------------------------

def _openvino() -> Profile:
    import openvino as ov
    from openvino import opset15 as ops

    sig = inspect.signature(ops.batch_norm_inference)
    eps_p = sig.parameters["epsilon"]
    eps_text = "required" if eps_p.default is inspect.Parameter.empty else _fmt_num(eps_p.default)
    core = ov.Core()

    def bf16() -> str:
        # The operation takes one element type for all five inputs (a float32 gamma with a bfloat16 x
        # fails validation), so the whole graph is bfloat16.
        import ml_dtypes

        x = ops.parameter([4, 3], ov.Type.bf16, name="x")
        p = [ops.parameter([3], ov.Type.bf16, name=n) for n in ("gamma", "beta", "mean", "var")]
        y = ops.batch_norm_inference(x, *p, 1e-5)
        compiled = core.compile_model(ov.Model([y], [x, *p], "bn"), "CPU")
        ones = np.ones(3, ml_dtypes.bfloat16)
        xb = _rng_x((4, 3)).astype(ml_dtypes.bfloat16)
        got = np.asarray(compiled([xb, ones, ones * 0, ones * 0, ones])[0])
        graph = {"bf16": "bfloat16"}.get(compiled.outputs[0].get_element_type().get_type_name(), "?")
        want = xb.astype(np.float64) / math.sqrt(1 + 1e-5)  # gamma 1, beta 0, mean 0, var 1
        if got.dtype == np.float16 and np.allclose(got.view(ml_dtypes.bfloat16).astype(np.float64), want, rtol=1e-2):
            return f"{graph}; Python gets its raw bits as a float16 array (values wrong unless viewed as bfloat16)"
        return f"{graph}; Python gets {got.dtype}"

    return Profile("OpenVINO `opset15.batch_norm_inference` (inference only), CPU plugin",
                   f"openvino {ov.__version__.split('-')[0]}", eps_text, DASH, DASH, "1", DASH, DASH, DASH, _bf16_attempt(bf16),
                   "`onnx` (eval only)")


# -- MindSpore -------------------------------------------------------------------------------------

def _mindspore() -> Profile:
    os.environ.setdefault("GLOG_v", "3")
    import mindspore as ms
    from mindspore import nn

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU") if hasattr(ms, "set_device") else ms.set_context(device_target="CPU")
    sig = inspect.signature(nn.BatchNorm1d.__init__)
    eps, mom = sig.parameters["eps"].default, sig.parameters["momentum"].default

    def step(x: np.ndarray, dtype: str, beta: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        net = nn.BatchNorm1d(x.shape[1])
        if beta is not None:
            net.beta.set_data(ms.Tensor(np.asarray(beta, np.float32)))
        net.set_train(True)
        y = net(ms.Tensor(np.asarray(x, dtype)))
        f64 = lambda t: t.astype(ms.float32).asnumpy().astype(np.float64)  # noqa: E731
        return f64(y), f64(net.moving_mean), f64(net.moving_variance)

    def bf16() -> str:
        net = nn.BatchNorm1d(3)
        net.set_train(True)
        return str(net(ms.Tensor(_rng_x((8, 3)).astype(np.float32)).astype(ms.bfloat16)).dtype)

    # The CPU kernel takes float16 and float32 only: the step is probed in float32.
    return _generic(_Impl("MindSpore `nn.BatchNorm1d`, CPU (PyNative)", f"mindspore {ms.__version__}", eps, mom, "1",
                          "`mindspore`", step, lambda: _bf16_attempt(bf16), step_dtype="float32"))


FAMILY_PROBES: dict[str, dict[str, Callable[[], Profile]]] = {
    "tensorflow": {"tf_keras": lambda: _tf_keras(False), "tf_keras.fused": lambda: _tf_keras(True)},
    "keras-tensorflow": {"keras.tensorflow": _keras3},
    "keras-torch": {"keras.torch": _keras3},
    "keras-numpy": {"keras.numpy": _keras3},
    "jax-libraries": {"haiku": lambda: _haiku(True), "haiku.no_debias": lambda: _haiku(False),
                      "equinox": lambda: _equinox(None), "equinox.batch": lambda: _equinox("batch"), "stax": _stax},
    "tinygrad": {"tinygrad": _tinygrad},
    "paddle": {"paddle": _paddle},
    "mlx": {"mlx": _mlx},
    "openvino": {"openvino": _openvino},
    "mindspore": {"mindspore": _mindspore},
}
"""Family name (:data:`bn_ref.conformance.families.FAMILIES`) → its probes, in table order. The
``keras-jax`` family has none: the core table's Keras 3 row is the JAX backend, built from defaults."""


def family_profiles(family: str) -> list[tuple[str, Profile]]:
    """Run a family's probes in this process (its frameworks must import here)."""
    if family not in FAMILY_PROBES:
        raise ValueError(f"no fact probes for family {family!r}; known: {', '.join(FAMILY_PROBES)}")
    out = []
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for key, fn in FAMILY_PROBES[family].items():
            out.append((key, fn()))
    return out

