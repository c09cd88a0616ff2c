"""The NumPy oracle against independent references: finite differences, invariances, hand-written
step-by-step running statistics, edge cases, and every validation error (docs/spec.md §2-§8).
Also the tolerance machinery (§8.4)."""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bn_ref import oracle
from bn_ref.conventions import PRESETS, Convention
from bn_ref.tolerances import C_COND, TOLERANCES, assert_close, error_units, tolerance

PRESET_NAMES = list(PRESETS)
assert len(PRESET_NAMES) == 6


# -- helpers ----------------------------------------------------------------------------------


def _ax(ndim: int, axis: int | None, conv: Convention) -> int:
    return (conv.feature_axis if axis is None else axis) % ndim


def _bshape(ndim: int, ax: int, c: int) -> tuple[int, ...]:
    return tuple(c if i == ax else 1 for i in range(ndim))


def _red(ndim: int, ax: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != ax)


@st.composite
def bn_cases(draw, *, max_size: int = 64, min_n: int = 1):
    """(shape, axis-or-None, convention name, seed); the feature axis is never 0."""
    rank = draw(st.integers(2, 5))
    hi = 5 if rank <= 3 else 3
    shape = tuple(draw(st.lists(st.integers(1, hi), min_size=rank, max_size=rank)))
    assume(math.prod(shape) <= max_size)
    name = draw(st.sampled_from(PRESET_NAMES))
    positions = list(range(1, rank)) + list(range(-(rank - 1), 0))
    axis = draw(st.one_of(st.none(), st.sampled_from(positions)))
    conv = PRESETS[name]
    ax = _ax(rank, axis, conv)
    n = math.prod(shape) // shape[ax]
    assume(n >= min_n)
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, axis, name, seed


def _arrays(shape, axis, conv, seed):
    """x with a per-channel offset and spread, gamma, beta, running stats and dy, all float64."""
    rng = np.random.default_rng(seed)
    ax = _ax(len(shape), axis, conv)
    c = shape[ax]
    bs = _bshape(len(shape), ax, c)
    x = rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=c).reshape(bs) + rng.uniform(-3, 3, size=c).reshape(bs)
    gamma = rng.uniform(0.5, 2.0, size=c) * rng.choice([-1.0, 1.0], size=c)
    beta = rng.normal(size=c)
    rm = rng.normal(size=c)
    rv = rng.uniform(0.5, 2.0, size=c)
    dy = rng.normal(size=shape)
    return x, gamma, beta, rm, rv, dy


def _well_spread(x, axis, conv) -> bool:
    """Batch variance not tiny in any channel (n = 1 channels, var 0 exactly, are fine)."""
    ax = _ax(x.ndim, axis, conv)
    n = x.size // x.shape[ax]
    return n == 1 or float(np.var(x, axis=_red(x.ndim, ax)).min()) > 0.05


def _fd(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar function f at a."""
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        ap, am = a.copy(), a.copy()
        ap[idx] += h
        am[idx] -= h
        g[idx] = (f(ap) - f(am)) / (2 * h)
    return g


def _close_fd(analytic, numeric, what):
    scale = 1.0 + float(np.max(np.abs(numeric))) if numeric.size else 1.0
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=2e-6 * scale, err_msg=what)


# -- backward vs finite differences (§5) -------------------------------------------------------


@settings(max_examples=80)
@given(case=bn_cases(), training=st.booleans(), affine=st.sampled_from(["both", "gamma", "beta", "none"]))
def test_backward_matches_finite_differences(case, training, affine):
    shape, axis, name, seed = case
    conv = PRESETS[name]
    x, gamma, beta, rm, rv, dy = _arrays(shape, axis, conv, seed)
    ax = _ax(len(shape), axis, conv)
    n = x.size // shape[ax]
    if training:
        assume(n > 1 or conv.single_value == "allow")
        assume(_well_spread(x, axis, conv))
    g = gamma if affine in ("both", "gamma") else None
    b = beta if affine in ("both", "beta") else None

    def loss(x_=x, g_=g, b_=b):
        res = oracle.forward(x_, g_, b_, rm, rv, training=training, convention=conv, axis=axis)
        return float(np.sum(res.y * dy))

    dx, dgamma, dbeta = oracle.backward(
        dy, x, g, training=training, convention=conv, axis=axis, running_mean=rm, running_var=rv
    )
    assert dx.shape == x.shape and dx.dtype == np.float64
    _close_fd(dx, _fd(lambda a: loss(x_=a), x), "dx")
    if g is None:
        assert dgamma is None
    else:
        _close_fd(dgamma, _fd(lambda a: loss(g_=a), g), "dgamma")
    # dbeta is the gradient of a shift, whether or not the layer has one (beta=0 adds nothing).
    _close_fd(dbeta, _fd(lambda a: loss(b_=a), beta if b is not None else np.zeros_like(beta)), "dbeta")


def test_backward_running_stats_ignored_in_training():
    x, gamma, _, rm, rv, dy = _arrays((5, 3, 2), None, PRESETS["pytorch"], 3)
    with_stats = oracle.backward(dy, x, gamma, training=True, convention="pytorch", running_mean=rm, running_var=rv)
    without = oracle.backward(dy, x, gamma, training=True, convention="pytorch")
    for a, b in zip(with_stats, without):
        np.testing.assert_array_equal(a, b)


# -- invariances in training (§2.2, §5.1) -----------------------------------------------------


@given(case=bn_cases(min_n=2))
def test_training_output_invariant_to_shift_and_scale(case):
    shape, axis, name, seed = case
    conv = PRESETS[name]
    x, gamma, beta, _, _, _ = _arrays(shape, axis, conv, seed)
    assume(_well_spread(x, axis, conv))
    ax = _ax(len(shape), axis, conv)
    c = shape[ax]
    bs = _bshape(len(shape), ax, c)
    rng = np.random.default_rng(seed + 1)
    shift = rng.uniform(-50, 50, size=c)
    scale = rng.uniform(0.2, 5.0, size=c)
    a = float(rng.uniform(0.2, 5.0))

    def y(x_, conv_):
        return oracle.forward(x_, gamma, beta, None, None, training=True, convention=conv_, axis=axis)

    base = y(x, conv)
    # A per-channel shift changes neither the variance nor x - mean: invariance with the real eps.
    shifted = y(x + shift.reshape(bs), conv)
    np.testing.assert_allclose(shifted.y, base.y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(shifted.batch_mean, base.batch_mean + shift, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(shifted.batch_var, base.batch_var, rtol=1e-9)
    # Per-channel positive scale: invariance once eps is negligible against the variance.
    tiny = dataclasses.replace(conv, eps=1e-30)
    scaled = y(x * scale.reshape(bs) + shift.reshape(bs), tiny)
    np.testing.assert_allclose(scaled.y, y(x, tiny).y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scaled.batch_var, base.batch_var * scale**2, rtol=1e-9)
    # One common scale a with eps scaled by a**2 is an exact identity: x_hat(a x; a^2 eps) = x_hat(x; eps).
    rescaled = y(a * x, dataclasses.replace(conv, eps=conv.eps * a * a))
    np.testing.assert_allclose(rescaled.y, base.y, rtol=1e-10, atol=1e-10)


@given(case=bn_cases(min_n=2), gamma_kind=st.sampled_from(["none", "ones"]))
def test_gradient_sums_vanish(case, gamma_kind):
    """Σ dx = 0 per channel; Σ dx·x̂ = 0 per channel up to eps, and exactly eps·g·inv_std·dγ/(var+eps)."""
    shape, axis, name, seed = case
    conv = PRESETS[name]
    x, _, _, _, _, dy = _arrays(shape, axis, conv, seed)
    assume(_well_spread(x, axis, conv))
    ax = _ax(len(shape), axis, conv)
    red = _red(len(shape), ax)
    g = None if gamma_kind == "none" else np.ones(shape[ax])
    for conv_ in (dataclasses.replace(conv, eps=1e-30), conv):
        dx, _, _ = oracle.backward(dy, x, g, training=True, convention=conv_, axis=axis)
        x_hat = oracle.normalized(x, convention=conv_, axis=axis)
        scale = float(np.abs(dx).sum() + np.abs(dy).sum())
        np.testing.assert_allclose(dx.sum(axis=red), 0.0, atol=1e-12 * scale)
        s = (dx * x_hat).sum(axis=red)
        var = np.var(x, axis=red)
        dgamma = (dy * x_hat).sum(axis=red)
        expected = conv_.eps * dgamma / (var + conv_.eps) ** 1.5
        np.testing.assert_allclose(s, expected, atol=1e-12 * scale)
        if conv_.eps == 1e-30:
            np.testing.assert_allclose(s, 0.0, atol=1e-12 * scale)


# -- running statistics over several steps (§3) -----------------------------------------------

RUN_SHAPES = [(6, 3), (4, 3, 5), (2, 4, 3, 3), (3, 2, 2, 2, 3)]


def _reference_running(conv, batches, rm0, rv0, axis):
    """Independent step-by-step recomputation from np.mean / np.var(ddof=...)."""
    rm, rv = rm0.copy(), rv0.copy()
    ddof = 1 if conv.running_var == "unbiased" else 0
    means, variances = [], []
    for xb in batches:
        red = _red(xb.ndim, _ax(xb.ndim, axis, conv))
        bm = np.mean(xb, axis=red)
        bv = np.var(xb, axis=red, ddof=ddof)
        means.append(bm)
        variances.append(bv)
        m = conv.momentum
        if m is None:
            rm, rv = np.mean(means, axis=0), np.mean(variances, axis=0)
        elif conv.momentum_on == "batch":
            rm, rv = (1 - m) * rm + m * bm, (1 - m) * rv + m * bv
        else:
            rm, rv = m * rm + (1 - m) * bm, m * rv + (1 - m) * bv
    return rm, rv


RUN_CASES = [(name, shape, cma) for name in PRESET_NAMES for shape in RUN_SHAPES for cma in (False, True)]
assert len(RUN_CASES) == 48


@pytest.mark.parametrize("name, shape, cma", RUN_CASES)
def test_running_statistics_over_steps(name, shape, cma):
    conv = PRESETS[name]
    if cma:
        conv = dataclasses.replace(conv, name=name + "-cma", momentum=None)
    rng = np.random.default_rng(RUN_CASES.index((name, shape, cma)))
    c = shape[conv.feature_axis]
    bs = _bshape(len(shape), conv.feature_axis % len(shape), c)
    batches = [rng.normal(size=shape) * 1.5 + rng.normal(size=c).reshape(bs) * 4 for _ in range(5)]
    rm0, rv0 = rng.normal(size=c), rng.uniform(0.5, 2, size=c)
    saved = rm0.copy(), rv0.copy()
    rm, rv, count = rm0.copy(), rv0.copy(), 0
    for xb in batches:
        res = oracle.forward(xb, None, None, rm, rv, training=True, convention=conv, count=count)
        assert res.count == count + 1
        rm, rv, count = res.running_mean, res.running_var, res.count
    exp_m, exp_v = _reference_running(conv, batches, rm0, rv0, None)
    np.testing.assert_allclose(rm, exp_m, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(rv, exp_v, rtol=1e-12, atol=1e-13)
    if cma:  # plain mean of the batch statistics: the initial running values are forgotten
        red = _red(len(shape), conv.feature_axis % len(shape))
        np.testing.assert_allclose(rm, np.mean([b.mean(axis=red) for b in batches], axis=0), rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(rm0, saved[0])  # the caller's arrays are untouched
    np.testing.assert_array_equal(rv0, saved[1])
    assert count == 5


@pytest.mark.parametrize("momentum_on", ["batch", "running"])
@pytest.mark.parametrize("m", [0.0, 1.0])
def test_running_statistics_extreme_momentum(momentum_on, m):
    conv = Convention("t", 1e-5, m, momentum_on, "biased", 1, "allow")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 3)) + 2
    rm, rv = rng.normal(size=3), rng.uniform(1, 2, size=3)
    res = oracle.forward(x, None, None, rm, rv, training=True, convention=conv)
    keep_old = (momentum_on == "batch") == (m == 0.0)
    np.testing.assert_allclose(res.running_mean, rm if keep_old else x.mean(0), rtol=1e-15)
    np.testing.assert_allclose(res.running_var, rv if keep_old else x.var(0), rtol=1e-15)


def test_training_forward_against_direct_formula_and_no_running():
    x, gamma, beta, rm, rv, _ = _arrays((4, 3, 5), None, PRESETS["pytorch"], 11)
    res = oracle.forward(x, gamma, beta, None, None, training=True, convention="pytorch")
    assert res.running_mean is None and res.running_var is None and res.count == 1
    mean = x.mean(axis=(0, 2), keepdims=True)
    var = x.var(axis=(0, 2), keepdims=True)
    y = gamma[None, :, None] * (x - mean) / np.sqrt(var + 1e-5) + beta[None, :, None]
    np.testing.assert_allclose(res.y, y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(res.batch_mean, mean.ravel(), rtol=1e-14)
    np.testing.assert_allclose(res.batch_var, var.ravel(), rtol=1e-13)  # biased, whatever running_var says


def test_forward_does_not_mutate_inputs():
    x, gamma, beta, rm, rv, _ = _arrays((4, 3), None, PRESETS["pytorch"], 2)
    copies = [a.copy() for a in (x, gamma, beta, rm, rv)]
    oracle.forward(x, gamma, beta, rm, rv, training=True, convention="pytorch")
    res = oracle.forward(x, gamma, beta, rm, rv, training=False, convention="pytorch")
    for a, b in zip((x, gamma, beta, rm, rv), copies):
        np.testing.assert_array_equal(a, b)
    assert res.running_mean is not rm


# -- eval (§4) ----------------------------------------------------------------------------------


@given(case=bn_cases(), affine=st.booleans())
def test_eval_forward(case, affine):
    shape, axis, name, seed = case
    conv = PRESETS[name]
    x, gamma, beta, rm, rv, _ = _arrays(shape, axis, conv, seed)
    g, b = (gamma, beta) if affine else (None, None)
    res = oracle.forward(x, g, b, rm, rv, training=False, convention=conv, axis=axis, count=3)
    xm = np.moveaxis(x, _ax(len(shape), axis, conv), -1)  # channels last: broadcasting does the rest
    y = (xm - rm) / np.sqrt(rv + conv.eps)
    if affine:
        y = y * gamma + beta
    np.testing.assert_allclose(res.y, np.moveaxis(y, -1, _ax(len(shape), axis, conv)), rtol=1e-13, atol=1e-13)
    assert res.batch_mean is None and res.batch_var is None and res.count == 3
    np.testing.assert_array_equal(res.running_mean, rm)
    np.testing.assert_array_equal(res.running_var, rv)


def test_eval_single_value_and_empty_batch_are_fine():
    rm, rv = np.array([1.0, 2.0]), np.array([4.0, 1.0])
    res = oracle.forward(np.array([[3.0, 2.0]]), None, None, rm, rv, training=False, convention="pytorch")
    np.testing.assert_allclose(res.y, [[2.0 / np.sqrt(4 + 1e-5), 0.0]])
    empty = oracle.forward(np.zeros((0, 2)), None, None, rm, rv, training=False, convention="pytorch")
    assert empty.y.shape == (0, 2)


# -- edge cases (§7) --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 1, 1, 4)])
def test_single_value_error(shape):
    x = np.ones(shape)
    with pytest.raises(ValueError, match="n = 1") as info:
        oracle.forward(x, None, None, None, None, training=True, convention="pytorch", axis=-1 if shape[-1] == 4 else 1)
    assert str(shape) in str(info.value)
    with pytest.raises(ValueError, match="n = 1"):
        oracle.backward(x, x, None, training=True, convention="pytorch", axis=-1 if shape[-1] == 4 else 1)


@pytest.mark.parametrize("name", ["flax", "keras", "tf_fused", "onnx", "d2l"])
def test_single_value_allow(name):
    conv = PRESETS[name]
    assert conv.single_value == "allow"
    rng = np.random.default_rng(7)
    shape = (1, 4) if conv.feature_axis == -1 else (1, 4, 1)
    x = rng.normal(size=shape) * 10
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    rm, rv = rng.normal(size=4), rng.uniform(1, 2, size=4)
    res = oracle.forward(x, gamma, beta, rm, rv, training=True, convention=conv)
    np.testing.assert_array_equal(res.y.reshape(4), beta)
    np.testing.assert_array_equal(res.batch_var, np.zeros(4))
    np.testing.assert_array_equal(res.batch_mean, x.reshape(4))
    # var 0 is fed to the running variance, unbiased or not (the correction is 1 at n = 1).
    w = conv.momentum
    np.testing.assert_allclose(res.running_var, w * rv, rtol=1e-15)
    np.testing.assert_allclose(res.running_mean, w * rm + (1 - w) * x.reshape(4), rtol=1e-14)
    dx, dgamma, dbeta = oracle.backward(rng.normal(size=shape), x, gamma, training=True, convention=conv)
    np.testing.assert_array_equal(dx, np.zeros(shape))
    np.testing.assert_array_equal(dgamma, np.zeros(4))


def test_zero_variance_channel():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 3, 2))
    x[:, 1, :] = 0.1  # constant channel (0.1 is inexact: the mean may differ from it by an ulp)
    gamma, beta = np.array([1.5, 2.0, -1.0]), np.array([0.3, -0.7, 0.2])
    res = oracle.forward(x, gamma, beta, np.zeros(3), np.ones(3), training=True, convention="pytorch")
    assert np.all(np.isfinite(res.y))
    np.testing.assert_allclose(res.y[:, 1, :], beta[1], atol=1e-10)
    assert res.batch_var[1] < 1e-30
    dy = rng.normal(size=x.shape)
    dx, dgamma, dbeta = oracle.backward(dy, x, gamma, training=True, convention="pytorch")
    assert np.all(np.isfinite(dx))
    # x_hat = 0 there, so dx = g / sqrt(eps) * (dy - mean(dy)).
    expected = gamma[1] / np.sqrt(1e-5) * (dy[:, 1, :] - dy[:, 1, :].mean())
    np.testing.assert_allclose(dx[:, 1, :], expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("training", [True, False])
def test_nonfinite_stays_in_its_channel(bad, training):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(5, 4, 3))
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    rm, rv = rng.normal(size=4), rng.uniform(1, 2, size=4)
    dy = rng.normal(size=x.shape)
    xb = x.copy()
    xb[2, 1, 0] = bad
    with np.errstate(invalid="ignore"):
        res = oracle.forward(xb, gamma, beta, rm, rv, training=training, convention="pytorch")
        dx, dgamma, dbeta = oracle.backward(
            dy, xb, gamma, training=training, convention="pytorch", running_mean=rm, running_var=rv
        )
    clean = oracle.forward(x, gamma, beta, rm, rv, training=training, convention="pytorch")
    cdx, cdgamma, cdbeta = oracle.backward(
        dy, x, gamma, training=training, convention="pytorch", running_mean=rm, running_var=rv
    )
    others = [0, 2, 3]
    np.testing.assert_array_equal(res.y[:, others], clean.y[:, others])
    np.testing.assert_array_equal(dx[:, others], cdx[:, others])
    np.testing.assert_array_equal(dgamma[others], cdgamma[others])
    np.testing.assert_array_equal(dbeta, cdbeta)
    if training:
        assert np.all(np.isnan(res.y[:, 1]))  # the mean is non-finite, so every x - mean is NaN or inf - inf
        assert np.isnan(res.running_var[1]) and not np.isfinite(res.running_mean[1])
        np.testing.assert_array_equal(res.running_mean[others], clean.running_mean[others])
        assert np.all(np.isnan(dx[:, 1]))
    else:
        # Eval is elementwise: only the bad element is affected, as IEEE arithmetic says.
        mask = np.zeros(x.shape, bool)
        mask[2, 1, 0] = True
        expected_bad = gamma[1] * (bad - rm[1]) / np.sqrt(rv[1] + 1e-5) + beta[1]
        np.testing.assert_array_equal(res.y[mask], [expected_bad])
        np.testing.assert_array_equal(res.y[~mask], clean.y[~mask])
        np.testing.assert_array_equal(res.running_mean, rm)
        assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16, np.float64])
def test_low_precision_inputs_are_computed_in_float64(dtype):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4, 3)).astype(dtype)
    g = rng.normal(size=3).astype(dtype)
    res = oracle.forward(x, g, g, g, np.abs(g), training=True, convention="onnx")
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    ref = oracle.forward(x64, g64, g64, g64, np.abs(g64), training=True, convention="onnx")
    assert res.y.dtype == np.float64
    np.testing.assert_array_equal(res.y, ref.y)
    np.testing.assert_array_equal(res.running_var, ref.running_var)


def test_condition_number():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(50, 2))
    assert oracle.condition_number(x, convention="pytorch") == pytest.approx(
        max(1.0, float((np.abs(x).max(0) / np.sqrt(x.var(0) + 1e-5)).max()))
    )
    shifted = x + np.array([1000.0, 0.0])
    assert oracle.condition_number(shifted, convention="pytorch") > 500
    assert oracle.condition_number(np.zeros((3, 2)), convention="pytorch") == 1.0
    with_nan = shifted.copy()
    with_nan[0, 1] = np.nan
    assert math.isfinite(oracle.condition_number(with_nan, convention="pytorch"))


# -- validation errors (§7.5) -------------------------------------------------------------------


def _good(shape=(4, 3)):
    rng = np.random.default_rng(0)
    c = shape[1]
    return dict(
        x=rng.normal(size=shape), gamma=np.ones(c), beta=np.zeros(c), running_mean=np.zeros(c), running_var=np.ones(c)
    )


def _fwd(training=True, convention="pytorch", **over):
    a = _good()
    a.update(over)
    x = a.pop("x")
    return oracle.forward(
        x, a["gamma"], a["beta"], a["running_mean"], a["running_var"], training=training, convention=convention
    )


@pytest.mark.parametrize("x", [np.zeros(3), np.float64(1.0), np.zeros((0,))])
def test_wrong_rank(x):
    with pytest.raises(ValueError, match=r"x must have rank >= 2") as info:
        oracle.forward(x, None, None, None, None, training=True, convention="pytorch")
    assert str(tuple(np.shape(x))) in str(info.value)
    with pytest.raises(ValueError, match="x must have rank"):
        oracle.backward(x, x, None, training=True, convention="pytorch")


PER_CHANNEL = ["gamma", "beta", "running_mean", "running_var"]


@pytest.mark.parametrize("arg", PER_CHANNEL)
@pytest.mark.parametrize("bad_shape", [(4,), (2,), (1, 3), (3, 1), ()])
@pytest.mark.parametrize("training", [True, False])
def test_feature_size_mismatch(arg, bad_shape, training):
    with pytest.raises(ValueError, match=rf"{arg} must have shape \(C,\) = \(3,\)") as info:
        _fwd(training=training, **{arg: np.ones(bad_shape)})
    assert str(bad_shape) in str(info.value)


@pytest.mark.parametrize("arg", ["gamma", "running_mean", "running_var"])
def test_feature_size_mismatch_backward(arg):
    a = _good()
    kw = dict(running_mean=a["running_mean"], running_var=a["running_var"])
    g = a["gamma"]
    if arg == "gamma":
        g = np.ones(5)
    else:
        kw[arg] = np.ones(5)
    with pytest.raises(ValueError, match=rf"{arg} must have shape \(C,\)"):
        oracle.backward(a["x"], a["x"], g, training=False, convention="pytorch", **kw)


NON_FLOAT = [np.int64, np.int32, np.uint8, np.bool_, np.complex128, np.object_]


@pytest.mark.parametrize("arg", ["x", *PER_CHANNEL])
@pytest.mark.parametrize("dtype", NON_FLOAT)
def test_non_floating_dtype_forward(arg, dtype):
    a = _good()
    with pytest.raises(TypeError, match=rf"{arg} must have a real floating dtype") as info:
        _fwd(**{arg: a[arg].astype(dtype)})
    assert np.dtype(dtype).name in str(info.value)


@pytest.mark.parametrize("arg", ["dy", "x", "gamma", "running_mean", "running_var"])
@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64])
def test_non_floating_dtype_backward(arg, dtype):
    a = _good()
    a["dy"] = np.ones_like(a["x"])
    a[arg] = a[arg].astype(dtype)
    with pytest.raises(TypeError, match=rf"{arg} must have a real floating dtype"):
        oracle.backward(
            a["dy"],
            a["x"],
            a["gamma"],
            training=False,
            convention="pytorch",
            running_mean=a["running_mean"],
            running_var=a["running_var"],
        )


def test_python_list_of_ints_is_rejected():
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        oracle.forward([[1, 2], [3, 4]], None, None, None, None, training=True, convention="pytorch")


@pytest.mark.parametrize("field, value", [("eps", 0.0), ("eps", -1e-3), ("momentum", -0.5), ("momentum", 1.01)])
def test_bad_eps_momentum_via_convention(field, value):
    with pytest.raises(ValueError, match=field):
        _fwd(convention=dataclasses.replace(PRESETS["pytorch"], **{field: value}))


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 2), (2, 3, 0)])
def test_empty_batch(shape):
    with pytest.raises(ValueError, match="empty batch") as info:
        oracle.forward(np.zeros(shape), None, None, None, None, training=True, convention="onnx", axis=1)
    assert str(shape) in str(info.value)
    with pytest.raises(ValueError, match="empty batch"):
        oracle.backward(np.zeros(shape), np.zeros(shape), None, training=True, convention="onnx", axis=1)


def test_missing_running_stats_in_eval():
    with pytest.raises(ValueError, match="running_mean and running_var"):
        _fwd(training=False, running_mean=None, running_var=None)
    x = _good()["x"]
    with pytest.raises(ValueError, match="running_mean and running_var"):
        oracle.backward(x, x, None, training=False, convention="pytorch")
    with pytest.raises(ValueError, match="running_mean and running_var"):
        oracle.backward(x, x, None, training=False, convention="pytorch", running_mean=np.zeros(3))


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_running_stats_given_together(missing):
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        _fwd(training=True, **{missing: None})


@pytest.mark.parametrize("dy_shape", [(4, 2), (3, 4), (4, 3, 1), (12,)])
def test_dy_shape_mismatch(dy_shape):
    x = _good()["x"]
    with pytest.raises(ValueError, match=r"dy must have the shape of x, \(4, 3\)") as info:
        oracle.backward(np.ones(dy_shape), x, None, training=True, convention="pytorch")
    assert str(dy_shape) in str(info.value)


@pytest.mark.parametrize("flag", [1, 0, "False", None, 1.0, np.array([True])])
def test_training_must_be_bool(flag):
    with pytest.raises(TypeError, match="training must be a bool"):
        _fwd(training=flag)
    x = _good()["x"]
    with pytest.raises(TypeError, match="training must be a bool"):
        oracle.backward(x, x, None, training=flag, convention="pytorch")


def test_numpy_bool_training_is_accepted():
    assert _fwd(training=np.bool_(True)).count == 1


@pytest.mark.parametrize("count", [-1, 1.5, True, "2"])
def test_bad_count(count):
    with pytest.raises(ValueError, match="count"):
        oracle.forward(_good()["x"], None, None, None, None, training=True, convention="pytorch", count=count)


@pytest.mark.parametrize(
    "axis, exc, word",
    [
        (0, ValueError, "batch axis"),
        (2, ValueError, "out of range"),
        (-3, ValueError, "out of range"),
        (1.0, TypeError, "axis"),
        (True, TypeError, "axis"),
    ],
)
def test_bad_axis(axis, exc, word):
    with pytest.raises(exc, match=word):
        oracle.forward(_good()["x"], None, None, None, None, training=True, convention="pytorch", axis=axis)


def test_bad_convention():
    with pytest.raises(ValueError, match="valid names"):
        _fwd(convention="caffe")
    with pytest.raises(TypeError, match="convention"):
        _fwd(convention=None)


# -- tolerances (§8.4) --------------------------------------------------------------------------


def test_tolerance_lookup():
    assert set(TOLERANCES) == {"float64", "float32", "float16", "bfloat16"}
    assert tolerance("float32") is TOLERANCES["float32"]
    assert tolerance(np.dtype("float16")) is TOLERANCES["float16"]
    assert tolerance(np.dtype(ml_dtypes.bfloat16)) is TOLERANCES["bfloat16"]
    # Looser for lower precision; u is the unit round-off.
    order = ["float64", "float32", "float16", "bfloat16"]
    for lo, hi in zip(order, order[1:]):
        assert TOLERANCES[lo].rtol < TOLERANCES[hi].rtol and TOLERANCES[lo].u < TOLERANCES[hi].u
    assert TOLERANCES["float32"].u == np.finfo(np.float32).eps / 2
    with pytest.raises(ValueError, match="no tolerance for dtype"):
        tolerance("int32")


def test_error_units_scale():
    rng = np.random.default_rng(13)
    e = rng.normal(size=(5, 4)) * 3
    tol = TOLERANCES["float32"]
    m = float(np.abs(e).max())
    for kappa in (1.0, 0.5, 40.0):
        bound = tol.atol + tol.rtol * m + C_COND * tol.u * max(kappa, 1.0) * m
        for frac in (0.0, 0.5, 1.0, 3.0):
            a = e.copy()
            a[1, 2] += frac * bound
            assert error_units(a, e, "float32", kappa=kappa) == pytest.approx(frac, rel=1e-6, abs=1e-12)
    assert error_units(e, e, "float64") == 0.0


def test_error_units_nonfinite_rules():
    e = np.array([1.0, np.nan, np.inf, -np.inf, 2.0])
    assert error_units(e.copy(), e, "float64") == 0.0
    moved_nan = np.array([np.nan, 1.0, np.inf, -np.inf, 2.0])
    assert error_units(moved_nan, e, "float64") == math.inf
    finite_for_nan = np.array([1.0, 5.0, np.inf, -np.inf, 2.0])
    assert error_units(finite_for_nan, e, "float64") == math.inf
    wrong_sign_inf = np.array([1.0, np.nan, -np.inf, -np.inf, 2.0])
    assert error_units(wrong_sign_inf, e, "float64") == math.inf
    finite_for_inf = np.array([1.0, np.nan, 1e300, -np.inf, 2.0])
    assert error_units(finite_for_inf, e, "float64") == math.inf
    assert error_units(np.ones(3), np.ones(4), "float64") == math.inf
    assert error_units(np.full(2, np.nan), np.full(2, np.nan), "float16") == 0.0
    # The bound uses the largest *finite* magnitude of expected.
    assert error_units([1.0 + 1e-12, np.inf], [1.0, np.inf], "float64") == pytest.approx(
        1e-12 / (1e-12 + 1e-10), rel=1e-3
    )


def test_assert_close():
    e = np.linspace(-2, 2, 9)
    assert_close(e + 1e-7, e, "float32")
    with pytest.raises(AssertionError, match="y .float32.: error"):
        assert_close(e + 1e-3, e, "float32", what="y")
    with pytest.raises(AssertionError):
        assert_close(np.append(e[:-1], np.nan), e, "bfloat16")
    assert_close(e + 1e-3, e, "float32", kappa=1e4)  # conditioning buys exactly that slack
