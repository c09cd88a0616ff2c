"""bn_ref.variants (spec §13-§17) against PyTorch where PyTorch has the variant, against the plain
oracle where a variant reduces to it, and against finite differences for every backward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bn_ref import oracle, variants
from bn_ref.variants import Variant

torch = pytest.importorskip("torch")


def _x(shape, seed=0, scale=2.0, shift=0.5):
    return np.random.default_rng(seed).normal(size=shape) * scale + shift


G = np.array([1.5, -0.5, 2.0])
B = np.array([0.1, 0.2, -0.3])


def _fd(f, x, dy, h=1e-6):
    """Central finite differences of sum(f(x) * dy) with respect to x."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (np.sum(f(xp) * dy) - np.sum(f(xm) * dy)) / (2 * h)
    return g


# -- validation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"rmax": 0.5}, {"rmax": -1.0}, {"dmax": 0.0}, {"rmin": 3.0, "rmax": 2.0}, {"renorm_momentum": 1.5},
    {"renorm_track": "std"}, {"ghost_batch_size": 0}, {"ghost_batch_size": 2.5}, {"ghost_update": "avg"},
    {"frozen": True}, {"renorm": 1}, {"renorm": True, "frozen": "all"}, {"renorm": True, "ghost_batch_size": 4},
    {"frozen": "statistics", "track_running_stats": False}, {"ghost_batch_size": 2, "track_running_stats": False},
])
def test_variant_rejects_bad_fields(kwargs):
    with pytest.raises((ValueError, TypeError), match="Variant|renorm|must"):
        Variant(**kwargs)


def test_modes_matrix_has_every_combination():
    assert len(variants.MODES) == 8
    keys = {(t, f, tr) for t, f, tr, *_ in variants.MODES}
    assert len(keys) == 8
    assert variants.mode(True, Variant(frozen="statistics"))[:2] == ("running statistics", "no")
    assert variants.mode(False, Variant(track_running_stats=False))[0] == "batch statistics"


# -- §16.1 no running statistics: torch.nn with track_running_stats=False ----------------------------

@pytest.mark.parametrize("training", [True, False])
def test_untracked_equals_torch(training):
    x = _x((6, 3, 4))
    m = torch.nn.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(G))
        m.bias.copy_(torch.from_numpy(B))
    m.train(training)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = m(xt)
    dy = _x(x.shape, seed=1)
    (dx,) = torch.autograd.grad(y, xt, torch.from_numpy(dy))
    v = Variant(track_running_stats=False)
    res = variants.forward(x, G, B, None, None, training=training, convention="pytorch", variant=v)
    np.testing.assert_allclose(res.y, y.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert res.running_mean is None
    dx_ref, _, _ = variants.backward(dy, x, G, training=training, convention="pytorch", variant=v)
    np.testing.assert_allclose(dx_ref, dx.numpy(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="n = 1"):  # like PyTorch, n = 1 is an error in eval too
        variants.forward(_x((1, 3)), G, B, None, None, training=False, convention="pytorch", variant=v)


# -- §15 frozen BN: torch.nn in eval mode, also under training --------------------------------------

@pytest.mark.parametrize("frozen", ["statistics", "all"])
def test_frozen_is_eval_in_training_and_never_updates(frozen):
    x = _x((5, 3, 2, 2))
    rm, rv = np.array([0.3, -1.0, 2.0]), np.array([0.5, 2.0, 1.5])
    m = torch.nn.BatchNorm2d(3, dtype=torch.float64).eval()
    with torch.no_grad():
        m.running_mean.copy_(torch.from_numpy(rm))
        m.running_var.copy_(torch.from_numpy(rv))
        m.weight.copy_(torch.from_numpy(G))
        m.bias.copy_(torch.from_numpy(B))
    xt = torch.from_numpy(x).requires_grad_(True)
    y = m(xt)
    dy = _x(x.shape, seed=2)
    dx, dw, db = torch.autograd.grad(y, (xt, m.weight, m.bias), torch.from_numpy(dy))
    v = Variant(frozen=frozen)
    res = variants.forward(x, G, B, rm, rv, training=True, convention="pytorch", variant=v, count=4)
    np.testing.assert_allclose(res.y, y.detach().numpy(), rtol=1e-12)
    assert np.array_equal(res.running_mean, rm) and np.array_equal(res.running_var, rv) and res.count == 4
    gx, gg, gb = variants.backward(dy, x, G, rm, rv, training=True, convention="pytorch", variant=v)
    np.testing.assert_allclose(gx, dx.numpy(), rtol=1e-12)
    if frozen == "all":
        assert gg is None and gb is None
    else:
        np.testing.assert_allclose(gg, dw.numpy(), rtol=1e-10)
        np.testing.assert_allclose(gb, db.numpy(), rtol=1e-10)


# -- §14 ghost batches: sequential torch.nn calls on the sub-batches --------------------------------

@pytest.mark.parametrize(("n_batch", "size"), [(12, 4), (10, 4), (7, 3), (8, 8), (6, 10)])
def test_ghost_sequential_equals_torch_on_each_sub_batch(n_batch, size):
    x = _x((n_batch, 3, 2))
    m = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(G))
        m.bias.copy_(torch.from_numpy(B))
    parts = [x[i:i + size] for i in range(0, n_batch, size)]
    ys = [m(torch.from_numpy(p)).detach().numpy() for p in parts]
    res = variants.forward(x, G, B, np.zeros(3), np.ones(3), training=True, convention="pytorch",
                           variant=Variant(ghost_batch_size=size))
    np.testing.assert_allclose(res.y, np.concatenate(ys), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.running_mean, m.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(res.running_var, m.running_var.numpy(), rtol=1e-12)
    assert res.count == len(parts)


def test_ghost_mean_update_is_tf_keras_rule():
    """§14.3: one update from the mean of the sub-batch statistics (here under the keras preset)."""
    x = _x((8, 3))
    res = variants.forward(x, None, None, np.zeros(3), np.ones(3), training=True, convention="keras",
                           variant=Variant(ghost_batch_size=4, ghost_update="mean"))
    a, b = x[:4], x[4:]
    mean = (a.mean(0) + b.mean(0)) / 2
    var = (a.var(0) + b.var(0)) / 2
    np.testing.assert_allclose(res.running_mean, 0.01 * mean, rtol=1e-12)
    np.testing.assert_allclose(res.running_var, 0.99 + 0.01 * var, rtol=1e-12)
    assert res.count == 1
    seq = variants.forward(x, None, None, np.zeros(3), np.ones(3), training=True, convention="keras",
                           variant=Variant(ghost_batch_size=4))
    assert not np.allclose(seq.running_mean, res.running_mean)  # the two rules differ


def test_ghost_sub_batch_of_one_follows_single_value():
    x = _x((5, 3))
    with pytest.raises(ValueError, match="n = 1"):
        variants.forward(x, None, None, np.zeros(3), np.ones(3), training=True, convention="pytorch",
                         variant=Variant(ghost_batch_size=2))


def test_ghost_backward_matches_finite_differences():
    x = _x((8, 3))  # sub-batches of 3, 3 and 2
    dy = _x((8, 3), seed=5)
    v = Variant(ghost_batch_size=3)

    def f(xx):
        return variants.forward(xx, G, B, np.zeros(3), np.ones(3), training=True, convention="pytorch",
                                variant=v).y

    dx, dg, db = variants.backward(dy, x, G, training=True, convention="pytorch", variant=v)
    np.testing.assert_allclose(dx, _fd(f, x, dy), rtol=1e-5, atol=1e-7)
    y0 = variants.forward(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), training=True,
                          convention="pytorch", variant=v).y
    np.testing.assert_allclose(dg, (dy * y0).sum(0), rtol=1e-10)
    np.testing.assert_allclose(db, dy.sum(0), rtol=1e-12)


# -- §13 Batch Renormalization ------------------------------------------------------------------------

def test_renorm_reduces_to_bn_when_the_moving_pair_equals_the_batch():
    x = _x((9, 3))
    conv = "keras"
    eps = 1e-3
    rm, rv = x.mean(0), x.var(0)
    res = variants.forward(x, G, B, rm, rv, training=True, convention=conv, variant=Variant(renorm=True))
    np.testing.assert_allclose(res.r, 1.0, rtol=1e-12)
    np.testing.assert_allclose(res.d, 0.0, atol=1e-12)
    plain = oracle.forward(x, G, B, rm, rv, training=True, convention=conv)
    np.testing.assert_allclose(res.y, plain.y, rtol=1e-12)
    np.testing.assert_allclose(res.running_mean, plain.running_mean, rtol=1e-12)
    np.testing.assert_allclose(res.running_var, plain.running_var, rtol=1e-12)
    assert eps == 1e-3


def test_renorm_corrections_from_the_paper_with_and_without_clipping():
    x = _x((16, 3), scale=3.0, shift=1.0)
    rm, rv = np.array([0.0, 5.0, -1.0]), np.array([1.0, 0.1, 30.0])
    eps = 1e-5
    mean, var = x.mean(0), x.var(0)
    sigma = np.sqrt(rv + eps)
    r_free, d_free = np.sqrt(var + eps) / sigma, (mean - rm) / sigma
    x_hat = (x - mean) / np.sqrt(var + eps)
    free = variants.forward(x, G, B, rm, rv, training=True, convention="pytorch", variant=Variant(renorm=True))
    np.testing.assert_allclose(free.r, r_free, rtol=1e-12)
    np.testing.assert_allclose(free.d, d_free, rtol=1e-12)
    np.testing.assert_allclose(free.y, G * (x_hat * r_free + d_free) + B, rtol=1e-12)
    v = Variant(renorm=True, rmax=2.0, dmax=1.0)
    clipped = variants.forward(x, G, B, rm, rv, training=True, convention="pytorch", variant=v)
    assert np.any(r_free > 2.0) or np.any(r_free < 0.5)  # clipping is active on this case
    np.testing.assert_allclose(clipped.r, np.clip(r_free, 0.5, 2.0), rtol=1e-12)
    np.testing.assert_allclose(clipped.d, np.clip(d_free, -1.0, 1.0), rtol=1e-12)
    # The inference pair follows the convention's §3 update, whatever the clipping.
    plain = oracle.forward(x, G, B, rm, rv, training=True, convention="pytorch")
    np.testing.assert_allclose(clipped.running_mean, plain.running_mean, rtol=1e-12)
    np.testing.assert_allclose(clipped.running_var, plain.running_var, rtol=1e-12)


def test_renorm_separate_momentum_and_stddev_tracking():
    x = _x((10, 3))
    rm, rv = np.zeros(3), np.ones(3)
    eps = 1e-3
    v = Variant(renorm=True, renorm_momentum=0.9, renorm_track="stddev")
    res = variants.forward(x, None, None, rm, rv, training=True, convention="keras", variant=v)
    np.testing.assert_allclose(res.renorm_mean, 0.1 * x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(res.renorm_stat, 0.9 * np.sqrt(1 + eps) + 0.1 * np.sqrt(x.var(0) + eps), rtol=1e-12)
    np.testing.assert_allclose(res.running_mean, 0.01 * x.mean(0), rtol=1e-12)


def test_renorm_backward_matches_finite_differences_with_r_d_held():
    x = _x((8, 3), scale=3.0)
    dy = _x((8, 3), seed=7)
    rm, rv = np.array([0.2, 1.0, -0.5]), np.array([2.0, 0.3, 5.0])
    v = Variant(renorm=True, rmax=1.5, dmax=0.5)
    res = variants.forward(x, G, B, rm, rv, training=True, convention="pytorch", variant=v)
    eps = 1e-5

    def f(xx):  # r and d are constants of the step (stop-gradient, §13.2)
        mean, var = xx.mean(0), xx.var(0)
        return G * ((xx - mean) / np.sqrt(var + eps) * res.r + res.d) + B

    dx, dg, db = variants.backward(dy, x, G, rm, rv, training=True, convention="pytorch", variant=v, r=res.r, d=res.d)
    np.testing.assert_allclose(dx, _fd(f, x, dy), rtol=1e-5, atol=1e-7)
    x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + eps)
    np.testing.assert_allclose(dg, (dy * (x_hat * res.r + res.d)).sum(0), rtol=1e-12)
    np.testing.assert_allclose(db, dy.sum(0), rtol=1e-12)


# -- §16.2 precise BN ------------------------------------------------------------------------------

def test_precise_statistics_equal_torch_cumulative_average_and_pooled_concatenation():
    batches = [_x((6, 3), seed=k, shift=k) for k in range(4)]
    m = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    for b in batches:
        m(torch.from_numpy(b))
    mean, var = variants.precise_statistics(batches, convention="pytorch")
    np.testing.assert_allclose(mean, m.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(var, m.running_var.numpy(), rtol=1e-12)
    pm, pv = variants.precise_statistics(batches, convention="pytorch", pooled=True)
    allv = np.concatenate(batches)
    np.testing.assert_allclose(pm, allv.mean(0), rtol=1e-12)
    np.testing.assert_allclose(pv, allv.var(0, ddof=1), rtol=1e-12)
    assert not np.allclose(pv, var)  # batch means differ, so the two definitions differ
    with pytest.raises(ValueError, match="at least one batch"):
        variants.precise_statistics([], convention="pytorch")


def test_variant_record_is_frozen_and_replaceable():
    v = Variant(renorm=True, rmax=3.0)
    assert v.r_bounds == (1 / 3, 3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.rmax = 2.0  # type: ignore[misc]
    assert dataclasses.replace(v, rmin=0.5).r_bounds == (0.5, 3.0)


@pytest.mark.parametrize("row", variants.MODES, ids=lambda r: f"train={r[0]}-frozen={r[1]}-track={r[2]}")
def test_each_mode_behaves_as_its_row_says(row):
    """§17: every cell of the modes matrix, executed."""
    training, frozen, tracking, norm, upd, grad = row
    x = _x((6, 3), scale=2.0, shift=3.0)
    rm, rv = (np.array([0.5, 1.0, -1.0]), np.array([2.0, 0.5, 1.0])) if tracking else (None, None)
    v = Variant(frozen=frozen, track_running_stats=tracking)
    res = variants.forward(x, G, B, rm, rv, training=training, convention="pytorch", variant=v)
    batch = oracle.forward(x, G, B, None, None, training=True, convention="pytorch").y
    if norm == "batch statistics":
        np.testing.assert_allclose(res.y, batch, rtol=1e-12)
    else:
        want = oracle.forward(x, G, B, rm, rv, training=False, convention="pytorch").y
        np.testing.assert_allclose(res.y, want, rtol=1e-12)
        assert not np.allclose(res.y, batch)
    if upd == "yes":
        assert not np.allclose(res.running_mean, rm)
    elif upd == "no":
        assert np.array_equal(res.running_mean, rm) and np.array_equal(res.running_var, rv)
    else:
        assert res.running_mean is None and res.running_var is None
    dy = _x((6, 3), seed=9)
    dx, dg, db = variants.backward(dy, x, G, rm, rv, training=training, convention="pytorch", variant=v)
    assert (dg is None) == grad.startswith("no")
    through = oracle.backward(dy, x, G, training=True, convention="pytorch")[0]
    assert np.allclose(dx, through) == ("§5.1" in grad)
