"""bn_ref.torch.variants against the NumPy reference bn_ref.variants (spec §13-§16), float64,
values, running statistics and autograd gradients, plus gradcheck."""

from __future__ import annotations

import numpy as np
import pytest

from bn_ref import variants
from bn_ref.variants import Variant

torch = pytest.importorskip("torch")
from bn_ref.torch.variants import RenormState, batch_norm_variant  # noqa: E402

G = np.array([1.5, -0.5, 2.0])
B = np.array([0.1, 0.2, -0.3])
RM = np.array([0.3, -1.0, 2.0])
RV = np.array([0.5, 2.0, 1.5])


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape) * 2.0 + 1.0


CASES = [
    ("plain", Variant(), "pytorch", (8, 3, 2)),
    ("untracked", Variant(track_running_stats=False), "pytorch", (8, 3)),
    ("frozen-statistics", Variant(frozen="statistics"), "pytorch", (6, 3, 2)),
    ("frozen-all", Variant(frozen="all"), "keras", (6, 2, 3)),
    ("ghost-seq", Variant(ghost_batch_size=3), "pytorch", (8, 3)),
    ("ghost-mean", Variant(ghost_batch_size=4, ghost_update="mean"), "keras", (8, 3)),
    ("renorm", Variant(renorm=True, rmax=1.5, dmax=0.5), "pytorch", (10, 3)),
    ("renorm-stddev", Variant(renorm=True, renorm_momentum=0.9, renorm_track="stddev"), "keras", (10, 3)),
]


def test_case_count():
    assert len(CASES) == 8


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("name", "v", "conv", "shape"), CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, v, conv, shape, training):
    x = _x(shape)
    dy = _x(shape, seed=1)
    tracked = v.track_running_stats
    rm_t = torch.tensor(RM) if tracked else None
    rv_t = torch.tensor(RV) if tracked else None
    w = torch.tensor(G, requires_grad=True)
    b = torch.tensor(B, requires_grad=True)
    xt = torch.from_numpy(x).requires_grad_(True)
    state = RenormState.from_running(rm_t, rv_t, v, 1e-3 if conv == "keras" else 1e-5) if v.renorm else None
    y, count = batch_norm_variant(xt, rm_t, rv_t, w, b, training=training, variant=v, convention=conv, count=2,
                                  renorm=state)
    ref = variants.forward(x, G, B, RM if tracked else None, RV if tracked else None, training=training,
                           convention=conv, variant=v, count=2)
    np.testing.assert_allclose(y.detach().numpy(), ref.y, rtol=1e-10, atol=1e-12)
    assert count == ref.count
    if tracked:
        np.testing.assert_allclose(rm_t.numpy(), ref.running_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(rv_t.numpy(), ref.running_var, rtol=1e-12)
    if state is not None and training:
        np.testing.assert_allclose(state.mean.numpy(), ref.renorm_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(state.stat.numpy(), ref.renorm_stat, rtol=1e-12)
    y.backward(torch.from_numpy(dy))
    gx, gg, gb = variants.backward(dy, x, G, RM if tracked else None, RV if tracked else None, training=training,
                                   convention=conv, variant=v, r=ref.r, d=ref.d)
    np.testing.assert_allclose(xt.grad.numpy(), gx, rtol=1e-9, atol=1e-11)
    if gg is None:
        assert w.grad is None and b.grad is None
    else:
        np.testing.assert_allclose(w.grad.numpy(), gg, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(b.grad.numpy(), gb, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("v", [Variant(ghost_batch_size=3), Variant(frozen="statistics")], ids=["ghost", "frozen"])
def test_gradcheck(v):
    """Renorm is left out on purpose: its r and d are stop-gradient functions of x (§13.2), so
    finite differences of the whole step differ from its gradient by design; test_matches_reference
    checks it against the reference's closed form, itself checked with r and d held fixed."""
    x = torch.from_numpy(_x((7, 3))).requires_grad_(True)
    w = torch.tensor(G, requires_grad=True)

    def f(xx, ww):
        rm, rv = torch.tensor(RM), torch.tensor(RV)
        st = RenormState.from_running(rm, rv, v, 1e-5) if v.renorm else None
        return batch_norm_variant(xx, rm, rv, ww, None, training=True, variant=v, renorm=st)[0]

    if v.ghost_batch_size == 3:
        x = torch.from_numpy(_x((8, 3))).requires_grad_(True)  # sub-batches 3, 3, 2
    assert torch.autograd.gradcheck(f, (x, w))


def test_bad_input_changes_nothing():
    rm, rv = torch.tensor(RM), torch.tensor(RV)
    x = torch.from_numpy(_x((5, 3)))  # ghost size 2 leaves a sub-batch of one sample: n = 1
    with pytest.raises(ValueError, match="n = 1"):
        batch_norm_variant(x, rm, rv, None, None, training=True, variant=Variant(ghost_batch_size=2))
    assert torch.equal(rm, torch.tensor(RM)) and torch.equal(rv, torch.tensor(RV))
    with pytest.raises(ValueError, match="RenormState"):
        batch_norm_variant(x, rm, rv, None, None, training=True, variant=Variant(renorm=True))
    with pytest.raises(TypeError, match="Variant"):
        batch_norm_variant(x, rm, rv, None, None, training=True, variant="renorm")
