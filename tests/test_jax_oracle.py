"""bn_ref.jax.batch_norm against the NumPy oracle, for every preset.

Each case runs one jitted program: 5 training steps (``lax.scan``, so ``count`` is a traced
array) with a VJP at every step, then an eval step with its VJP. Outputs, gradients (dx, dgamma,
dbeta) and the running statistics after every step are compared with ``bn_ref.oracle.forward``/
``backward`` run on the same inputs (rounded to the working dtype for float32/float16/bfloat16),
within ``bn_ref.tolerances`` (kappa = ``oracle.condition_number``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_ref import PRESETS, oracle
from bn_ref.conventions import resolve
from bn_ref.jax import batch_norm
from bn_ref.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("x64")  # float64 (tests/conftest.py)


STEPS = 5
SHAPES = {2: (6, 3), 3: (3, 4, 5), 4: (2, 3, 4, 5), 5: (2, 3, 2, 3, 4)}


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(jnp.dtype(name))


def _rounded(a: np.ndarray | None, dtype: str) -> np.ndarray | None:
    """a rounded to ``dtype`` and back to float64: what the implementation actually sees."""
    return None if a is None else np.asarray(a).astype(_np_dtype(dtype)).astype(np.float64)


@functools.partial(jax.jit, static_argnames=("convention", "axis"))
def _sequence(xs, dys, gamma, beta, rm, rv, x_eval, dy_eval, *, convention, axis):
    """STEPS training steps then one eval step, each with its VJP."""

    def train_step(carry, inputs):
        rm, rv, count = carry
        x, dy = inputs

        def f(x, g, b):
            y, nrm, nrv, nc = batch_norm(x, g, b, rm, rv, training=True, convention=convention, axis=axis, count=count)
            return y, (nrm, nrv, nc)

        y, vjp, (nrm, nrv, nc) = jax.vjp(f, x, gamma, beta, has_aux=True)
        dx, dg, db = vjp(dy)
        return (nrm, nrv, nc), (y, dx, dg, db, nrm, nrv)

    (rm, rv, count), train_out = jax.lax.scan(train_step, (rm, rv, jnp.zeros((), jnp.int32)), (xs, dys))

    def g(x, g_, b):
        y, erm, erv, ec = batch_norm(x, g_, b, rm, rv, training=False, convention=convention, axis=axis, count=count)
        return y, (erm, erv, ec)

    y, vjp, (erm, erv, ec) = jax.vjp(g, x_eval, gamma, beta, has_aux=True)
    eval_out = (y, *vjp(dy_eval), erm, erv, ec, rm, rv)
    return train_out, eval_out, count


def _inputs(shape, axis, seed):
    """STEPS+1 batches with per-channel offsets and scales (so the running stats move), gamma, beta, dy."""
    rng = np.random.default_rng(seed)
    ax = axis % len(shape)
    c = shape[ax]
    bshape = [1] * len(shape)
    bshape[ax] = c
    xs = []
    for _ in range(STEPS + 1):
        loc = rng.uniform(-3, 3, c).reshape(bshape)
        scale = rng.uniform(0.5, 2.0, c).reshape(bshape)
        xs.append(loc + scale * rng.standard_normal(shape))
    dys = [rng.standard_normal(shape) for _ in range(STEPS + 1)]
    gamma = rng.uniform(0.5, 1.5, c)
    beta = rng.uniform(-1, 1, c)
    rm0 = rng.uniform(-0.5, 0.5, c)
    rv0 = rng.uniform(0.5, 1.5, c)
    return xs, dys, gamma, beta, rm0, rv0


def _check_sequence(conv, shape, axis, dtype, param_dtype, seed, *, affine=True):
    xs, dys, gamma, beta, rm0, rv0 = _inputs(shape, axis, seed)
    if not affine:
        gamma = beta = None
    jd, pd = jnp.dtype(dtype), jnp.dtype(param_dtype)
    to = lambda a, d: None if a is None else jnp.asarray(np.asarray(a).astype(_np_dtype(str(d))))  # noqa: E731
    train_out, eval_out, count = _sequence(
        to(np.stack(xs[:STEPS]), jd),
        to(np.stack(dys[:STEPS]), jd),
        to(gamma, pd),
        to(beta, pd),
        to(rm0, pd),
        to(rv0, pd),
        to(xs[STEPS], jd),
        to(dys[STEPS], jd),
        convention=conv,
        axis=axis,
    )
    assert int(count) == STEPS
    y_s, dx_s, dg_s, db_s, rm_s, rv_s = (np.asarray(a, np.float64) if a is not None else None for a in train_out)
    assert train_out[0].dtype == jd and train_out[1].dtype == jd
    assert train_out[4].dtype == pd and train_out[5].dtype == pd

    # The oracle on the rounded inputs, with its own (float64) running statistics.
    g64, b64 = _rounded(gamma, param_dtype), _rounded(beta, param_dtype)
    rm, rv = _rounded(rm0, param_dtype), _rounded(rv0, param_dtype)
    kappa = 1.0
    stat_dtype = "float64" if dtype == "float64" else "float32"
    for k in range(STEPS):
        x64, dy64 = _rounded(xs[k], dtype), _rounded(dys[k], dtype)
        kappa = max(kappa, oracle.condition_number(x64, convention=conv, axis=axis))
        ref = oracle.forward(x64, g64, b64, rm, rv, training=True, convention=conv, axis=axis, count=k)
        dx, dg, db = oracle.backward(dy64, x64, g64, training=True, convention=conv, axis=axis)
        what = f"{conv.name} step {k}"
        assert_close(y_s[k], ref.y, dtype, kappa=kappa, what=f"{what} y")
        assert_close(dx_s[k], dx, dtype, kappa=kappa, what=f"{what} dx")
        if affine:
            assert_close(dg_s[k], dg, stat_dtype, kappa=kappa, what=f"{what} dgamma")
            assert_close(db_s[k], db, stat_dtype, kappa=kappa, what=f"{what} dbeta")
        assert_close(rm_s[k], ref.running_mean, stat_dtype, kappa=kappa, what=f"{what} running_mean")
        assert_close(rv_s[k], ref.running_var, stat_dtype, kappa=kappa, what=f"{what} running_var")
        rm, rv = ref.running_mean, ref.running_var

    y_e, dx_e, dg_e, db_e, erm, erv, ec, rm_last, rv_last = eval_out
    assert int(ec) == STEPS
    np.testing.assert_array_equal(np.asarray(erm), np.asarray(rm_last))  # eval leaves them unchanged
    np.testing.assert_array_equal(np.asarray(erv), np.asarray(rv_last))
    x64, dy64 = _rounded(xs[STEPS], dtype), _rounded(dys[STEPS], dtype)
    kappa = max(kappa, oracle.condition_number(x64, convention=conv, axis=axis))
    ref = oracle.forward(x64, g64, b64, rm, rv, training=False, convention=conv, axis=axis, count=STEPS)
    dx, dg, db = oracle.backward(
        dy64, x64, g64, training=False, convention=conv, axis=axis, running_mean=rm, running_var=rv
    )
    assert_close(np.asarray(y_e, np.float64), ref.y, dtype, kappa=kappa, what=f"{conv.name} eval y")
    assert_close(np.asarray(dx_e, np.float64), dx, dtype, kappa=kappa, what=f"{conv.name} eval dx")
    if affine:
        assert_close(np.asarray(dg_e, np.float64), dg, stat_dtype, kappa=kappa, what=f"{conv.name} eval dgamma")
        assert_close(np.asarray(db_e, np.float64), db, stat_dtype, kappa=kappa, what=f"{conv.name} eval dbeta")


# -- float64: every preset, ranks 2-5, both feature axes ----------------------------------------

F64_CASES = [
    (name, rank, axis) for name in PRESETS for rank in (2, 3, 4, 5) for axis in ((1,) if rank == 2 else (1, -1))
]
assert len(F64_CASES) == len(PRESETS) * 7 == 42


@pytest.mark.parametrize(("preset", "rank", "axis"), F64_CASES, ids=[f"{p}-r{r}-ax{a}" for p, r, a in F64_CASES])
def test_float64_every_preset_rank_axis(preset, rank, axis):
    _check_sequence(PRESETS[preset], SHAPES[rank], axis, "float64", "float64", seed=rank * 10 + axis)


# -- low precision: every preset, rank 2 and 4, float32 / float16 / bfloat16 ---------------------

LOW_CASES = [(name, rank, dtype) for name in PRESETS for rank in (2, 4) for dtype in ("float32", "float16", "bfloat16")]
assert len(LOW_CASES) == 36


@pytest.mark.parametrize(("preset", "rank", "dtype"), LOW_CASES, ids=[f"{p}-r{r}-{d}" for p, r, d in LOW_CASES])
def test_low_precision_every_preset(preset, rank, dtype):
    conv = PRESETS[preset]
    _check_sequence(conv, SHAPES[rank], conv.feature_axis, dtype, "float32", seed=rank)


# -- variants: overrides, momentum=None, no affine ----------------------------------------------

VARIANTS = [
    ("pytorch-cma", dataclasses.replace(PRESETS["pytorch"], name="pytorch-cma", momentum=None), True),
    ("flax-cma", dataclasses.replace(PRESETS["flax"], name="flax-cma", momentum=None), True),
    ("keras-noaffine", PRESETS["keras"], False),
    ("onnx-m0.3-eps1e-2", resolve("onnx", eps=1e-2, momentum=0.3), True),
]
assert len(VARIANTS) == 4


@pytest.mark.parametrize(("conv", "affine"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_float64_variants(conv, affine):
    _check_sequence(conv, SHAPES[4], conv.feature_axis, "float64", "float64", seed=7, affine=affine)


def test_eps_and_momentum_keywords_override_the_convention():
    """batch_norm(eps=, momentum=None) equals batch_norm(convention=the resolved one)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 4, 3)))
    rm, rv = jnp.zeros(4), jnp.ones(4)
    got = batch_norm(x, None, None, rm, rv, training=True, convention="pytorch", count=2, eps=1e-1, momentum=None)
    conv = resolve("pytorch", eps=1e-1, momentum=None)
    ref = oracle.forward(np.asarray(x), None, None, np.zeros(4), np.ones(4), training=True, convention=conv, count=2)
    assert int(got[3]) == 3
    for a, e, what in zip(got[:3], (ref.y, ref.running_mean, ref.running_var), ("y", "rm", "rv")):
        assert_close(np.asarray(a), e, "float64", what=what)
    # and the override really changed something: the preset's own result differs
    plain = batch_norm(x, None, None, rm, rv, training=True, convention="pytorch", count=2)
    assert not np.allclose(np.asarray(plain[0]), ref.y)


# -- edge cases (§7) ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the oracle on NaN input
def test_nan_stays_in_its_channel():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 2, 2))
    x[1, 0, 1, 1] = np.nan
    x[2, 2, 0, 0] = np.inf
    y, rm, rv, _ = batch_norm(
        jnp.asarray(x), None, None, jnp.zeros(3), jnp.ones(3), training=True, convention="pytorch"
    )
    ref = oracle.forward(x, None, None, np.zeros(3), np.ones(3), training=True, convention="pytorch")
    y = np.asarray(y)
    assert np.isnan(y[:, 0]).all() and np.isnan(y[:, 2]).all()  # the whole channel, as the oracle says
    assert np.isfinite(y[:, 1]).all()
    assert_close(y, ref.y, "float64", what="y")
    assert_close(np.asarray(rm), ref.running_mean, "float64", what="running_mean")
    assert_close(np.asarray(rv), ref.running_var, "float64", what="running_var")


@pytest.mark.parametrize("preset", ["flax", "onnx"])
def test_single_value_allowed_and_zero_variance(preset):
    """n = 1 under single_value='allow' (§7.1) and a constant channel (§7.2): y = beta."""
    beta = np.array([0.5, -1.0])
    x1 = np.array([[3.0, -2.0]])  # n = 1
    xc = np.array([[1.0, 2.0], [1.0, 5.0], [1.0, -1.0]])  # channel 0 constant
    for x in (x1, xc):
        y, rm, rv, _ = batch_norm(
            jnp.asarray(x), jnp.ones(2), jnp.asarray(beta), jnp.zeros(2), jnp.ones(2), training=True, convention=preset
        )
        ref = oracle.forward(x, np.ones(2), beta, np.zeros(2), np.ones(2), training=True, convention=preset)
        assert_close(np.asarray(y), ref.y, "float64", what="y")
        assert_close(np.asarray(rv), ref.running_var, "float64", what="running_var")
    assert np.all(
        np.asarray(
            batch_norm(jnp.asarray(x1), None, jnp.asarray(beta), None, None, training=True, convention=preset)[0]
        )
        == beta
    )
