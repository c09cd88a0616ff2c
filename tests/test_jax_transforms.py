"""bn_ref.jax under jit, vmap and grad; dtypes; masks; trace-time validation (float32, no x64)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_ref import PRESETS, oracle
from bn_ref.jax import batch_norm, batch_stats, normalize, update_running
from bn_ref.tolerances import assert_close

# JAX's default 32-bit mode: nothing in bn-ref turns x64 on process-wide (tests/conftest.py).


def _data(shape, axis, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (
        rng.standard_normal(shape)
        * rng.uniform(0.5, 2, c).reshape([c if i == axis % len(shape) else 1 for i in range(len(shape))])
        + 1.5
    ).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.uniform(-1, 1, c).astype(np.float32)
    return x, gamma, beta


def test_jit_equals_eager_and_python_count_equals_array_count():
    conv = dataclasses.replace(PRESETS["pytorch"], name="pt-cma", momentum=None)
    x, g, b = _data((4, 3, 5), 1)
    rm, rv = jnp.full(3, 0.2), jnp.full(3, 2.0)
    eager = batch_norm(x, g, b, rm, rv, training=True, convention=conv, count=3)
    jitted = jax.jit(functools.partial(batch_norm, training=True, convention=conv))(x, g, b, rm, rv, count=jnp.int32(3))
    assert int(eager[3]) == 4 and int(jitted[3]) == 4
    for e, j in zip(eager[:3], jitted[:3]):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-6, atol=1e-7)
    ref = oracle.forward(x, g, b, np.asarray(rm), np.asarray(rv), training=True, convention=conv, count=3)
    assert_close(np.asarray(jitted[0]), ref.y, "float32", what="y")
    assert_close(np.asarray(jitted[2]), ref.running_var, "float32", what="running_var")


def test_vmap_over_a_batch_of_models():
    """vmap over 3 independent models (own x, gamma, beta, running stats, count) == each model alone."""
    m, shape = 3, (4, 5, 2, 3)  # NHWC, flax
    xs, gs, bs = zip(*(_data(shape, -1, seed=s) for s in range(m)))
    xs, gs, bs = np.stack(xs), np.stack(gs), np.stack(bs)
    rms = np.random.default_rng(9).standard_normal((m, 3)).astype(np.float32)
    rvs = np.random.default_rng(10).uniform(0.5, 2, (m, 3)).astype(np.float32)
    counts = jnp.arange(m, dtype=jnp.int32)
    conv = dataclasses.replace(PRESETS["flax"], name="flax-cma", momentum=None)  # count matters
    dys = np.random.default_rng(11).standard_normal(xs.shape).astype(np.float32)

    def one(x, g, b, rm, rv, count, dy):
        f = lambda x, g, b: batch_norm(x, g, b, rm, rv, training=True, convention=conv, count=count)  # noqa: E731
        (y, nrm, nrv, nc), vjp = jax.vjp(f, x, g, b)
        zeros = (jnp.zeros_like(nrm), jnp.zeros_like(nrv), np.zeros((), jax.dtypes.float0))
        return (y, nrm, nrv, nc) + vjp((dy, *zeros))

    batched = jax.jit(jax.vmap(one))(xs, gs, bs, rms, rvs, counts, dys)
    for i in range(m):
        single = jax.jit(one)(xs[i], gs[i], bs[i], rms[i], rvs[i], counts[i], dys[i])
        for a, s in zip(batched, single):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(s), rtol=2e-6, atol=2e-6)
        ref = oracle.forward(xs[i], gs[i], bs[i], rms[i], rvs[i], training=True, convention=conv, count=i)
        dx, dg, db = oracle.backward(dys[i], xs[i], gs[i], training=True, convention=conv)
        assert int(batched[3][i]) == i + 1
        for got, want, what in zip(
            (batched[0][i], batched[1][i], batched[2][i], batched[4][i], batched[5][i], batched[6][i]),
            (ref.y, ref.running_mean, ref.running_var, dx, dg, db),
            ("y", "running_mean", "running_var", "dx", "dgamma", "dbeta"),
        ):
            assert_close(np.asarray(got), want, "float32", what=f"model {i} {what}")


def test_no_gradient_flows_into_the_running_update_through_batch_stats():
    x, g, b = _data((6, 4), 1)
    conv = PRESETS["pytorch"]
    rm, rv = jnp.zeros(4), jnp.ones(4)
    d_x = jax.grad(lambda x: sum(batch_norm(x, g, b, rm, rv, training=True, convention=conv)[i].sum() for i in (1, 2)))(
        x
    )
    np.testing.assert_array_equal(np.asarray(d_x), 0.0)
    # while d(new running mean)/d(old running mean) is the running-term weight 1 - m
    d_rm = jax.grad(lambda rm: batch_norm(x, g, b, rm, rv, training=True, convention=conv)[1].sum())(rm)
    np.testing.assert_allclose(np.asarray(d_rm), 1 - conv.momentum, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_output_and_statistics_dtypes(dtype):
    x, g, b = _data((4, 3, 2, 2), 1)
    xd = jnp.asarray(x, dtype)
    y, rm, rv, _ = batch_norm(xd, g, b, jnp.zeros(3), jnp.ones(3), training=True, convention="pytorch")
    assert y.dtype == jnp.dtype(dtype) and rm.dtype == jnp.float32 and rv.dtype == jnp.float32
    mean, var, n = batch_stats(xd, axis=1)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32 and n == 16
    assert normalize(xd, mean, var, None, None, eps=1e-5, axis=1, dtype=jnp.float32).dtype == jnp.float32
    # a bfloat16 running state stays bfloat16
    _, rm16, rv16, _ = batch_norm(
        xd, g, b, jnp.zeros(3, jnp.bfloat16), jnp.ones(3, jnp.bfloat16), training=True, axis=1
    )
    assert rm16.dtype == jnp.bfloat16 and rv16.dtype == jnp.bfloat16


def test_building_blocks_compose_to_batch_norm():
    x, g, b = _data((5, 3, 4), 1)
    conv = PRESETS["tf_fused"]
    mean, var, n = batch_stats(jnp.asarray(x), axis=1)
    y = normalize(jnp.asarray(x), mean, var, g, b, eps=conv.eps, axis=1)
    rm, rv = update_running(jnp.zeros(3), jnp.ones(3), mean, var, n, convention=conv, count=0)
    full = batch_norm(x, g, b, jnp.zeros(3), jnp.ones(3), training=True, convention=conv, axis=1)
    for a, e in zip((y, rm, rv), full[:3]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_mask_on_one_device_matches_the_oracle_on_the_real_samples():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 3, 2)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    x[~mask] = np.nan  # garbage padding must not leak anywhere
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g, b = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    conv = PRESETS["pytorch"]

    def f(x, g, b):
        return batch_norm(x, g, b, jnp.zeros(3), jnp.ones(3), training=True, convention=conv, mask=jnp.asarray(mask))

    (y, rm, rv, _), vjp = jax.vjp(jax.jit(f), x, g, b)
    dx, dg, db = vjp((dy, jnp.zeros(3), jnp.zeros(3), np.zeros((), jax.dtypes.float0)))
    xr, dyr = x[mask].astype(np.float64), dy[mask].astype(np.float64)
    ref = oracle.forward(xr, g, b, np.zeros(3), np.ones(3), training=True, convention=conv)
    rdx, rdg, rdb = oracle.backward(dyr, xr, g, training=True, convention=conv)
    y, dx = np.asarray(y), np.asarray(dx)
    assert_close(y[mask], ref.y, "float32", what="y")
    np.testing.assert_array_equal(y[~mask], 0.0)
    np.testing.assert_array_equal(dx[~mask], 0.0)
    assert_close(dx[mask], rdx, "float32", what="dx")
    assert_close(np.asarray(dg), rdg, "float32", what="dgamma")
    assert_close(np.asarray(db), rdb, "float32", what="dbeta")
    assert_close(np.asarray(rm), ref.running_mean, "float32", what="running_mean")
    assert_close(np.asarray(rv), ref.running_var, "float32", what="running_var")  # unbiased with n = 10


# -- trace-time validation (§7.5) ----------------------------------------------------------------

f32 = jnp.float32
BAD = [
    ("rank1", dict(x=jnp.ones(4)), ValueError, "rank"),
    ("gamma-shape", dict(gamma=jnp.ones(4)), ValueError, "gamma must have shape"),
    ("running-var-shape", dict(running_var=jnp.ones((3, 1))), ValueError, "running_var must have shape"),
    ("int-x", dict(x=jnp.ones((4, 3), jnp.int32)), TypeError, "x must have a real floating dtype"),
    ("int-beta", dict(beta=jnp.ones(3, jnp.int32)), TypeError, "beta must have a real floating dtype"),
    ("n1-pytorch", dict(x=jnp.ones((1, 3, 1, 1)), convention="pytorch"), ValueError, "n = 1"),
    ("n1-pytorch-2d", dict(x=jnp.ones((1, 3)), convention="pytorch"), ValueError, "more than 1 value"),
    ("empty", dict(x=jnp.ones((0, 3))), ValueError, "empty batch"),
    ("eval-no-stats", dict(running_mean=None, running_var=None, training=False), ValueError, "required"),
    ("one-stat", dict(running_var=None), ValueError, "together"),
    ("training-int", dict(training=1), TypeError, "training must be a bool"),
    ("count-negative", dict(count=-1), ValueError, "count"),
    ("count-float-array", dict(count=jnp.float32(1.0)), TypeError, "count"),
    ("axis-0", dict(axis=0), ValueError, "batch axis"),
    ("mask-shape", dict(mask=jnp.ones(5, bool)), ValueError, "mask must have shape"),
    ("mask-dtype", dict(mask=jnp.ones(4, jnp.int32)), TypeError, "mask must be a bool"),
    ("groups-no-name", dict(axis_index_groups=[[0, 1]]), ValueError, "axis_name"),
    ("unknown-convention", dict(convention="caffe"), ValueError, "unknown convention"),
    ("bad-eps", dict(eps=-1.0), ValueError, "eps"),
]
assert len(BAD) == 19


@pytest.mark.parametrize(("changes", "exc", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_at_trace_time(changes, exc, match):
    args = dict(
        x=jnp.ones((4, 3), f32),
        gamma=jnp.ones(3),
        beta=jnp.zeros(3),
        running_mean=jnp.zeros(3),
        running_var=jnp.ones(3),
        training=True,
        convention="flax",
    )
    args.update(changes)
    arrays = {k: args.pop(k) for k in ("x", "gamma", "beta", "running_mean", "running_var")}
    fn = jax.jit(lambda a: batch_norm(a["x"], a["gamma"], a["beta"], a["running_mean"], a["running_var"], **args))
    with pytest.raises(exc, match=match):
        jax.eval_shape(fn, arrays)  # tracing alone raises: nothing is computed


def test_importing_the_jax_adapters_leaves_x64_off():
    """The conformance adapters enable float64 only inside their runs, never at import (issue 10)."""
    import importlib

    from bn_ref.conformance.adapters import _jax_util

    assert not jax.config.read("jax_enable_x64")
    for name in ("bnref_jax", "frameworks_flax", "keras_adapter", "distributed_jax"):
        importlib.import_module(f"bn_ref.conformance.adapters.{name}")
    assert not jax.config.read("jax_enable_x64")
    with _jax_util.x64():
        assert jnp.ones(1).dtype == jnp.float64
    assert not jax.config.read("jax_enable_x64") and jnp.ones(1).dtype == jnp.float32
