"""The derivative of bn_ref.jax's training forward: the closed form of spec §5.1 through a
``jax.custom_jvp`` (``bn_ref/jax/_core.py``), checked against the float64 oracle with the per-element
bound of §8.4, against float64 finite differences of the oracle's forward, and for jvp/vjp
consistency; masks, ``axis_name`` (via ``vmap``'s named axis), half precision and second order.

The case that motivated it: float32 data with std 1e15 (var ~ 1e30). Autodiff of
``rsqrt(var + eps)`` forms ``(var + eps)^(-3/2)`` ~ 1e-45, at float32's smallest subnormal, and the
variance term of dx vanished (0.11 relative error, 1.9e4 units of the bound).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_ref import PRESETS, oracle
from bn_ref.jax import batch_norm, batch_stats, normalize
from bn_ref.tolerances import element_bounds, element_units, round_to

CONV = PRESETS["flax"]  # feature axis -1


def _data(shape, loc, scale, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = loc + scale * (rng.standard_normal(shape) + 0.5 * rng.standard_normal(c))
    dy = rng.standard_normal(shape)
    g = 1.0 + 0.5 * rng.standard_normal(c)
    b = 0.25 * rng.standard_normal(c)
    return tuple(round_to(a, dtype) for a in (x, dy, g, b))


def _train(x, g, b, mask=None, axis_name=None):
    return batch_norm(x, g, b, None, None, training=True, convention=CONV, mask=mask, axis_name=axis_name)[0]


def _units(x, dy, g, b, grads, dtype):
    """Worst error of (dx, dgamma, dbeta) against the float64 oracle, in units of the §8.4 bound."""
    dx, dg, db = oracle.backward(dy, x, g, training=True, convention=CONV)
    expected = {"dx": dx, "dgamma": dg, "dbeta": db}
    bounds = element_bounds(x, expected=expected, dtype=dtype, training=True, eps=CONV.eps, axis=-1,
                            gamma=g, beta=b, dy=dy)
    return {k: element_units(np.asarray(a, np.float64), expected[k], bounds[k], dtype)
            for k, a in zip(("dx", "dgamma", "dbeta"), grads)}


HUGE = ((4, 5, 3), 1e12, 1e15)  # the catalogue's huge-scale case: shape, loc, scale


def test_huge_scale_float32_gradient_within_the_bound_and_old_autodiff_is_not():
    shape, loc, scale = HUGE
    x, dy, g, b = _data(shape, loc, scale)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, g, b)]
    _, vjp = jax.vjp(_train, *f32)
    units = _units(x, dy, g, b, vjp(jnp.asarray(dy, jnp.float32)), "float32")
    assert max(units.values()) <= 1.0, units

    # The composition the training path used before (autodiff through rsqrt) is far outside: the
    # check above can fail, and the closed form is what makes the difference.
    def autodiff(x, g, b):
        mean, var, _ = batch_stats(x, axis=-1)
        return normalize(x, mean, var, g, b, eps=CONV.eps, axis=-1)

    y_old, vjp_old = jax.vjp(autodiff, *f32)
    np.testing.assert_array_equal(np.asarray(y_old), np.asarray(_train(*f32)))  # same forward, bit for bit
    old = _units(x, dy, g, b, vjp_old(jnp.asarray(dy, jnp.float32)), "float32")
    assert old["dx"] > 100, old
    assert float(jax.grad(jax.lax.rsqrt)(jnp.float32(1e30))) == 0.0  # the underflow itself


_SCALES = [(0.0, 1.0), (100.0, 1.0), (1.0, 1e-3)]
_GRAD_CASES = [(dt, loc, sc) for dt in ("float32", "float16", "bfloat16") for loc, sc in _SCALES]
_GRAD_CASES += [("float32", 1e12, 1e15), ("float32", 0.0, 1e-15)]  # beyond the half-precision range


def test_gradient_case_count():
    assert len(_GRAD_CASES) == 11


@pytest.mark.parametrize("dtype,loc,scale", _GRAD_CASES)
def test_gradient_matches_the_oracle_within_the_bound(dtype, loc, scale):
    x, dy, g, b = _data((8, 3, 4), loc, scale, seed=1, dtype=dtype)
    args = [jnp.asarray(x, dtype), jnp.asarray(g, jnp.float32), jnp.asarray(b, jnp.float32)]
    _, vjp = jax.vjp(_train, *args)
    units = _units(x, dy, g, b, vjp(jnp.asarray(dy, dtype)), dtype)
    assert max(units.values()) <= 1.0, units


def test_huge_scale_directional_derivative_equals_float64_finite_differences():
    """<dy, J v> from the float32 gradient vs a central difference of the float64 oracle forward:
    an independent check of the closed form (the oracle's backward is not used)."""
    shape, loc, scale = HUGE
    x, dy, g, b = _data(shape, loc, scale, seed=2)
    # a direction with a component along x - mean, which the variance term of dx carries
    v = np.random.default_rng(3).standard_normal(shape) * scale + 2.0 * (x - x.mean(axis=(0, 1)))
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, g, b)]
    _, vjp = jax.vjp(lambda x: _train(x, f32[1], f32[2]), f32[0])
    (dx,) = vjp(jnp.asarray(dy, jnp.float32))
    got = float(np.sum(np.asarray(dx, np.float64) * v))

    def loss(h):
        return float(np.sum(dy * oracle.forward(x + h * v, g, b, None, None, training=True, convention=CONV).y))

    h = 1e-4
    fd = (loss(h) - loss(-h)) / (2 * h)
    scale_of_terms = float(np.sum(np.abs(np.asarray(dx, np.float64) * v)))
    assert abs(got - fd) <= 1e-4 * scale_of_terms, (got, fd, scale_of_terms)

    # autodiff through rsqrt (the former path) misses it by far more than that
    def autodiff(x):
        mean, var, _ = batch_stats(x, axis=-1)
        return normalize(x, mean, var, f32[1], f32[2], eps=CONV.eps, axis=-1)

    (dx_old,) = jax.vjp(autodiff, f32[0])[1](jnp.asarray(dy, jnp.float32))
    old = float(np.sum(np.asarray(dx_old, np.float64) * v))
    assert abs(old - fd) > 1e-2 * scale_of_terms, (old, fd, scale_of_terms)  # 100 x the tolerance above


@pytest.mark.parametrize("case", ["plain", "huge", "mask", "float16", "bfloat16"])
def test_jvp_and_vjp_are_transposes(case):
    """<J t, c> == <t, J^T c> for tangents of x, gamma and beta together: the reverse mode JAX
    derives from the custom JVP is the transpose of that JVP."""
    dtype = case if case in ("float16", "bfloat16") else "float32"
    loc, scale = (1e12, 1e15) if case == "huge" else (2.0, 3.0)
    x, ct, g, b = _data((6, 2, 5), loc, scale, seed=4, dtype=dtype)
    rng = np.random.default_rng(5)
    tx = round_to(rng.standard_normal(x.shape) * scale, dtype)
    tg, tb = rng.standard_normal(g.shape), rng.standard_normal(b.shape)
    mask = jnp.asarray([True, False, True, True, False, True]) if case == "mask" else None
    f = lambda x, g, b: _train(x, g, b, mask=mask).astype(jnp.float32)  # noqa: E731
    prim = (jnp.asarray(x, dtype), jnp.asarray(g, jnp.float32), jnp.asarray(b, jnp.float32))
    tans = (jnp.asarray(tx, dtype), jnp.asarray(tg, jnp.float32), jnp.asarray(tb, jnp.float32))
    _, jt = jax.jvp(f, prim, tans)
    _, vjp = jax.vjp(f, *prim)
    back = vjp(jnp.asarray(ct, jnp.float32))
    lhs = float(np.sum(np.asarray(jt, np.float64) * ct))
    rhs = sum(float(np.sum(np.asarray(a, np.float64) * np.asarray(t, np.float64))) for a, t in zip(back, tans))
    mag = float(np.sum(np.abs(np.asarray(jt, np.float64) * ct)))
    rel = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}[dtype]
    assert abs(lhs - rhs) <= rel * mag, (lhs, rhs, mag)
    # and the JVP itself is the oracle's J t (through the oracle's vjp: <J t, c> for c = e_k would
    # be n checks; one random c above, one more here)
    dx, dg, db = oracle.backward(ct, x, g, training=True, convention=CONV) if mask is None else (None,) * 3
    if dx is not None:
        want = float(np.sum(dx * tx) + np.sum(dg * tg) + np.sum(db * tb))
        assert abs(lhs - want) <= rel * mag + 1e-6 * abs(want), (lhs, want)


def test_huge_scale_with_mask_and_nan_padding():
    shape, loc, scale = HUGE
    x, dy, g, b = _data((6,) + shape[1:], loc, scale, seed=6)
    keep = np.array([True, True, False, True, True, False])
    xp = x.copy()
    xp[~keep] = np.nan  # padding must not leak into anything
    f = lambda x, g, b: _train(x, g, b, mask=jnp.asarray(keep))  # noqa: E731
    _, vjp = jax.vjp(f, *(jnp.asarray(a, jnp.float32) for a in (xp, g, b)))
    dx, dg, db = vjp(jnp.asarray(dy, jnp.float32))
    dx = np.asarray(dx)
    np.testing.assert_array_equal(dx[~keep], 0.0)
    units = _units(x[keep], dy[keep], g, b, (dx[keep], dg, db), "float32")
    assert max(units.values()) <= 1.0, units


def test_huge_scale_across_devices_equals_the_global_batch():
    """axis_name: the means of the tangent are over every device's (unmasked) values. vmap's named
    axis runs the collectives on one device; 3 'devices' with 4, 2 and 3 real samples of 4."""
    shape, loc, scale = HUGE
    x, dy, g, b = _data((12,) + shape[1:], loc, scale, seed=7)
    keep = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    xs, dys, ks = (a.reshape((3, 4) + a.shape[1:]) for a in (x, dy, keep))

    def per_device(x, m, g, b):
        return _train(x, g, b, mask=m, axis_name="d")

    def global_loss(x, g, b, ct):
        y = jax.vmap(per_device, in_axes=(0, 0, None, None), axis_name="d")(x, jnp.asarray(ks), g, b)
        return jnp.sum(y * ct)

    grads = jax.grad(global_loss, argnums=(0, 1, 2))(
        jnp.asarray(xs, jnp.float32), jnp.asarray(g, jnp.float32), jnp.asarray(b, jnp.float32),
        jnp.asarray(dys, jnp.float32))
    dx = np.asarray(grads[0]).reshape(x.shape)
    np.testing.assert_array_equal(dx[~keep], 0.0)
    units = _units(x[keep], dy[keep], g, b, (dx[keep], grads[1], grads[2]), "float32")
    assert max(units.values()) <= 1.0, units


def test_jit_vmap_grad_compose():
    x, dy, g, b = _data((3, 5, 4, 2), 1.0, 2.0, seed=8)  # 3 independent models of (5, 4, 2)
    gx = jax.jit(jax.vmap(jax.grad(lambda x, dy: jnp.sum(_train(x, jnp.asarray(g), jnp.asarray(b)) * dy))))
    dx = np.asarray(gx(jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)))
    for i in range(3):
        want = oracle.backward(dy[i], x[i], g, training=True, convention=CONV)[0]
        bound = element_bounds(x[i], expected={"dx": want}, dtype="float32", training=True, eps=CONV.eps, axis=-1,
                               gamma=g, beta=b, dy=dy[i])["dx"]
        assert element_units(dx[i], want, bound, "float32") <= 1.0


@pytest.mark.usefixtures("x64")
def test_second_order_equals_finite_differences_of_the_gradient():
    """grad of grad (JAX differentiates the JVP rule) vs central differences of the closed-form
    gradient, float64; and jacfwd of grad (forward over reverse) agrees with it."""
    x, dy, g, b = _data((5, 3), 0.5, 2.0, seed=9, dtype="float64")
    g_, b_, dy_ = jnp.asarray(g), jnp.asarray(b), jnp.asarray(dy)

    def loss(x):
        y = _train(x, g_, b_)
        return jnp.sum(jnp.sin(y) * dy_)  # nonlinear in y, so the second derivative sees d(dx)/dx

    grad = jax.grad(loss)
    v = np.random.default_rng(10).standard_normal(x.shape)
    hv = np.asarray(jax.jvp(grad, (jnp.asarray(x),), (jnp.asarray(v),))[1])
    h = 1e-5
    fd = (np.asarray(grad(jnp.asarray(x + h * v))) - np.asarray(grad(jnp.asarray(x - h * v)))) / (2 * h)
    np.testing.assert_allclose(hv, fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())
    ggrad = np.asarray(jax.grad(lambda x: jnp.vdot(grad(x), jnp.asarray(v)))(jnp.asarray(x)))
    np.testing.assert_allclose(ggrad, hv, rtol=1e-9, atol=1e-12)  # the Hessian is symmetric
