"""bn_ref.jax.variants against the NumPy reference bn_ref.variants (spec §13-§16), float64:
values, running statistics, the renorm pair and reverse-mode gradients; and under jax.jit."""

from __future__ import annotations

import numpy as np
import pytest

from bn_ref import variants
from bn_ref.variants import Variant

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from bn_ref.jax.variants import RenormState, batch_norm_variant  # noqa: E402

G = np.array([1.5, -0.5, 2.0])
B = np.array([0.1, 0.2, -0.3])
RM = np.array([0.3, -1.0, 2.0])
RV = np.array([0.5, 2.0, 1.5])

CASES = [
    ("plain", Variant(), "flax", (8, 2, 3)),
    ("untracked", Variant(track_running_stats=False), "flax", (8, 3)),
    ("frozen-statistics", Variant(frozen="statistics"), "flax", (6, 2, 3)),
    ("frozen-all", Variant(frozen="all"), "keras", (6, 3)),
    ("ghost-seq", Variant(ghost_batch_size=3), "pytorch", (8, 3)),
    ("ghost-mean", Variant(ghost_batch_size=4, ghost_update="mean"), "keras", (8, 3)),
    ("renorm", Variant(renorm=True, rmax=1.5, dmax=0.5), "pytorch", (10, 3)),
    ("renorm-stddev", Variant(renorm=True, renorm_momentum=0.9, renorm_track="stddev"), "keras", (10, 3)),
]


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape) * 2.0 + 1.0


def test_case_count():
    assert len(CASES) == 8


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("name", "v", "conv", "shape"), CASES, ids=[c[0] for c in CASES])
def test_matches_reference(x64, name, v, conv, shape, training):
    x = _x(shape)
    dy = _x(shape, seed=1)
    tracked = v.track_running_stats
    rm, rv = (RM, RV) if tracked else (None, None)
    eps = {"keras": 1e-3}.get(conv, 1e-5)
    state = RenormState.from_running(RM, RV, v, eps) if v.renorm else None

    def f(xx, g, b):
        out = batch_norm_variant(xx, g, b, rm, rv, training=training, variant=v, convention=conv, count=2,
                                 renorm=state)
        return out.y, out

    y, vjp, out = jax.vjp(f, jnp.asarray(x), jnp.asarray(G), jnp.asarray(B), has_aux=True)
    ref = variants.forward(x, G, B, rm, rv, training=training, convention=conv, variant=v, count=2)
    np.testing.assert_allclose(np.asarray(y), ref.y, rtol=1e-10, atol=1e-12)
    assert int(out.count) == ref.count
    if tracked:
        np.testing.assert_allclose(np.asarray(out.running_mean), ref.running_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(out.running_var), ref.running_var, rtol=1e-12)
    if v.renorm and training:
        np.testing.assert_allclose(np.asarray(out.renorm.mean), ref.renorm_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(out.renorm.stat), ref.renorm_stat, rtol=1e-12)
    gx, gg, gb = vjp(jnp.asarray(dy))
    wx, wg, wb = variants.backward(dy, x, G, rm, rv, training=training, convention=conv, variant=v, r=ref.r, d=ref.d)
    np.testing.assert_allclose(np.asarray(gx), wx, rtol=1e-9, atol=1e-11)
    if wg is None:  # frozen="all": no gradient reaches gamma and beta
        assert not np.any(np.asarray(gg)) and not np.any(np.asarray(gb))
    else:
        np.testing.assert_allclose(np.asarray(gg), wg, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(np.asarray(gb), wb, rtol=1e-9, atol=1e-11)


def test_jit_with_static_variant(x64):
    v = Variant(renorm=True, rmax=2.0, dmax=1.0)
    state = RenormState.from_running(RM, RV, v, 1e-5)
    f = jax.jit(lambda x: batch_norm_variant(x, G, B, RM, RV, training=True, variant=v, convention="pytorch",
                                             renorm=state).y)
    x = _x((10, 3))
    ref = variants.forward(x, G, B, RM, RV, training=True, convention="pytorch", variant=v)
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(x))), ref.y, rtol=1e-10)


def test_bad_input():
    with pytest.raises(ValueError, match="n = 1"):
        batch_norm_variant(jnp.ones((5, 3)), None, None, jnp.zeros(3), jnp.ones(3), training=True,
                           variant=Variant(ghost_batch_size=2), convention="pytorch")
    with pytest.raises(ValueError, match="RenormState"):
        batch_norm_variant(jnp.ones((5, 3)), None, None, jnp.zeros(3), jnp.ones(3), training=True,
                           variant=Variant(renorm=True))
    with pytest.raises(TypeError, match="Variant"):
        batch_norm_variant(jnp.ones((5, 3)), None, None, None, None, training=True, variant=None)
