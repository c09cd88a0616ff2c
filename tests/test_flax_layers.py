"""bn_ref.flax.BatchNorm (linen) and bn_ref.flax.nnx.BatchNorm against Flax's own layers, the
oracle and each other (float32, no x64)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bn_ref import PRESETS, oracle
from bn_ref.conventions import resolve
from bn_ref.flax import BatchNorm
from bn_ref.flax.nnx import BatchNorm as NNXBatchNorm
from bn_ref.tolerances import assert_close, error_units

# JAX's default 32-bit mode: nothing in bn-ref turns x64 on process-wide (tests/conftest.py).


STEPS = 5


def _batches(shape, axis, n, seed):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    bshape = [c if i == axis % len(shape) else 1 for i in range(len(shape))]
    xs = [
        (
            rng.uniform(-2, 2, c).reshape(bshape) + rng.uniform(0.5, 2, c).reshape(bshape) * rng.standard_normal(shape)
        ).astype(np.float32)
        for _ in range(n)
    ]
    dys = [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]
    return xs, dys


# -- linen: a generic runner ---------------------------------------------------------------------


def _linen_run(module, variables, xs, dys, train: bool):
    """Apply ``module`` on each batch (training updates batch_stats); return outputs, grads, stats."""

    @jax.jit
    def step(variables, x, dy):
        def loss(params, x):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            y, upd = module.apply(v, x, use_running_average=not train, mutable=["batch_stats"])
            return jnp.sum(y * dy), (y, upd["batch_stats"])

        (_, (y, stats)), (dparams, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        return {"params": variables["params"], "batch_stats": stats}, y, dx, dparams

    out = []
    for x, dy in zip(xs, dys):
        variables, y, dx, dparams = step(variables, x, dy)
        out.append((y, dx, dparams, variables["batch_stats"]))
    return variables, out


# -- against flax.linen.BatchNorm and flax.nnx.BatchNorm (preset flax) ----------------------------

FLAX_CASES = [((8, 3), -1), ((2, 3, 4, 5), -1), ((2, 3, 4, 5), 1)]
assert len(FLAX_CASES) == 3


@pytest.mark.parametrize(("shape", "axis"), FLAX_CASES, ids=["r2", "r4-last", "r4-axis1"])
def test_linen_matches_flax_linen_batchnorm(shape, axis):
    xs, dys = _batches(shape, axis, STEPS + 1, seed=len(shape) + axis)
    ours = BatchNorm(convention="flax", axis=axis)
    theirs = nn.BatchNorm(axis=axis, use_fast_variance=False)
    v_ours = ours.init(jax.random.key(0), xs[0], use_running_average=False)
    v_theirs = theirs.init(jax.random.key(0), xs[0], use_running_average=False)
    # the same starting point, with non-trivial scale/bias
    rng = np.random.default_rng(0)
    c = shape[axis]
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(c), jnp.float32),
    }
    v_ours = {"params": params, "batch_stats": v_ours["batch_stats"]}
    v_theirs = {"params": params, "batch_stats": v_theirs["batch_stats"]}
    v_ours, out_ours = _linen_run(ours, v_ours, xs[:STEPS], dys[:STEPS], train=True)
    v_theirs, out_theirs = _linen_run(theirs, v_theirs, xs[:STEPS], dys[:STEPS], train=True)
    _, ev_ours = _linen_run(ours, v_ours, xs[STEPS:], dys[STEPS:], train=False)
    _, ev_theirs = _linen_run(theirs, v_theirs, xs[STEPS:], dys[STEPS:], train=False)
    assert set(v_ours["batch_stats"]) == {"mean", "var"}  # Flax's variables, no step counter
    for k, (a, b) in enumerate(zip(out_ours + ev_ours, out_theirs + ev_theirs)):
        for got, want, what in (
            (a[0], b[0], "y"),
            (a[1], b[1], "dx"),
            (a[2]["scale"], b[2]["scale"], "dscale"),
            (a[2]["bias"], b[2]["bias"], "dbias"),
            (a[3]["mean"], b[3]["mean"], "batch_stats/mean"),
            (a[3]["var"], b[3]["var"], "batch_stats/var"),
        ):
            assert_close(np.asarray(got), np.asarray(want), "float32", what=f"step {k} {what}")


def test_nnx_matches_flax_nnx_batchnorm():
    shape, axis = (4, 3, 3, 5), -1
    xs, dys = _batches(shape, axis, STEPS + 1, seed=5)
    ours = NNXBatchNorm(5, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(5, use_fast_variance=False, rngs=nnx.Rngs(0))
    scale = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, 5), jnp.float32)
    for layer in (ours, theirs):
        layer.scale[...] = scale
        layer.bias[...] = jnp.asarray(np.linspace(-1, 1, 5), jnp.float32)

    @nnx.jit
    def step(layer, x, dy):
        def loss(layer, x):
            y = layer(x)
            return jnp.sum(y * dy), y

        (_, y), (grads, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
        return y, grads, dx

    for k in range(STEPS + 1):
        if k == STEPS:
            ours.eval()
            theirs.eval()
        (y_o, g_o, dx_o), (y_t, g_t, dx_t) = step(ours, xs[k], dys[k]), step(theirs, xs[k], dys[k])
        for got, want, what in (
            (y_o, y_t, "y"),
            (dx_o, dx_t, "dx"),
            (g_o["scale"][...], g_t["scale"][...], "dscale"),
            (g_o["bias"][...], g_t["bias"][...], "dbias"),
            (ours.mean[...], theirs.mean[...], "mean"),
            (ours.var[...], theirs.var[...], "var"),
        ):
            assert_close(np.asarray(got), np.asarray(want), "float32", what=f"step {k} {what}")
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))  # Flax's state
    assert ours.use_running_average is True


# -- linen and NNX: bit for bit, and both against the oracle ------------------------------------

PARITY = [
    ("flax", "flax", (6, 4), "float32"),
    ("pytorch", "pytorch", (3, 4, 2, 2), "float32"),
    ("pytorch-cma", dataclasses.replace(PRESETS["pytorch"], name="pytorch-cma", momentum=None), (3, 4, 5), "float32"),
    ("keras-bf16", "keras", (2, 3, 3, 4), "bfloat16"),
    ("tf_fused-eps", resolve("tf_fused", eps=1e-2, momentum=0.5), (2, 2, 3, 4), "float32"),
]
assert len(PARITY) == 5


@pytest.mark.parametrize(("convention", "shape", "dtype"), [p[1:] for p in PARITY], ids=[p[0] for p in PARITY])
def test_linen_and_nnx_agree_bit_for_bit_and_match_the_oracle(convention, shape, dtype):
    conv = resolve(convention)
    c = shape[conv.feature_axis]
    xs, _ = _batches(shape, conv.feature_axis, STEPS + 1, seed=c)
    xs = [jnp.asarray(x, dtype) for x in xs]
    lin = BatchNorm(convention=convention)
    v = lin.init(jax.random.key(0), xs[0], use_running_average=True)
    mod = NNXBatchNorm(c, convention=convention, rngs=nnx.Rngs(0))

    @jax.jit
    def lin_step(v, x):
        y, upd = lin.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        return y, {"params": v["params"], "batch_stats": upd["batch_stats"]}

    @nnx.jit
    def nnx_step(m, x):
        return m(x)

    rm, rv = np.zeros(c), np.ones(c)
    for k in range(STEPS):
        y_l, v = lin_step(v, xs[k])
        y_n = nnx_step(mod, xs[k])
        assert y_l.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(y_l), np.asarray(y_n))
        for key in ("mean", "var") + (("count",) if conv.momentum is None else ()):
            np.testing.assert_array_equal(np.asarray(v["batch_stats"][key]), np.asarray(getattr(mod, key)[...]))
        x64 = np.asarray(xs[k], np.float64)
        ref = oracle.forward(x64, np.ones(c), np.zeros(c), rm, rv, training=True, convention=conv, count=k)
        kappa = oracle.condition_number(x64, convention=conv)
        assert_close(np.asarray(y_l, np.float64), ref.y, dtype, kappa=kappa, what=f"step {k} y")
        assert_close(np.asarray(v["batch_stats"]["var"]), ref.running_var, "float32", kappa=kappa, what="running var")
        assert_close(
            np.asarray(v["batch_stats"]["mean"]), ref.running_mean, "float32", kappa=kappa, what="running mean"
        )
        rm, rv = ref.running_mean, ref.running_var
    mod.eval()
    y_l = lin.apply(v, xs[STEPS], use_running_average=True)
    y_n = nnx_step(mod, xs[STEPS])
    np.testing.assert_array_equal(np.asarray(y_l), np.asarray(y_n))
    ref = oracle.forward(np.asarray(xs[STEPS], np.float64), None, None, rm, rv, training=False, convention=conv)
    assert_close(np.asarray(y_l, np.float64), ref.y, dtype, what="eval y")
    if conv.momentum is None:
        assert int(mod.count[...]) == STEPS  # eval does not count
    else:
        assert "count" not in v["batch_stats"] and "count" not in vars(mod)  # only momentum=None counts


# -- the module contract --------------------------------------------------------------------------


def test_linen_use_running_average_exactly_once():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="use_running_average"):
        BatchNorm().init(jax.random.key(0), x)  # neither
    both = BatchNorm(use_running_average=True)
    with pytest.raises(ValueError, match="use_running_average"):
        both.init(jax.random.key(0), x, use_running_average=False)
    v = BatchNorm(use_running_average=False).init(jax.random.key(0), x)  # at construction: fine
    assert set(v) == {"params", "batch_stats"} and set(v["batch_stats"]) == {"mean", "var"}
    cma = BatchNorm(use_running_average=False, momentum=None).init(jax.random.key(0), x)
    assert cma["batch_stats"]["count"].dtype == jnp.int32


def test_nnx_needs_a_mode_and_train_eval_switch_it():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)), jnp.float32)
    m = NNXBatchNorm(3, use_running_average=None, momentum=None)  # momentum=None keeps a step count
    with pytest.raises(ValueError, match="use_running_average"):
        m(x)
    m.train()
    m(x)
    assert int(m.count[...]) == 1
    m.eval()
    y = m(x)
    assert int(m.count[...]) == 1  # eval leaves the statistics alone
    ref = oracle.forward(
        np.asarray(x, np.float64),
        None,
        None,
        np.asarray(m.mean[...], np.float64),
        np.asarray(m.var[...], np.float64),
        training=False,
        convention="flax",
    )
    assert_close(np.asarray(y), ref.y, "float32", what="eval y")
    m(x, use_running_average=False)  # the call argument wins
    assert int(m.count[...]) == 2


def test_linen_updates_only_when_mutable_and_not_while_initialising():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 2)) + 4.0, jnp.float32)
    layer = BatchNorm(convention="pytorch", axis=-1)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["mean"]), 0.0)  # init did not update
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["var"]), 1.0)
    assert set(v["batch_stats"]) == {"mean", "var"}
    y_immutable = layer.apply(v, x, use_running_average=False)  # trains, but nothing is stored
    y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(y_immutable), np.asarray(y))
    ref = oracle.forward(
        np.asarray(x, np.float64),
        np.ones(2),
        np.zeros(2),
        np.zeros(2),
        np.ones(2),
        training=True,
        convention="pytorch",
        axis=-1,
    )
    assert_close(np.asarray(y), ref.y, "float32", what="y")
    assert_close(np.asarray(upd["batch_stats"]["var"]), ref.running_var, "float32", what="running var")
    assert set(upd["batch_stats"]) == {"mean", "var"}


def test_module_options_dtype_and_no_affine():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3, 2)), jnp.bfloat16)
    layer = BatchNorm(convention="onnx", use_scale=False, use_bias=False, dtype=jnp.float32)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    assert "params" not in v or not v["params"]
    y, _ = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    assert y.dtype == jnp.float32
    ref = oracle.forward(
        np.asarray(x, np.float64), None, None, np.zeros(3), np.ones(3), training=True, convention="onnx"
    )
    assert_close(
        np.asarray(y), ref.y, "float32", kappa=oracle.condition_number(np.asarray(x, np.float64), convention="onnx")
    )
    m = NNXBatchNorm(3, convention="onnx", use_scale=False, use_bias=False, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(m(x)), np.asarray(y))


def test_module_bad_input():
    with pytest.raises(TypeError, match="floating"):
        BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="n = 1"):
        BatchNorm(use_running_average=False, convention="pytorch").init(jax.random.key(0), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="rank"):
        NNXBatchNorm(3)(jnp.ones(3))
    m = NNXBatchNorm(3, momentum=None)
    with pytest.raises(ValueError, match=r"shape \(C,\) = \(4,\)"):
        m(jnp.ones((5, 4)))
    assert int(m.count[...]) == 0  # rejected before any state changed
    v = BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones((4, 3)))
    with pytest.raises(Exception, match="scale"):  # flax's own parameter-shape check
        BatchNorm(use_running_average=False).apply(v, jnp.ones((4, 5)))


# -- regression: Flax's default fast variance on large-mean inputs --------------------------------


def test_large_mean_input_flax_fast_variance_is_wrong_bn_ref_is_right():
    """Regression (spec §8.2): mean 1e3, std 1e-2, float32.

    flax.linen.BatchNorm's default ``use_fast_variance=True`` forms E[x^2] - E[x]^2, which cancels
    catastrophically here (the float32 spacing of x^2 ~ 1e6 is 0.06, the variance is 1e-4): its
    batch variance comes out as 0 or 0.0625 and the output is off by a large factor. bn-ref's
    two-pass statistics stay within the float32 tolerance of the oracle.
    """
    x = (1e3 + 1e-2 * np.random.default_rng(0).standard_normal((64, 4))).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = oracle.forward(x64, np.ones(4), np.zeros(4), np.zeros(4), np.ones(4), training=True, convention="flax")
    kappa = oracle.condition_number(x64, convention="flax")

    flax_default = nn.BatchNorm(use_running_average=False, momentum=0.0)  # momentum 0: stores the batch var
    v = flax_default.init(jax.random.key(0), x)
    y_flax, upd = flax_default.apply(v, x, mutable=["batch_stats"])
    ours = BatchNorm(use_running_average=False, convention="flax", momentum=0.0)
    v = ours.init(jax.random.key(0), x)
    y_ours, upd_ours = ours.apply(v, x, mutable=["batch_stats"])

    # Flax's default is wrong: the batch variance by far, the output beyond the tolerance.
    flax_var = np.asarray(upd["batch_stats"]["var"], np.float64)
    assert np.max(np.abs(flax_var - ref.batch_var) / ref.batch_var) > 0.5
    assert error_units(np.asarray(y_flax), ref.y, "float32", kappa=kappa) > 1.0
    # bn-ref is right.
    ours_var = np.asarray(upd_ours["batch_stats"]["var"], np.float64)
    assert np.max(np.abs(ours_var - ref.batch_var) / ref.batch_var) < 1e-3
    assert_close(np.asarray(y_ours), ref.y, "float32", kappa=kappa, what="y")
