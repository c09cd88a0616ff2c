"""bn_ref.torch.BatchNorm1d/2d/3d(variant=...) against the NumPy reference bn_ref.variants (spec §13-§17),
float64, over several steps: values, running statistics, renorm's correction pair, num_batches_tracked,
gradients of x, weight and bias; finite-difference gradients through the layers; state_dict round trips;
bad input; the modes matrix of §17. Also FrozenBatchNorm2d (§15; against the reference and, where it
imports, torchvision) and precise_bn_ (§16.2)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from bn_ref import variants
from bn_ref.variants import MODES, Variant

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bn_ref.torch as bnt  # noqa: E402

G = np.array([1.5, -0.5, 2.0])
B = np.array([0.1, 0.2, -0.3])
RM = [0.3, -1.0, 2.0]
RV = [0.5, 2.0, 1.5]

# (id, variant, extra constructor kwargs)
VARIANTS = [
    ("plain", Variant(), {}),
    ("renorm", Variant(renorm=True, rmax=1.5, dmax=0.5), {}),  # correction pair = running pair
    ("renorm-own-momentum", Variant(renorm=True, rmax=2.0, renorm_momentum=0.3), {}),  # own buffers
    ("renorm-stddev", Variant(renorm=True, renorm_momentum=0.9, renorm_track="stddev"), {"convention": "keras", "feature_axis": 1}),
    ("renorm-cumulative", Variant(renorm=True, rmax=1.2, dmax=0.3), {"momentum": None}),
    ("ghost", Variant(ghost_batch_size=3), {}),  # sub-batches 3, 3, 2 of N = 8
    ("ghost-cumulative", Variant(ghost_batch_size=4), {"momentum": None}),
    ("ghost-mean", Variant(ghost_batch_size=4, ghost_update="mean"), {"convention": "keras", "feature_axis": 1}),
    ("frozen-statistics", Variant(frozen="statistics"), {}),
    ("frozen-all", Variant(frozen="all"), {}),
    ("untracked", Variant(track_running_stats=False), {"track_running_stats": False}),
    ("ghost-autograd", Variant(ghost_batch_size=3), {"implementation": "autograd"}),
    ("renorm-channels-last", Variant(renorm=True, rmax=1.5, renorm_momentum=0.8), {"convention": "flax"}),
]
LAYERS = [
    ("1d", bnt.BatchNorm1d, (8, 3)),
    ("1d-seq", bnt.BatchNorm1d, (8, 3, 2)),
    ("2d", bnt.BatchNorm2d, (8, 3, 2, 2)),
    ("3d", bnt.BatchNorm3d, (8, 3, 2, 1, 2)),
]
CASES = [(vid, v, kw, lid, cls, shape) for vid, v, kw in VARIANTS for lid, cls, shape in LAYERS]
CASE_IDS = [f"{c[0]}-{c[3]}" for c in CASES]


def _x(shape, seed):
    return np.random.default_rng(seed).normal(size=shape) * 2.0 + 1.0


def _layer(cls, v, kw, dtype=torch.float64):
    layer = cls(3, dtype=dtype, variant=v, **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(G))
        layer.bias.copy_(torch.tensor(B))
    return layer


def _arr(t):
    return None if t is None else t.detach().numpy().copy()


def test_case_count():
    assert len(VARIANTS) == 13 and len(LAYERS) == 4 and len(CASES) == 52


@pytest.mark.parametrize(("vid", "v", "kw", "lid", "cls", "shape"), CASES, ids=CASE_IDS)
def test_layer_matches_reference_over_steps(vid, v, kw, lid, cls, shape):
    layer = _layer(cls, v, kw)
    conv = layer.convention
    if conv.feature_axis != 1:  # channels last: (N, ..., C)
        shape = (shape[0], *shape[2:], shape[1])
    own_pair = hasattr(layer, "renorm_mean")
    assert own_pair == (v.renorm and (v.renorm_momentum is not None or v.renorm_track == "stddev"))
    rm, rv = (np.zeros(3), np.ones(3)) if v.track_running_stats else (None, None)
    rmu = rstat = None
    count = 0
    for step, training in enumerate([True, True, True, False]):
        layer.train(training)
        x = _x(shape, 10 * step)
        dy = _x(shape, 10 * step + 1)
        xt = torch.from_numpy(x).requires_grad_(True)
        layer.weight.grad = layer.bias.grad = None
        y = layer(xt)
        ref = variants.forward(x, G, B, rm, rv, training=training, convention=conv, variant=v, count=count,
                               renorm_mean=rmu, renorm_stat=rstat)
        np.testing.assert_allclose(_arr(y), ref.y, rtol=1e-10, atol=1e-12)
        y.backward(torch.from_numpy(dy))
        gx, gg, gb = variants.backward(dy, x, G, rm, rv, training=training, convention=conv, variant=v,
                                       r=ref.r, d=ref.d)
        np.testing.assert_allclose(_arr(xt.grad), gx, rtol=1e-9, atol=1e-11)
        if gg is None:  # frozen="all": no gradient reaches weight and bias (§15)
            assert layer.weight.grad is None and layer.bias.grad is None
        else:
            np.testing.assert_allclose(_arr(layer.weight.grad), gg, rtol=1e-9, atol=1e-11)
            np.testing.assert_allclose(_arr(layer.bias.grad), gb, rtol=1e-9, atol=1e-11)
        rm, rv, count = ref.running_mean, ref.running_var, ref.count
        if v.track_running_stats:
            np.testing.assert_allclose(_arr(layer.running_mean), rm, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(_arr(layer.running_var), rv, rtol=1e-12)
            assert int(layer.num_batches_tracked) == count
        else:
            assert layer.running_mean is None and layer.num_batches_tracked is None
        if own_pair and training:
            rmu, rstat = ref.renorm_mean, ref.renorm_stat
            np.testing.assert_allclose(_arr(layer.renorm_mean), rmu, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(_arr(layer.renorm_stat), rstat, rtol=1e-12)
    expected = {"ghost": 9, "ghost-autograd": 9, "ghost-cumulative": 6}.get(vid, 0 if v.frozen != "no" or not v.track_running_stats else 3)
    assert count == expected  # a ghost step counts its sub-batches (§14.2), a frozen one nothing (§15)


def test_variant_none_and_plain_variant_agree_bitwise():
    for impl in ("function", "autograd"):
        a = bnt.BatchNorm2d(3, dtype=torch.float64, implementation=impl)
        b = bnt.BatchNorm2d(3, dtype=torch.float64, implementation=impl, variant=Variant())
        for step in range(3):
            x = torch.from_numpy(_x((4, 3, 2, 2), step))
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            ya, yb = a(xa), b(xb)
            ya.sum().backward()
            yb.sum().backward()
            assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
        assert a.state_dict().keys() == b.state_dict().keys()
        for k, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[k]), k
        assert torch.equal(a.weight.grad, b.weight.grad)


# -- finite differences ----------------------------------------------------------------------------

GRADCHECK = [
    ("plain", Variant(), {}, True),
    ("ghost", Variant(ghost_batch_size=3), {}, True),
    ("ghost-mean", Variant(ghost_batch_size=3, ghost_update="mean"), {}, True),
    ("frozen-statistics", Variant(frozen="statistics"), {}, True),
    ("frozen-all", Variant(frozen="all"), {}, True),
    ("untracked", Variant(track_running_stats=False), {"track_running_stats": False}, True),
    # renorm: r and d are stop-gradient functions of x (§13.2), so finite differences in x differ
    # from the gradient by design; in weight and bias the step is exactly differentiable.
    ("renorm", Variant(renorm=True, rmax=1.5, dmax=0.5), {}, False),
    ("renorm-stddev", Variant(renorm=True, renorm_momentum=0.9, renorm_track="stddev"), {}, False),
]


@pytest.mark.parametrize(("lid", "cls", "shape"), LAYERS[::2], ids=[lay[0] for lay in LAYERS[::2]])
@pytest.mark.parametrize(("vid", "v", "kw", "wrt_x"), GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck_through_the_layer(vid, v, kw, wrt_x, lid, cls, shape):
    assert len(GRADCHECK) == 8
    x0 = torch.from_numpy(_x(shape, 3))
    template = _layer(cls, v, kw)
    if v.track_running_stats:  # away from the initial (0, 1) so frozen steps see real statistics
        with torch.no_grad():
            template.running_mean.copy_(torch.tensor(RM, dtype=torch.float64))
            template.running_var.copy_(torch.tensor(RV, dtype=torch.float64))
    state = template.state_dict()

    def f(x, w, b):
        layer = _layer(cls, v, kw)
        layer.load_state_dict(state)
        del layer.weight, layer.bias
        layer.weight, layer.bias = w, b  # plain tensors: the gradient flows to the inputs of f
        return layer(x)

    w = torch.tensor(G, requires_grad=v.frozen != "all")
    b = torch.tensor(B, requires_grad=v.frozen != "all")
    x = x0.clone().requires_grad_(wrt_x)
    if v.frozen == "all":
        assert f(x, w, b).requires_grad  # through x only
    assert torch.autograd.gradcheck(f, (x, w, b))


# -- state_dict ------------------------------------------------------------------------------------

OWN_PAIR = Variant(renorm=True, renorm_momentum=0.9, renorm_track="stddev")


@pytest.mark.parametrize(("vid", "v", "kw"), VARIANTS, ids=[c[0] for c in VARIANTS])
def test_state_dict_round_trip(vid, v, kw):
    a = _layer(bnt.BatchNorm2d, v, kw)
    shape = (8, 3, 2, 2) if a.feature_axis == 1 else (8, 2, 2, 3)
    for step in range(2):
        a(torch.from_numpy(_x(shape, step)))
    sd = a.state_dict()
    plain_keys = set(nn.BatchNorm2d(3, track_running_stats=v.track_running_stats).state_dict())
    extra = {"renorm_mean", "renorm_stat"} if hasattr(a, "renorm_mean") else set()
    assert set(sd) == plain_keys | extra
    b = _layer(bnt.BatchNorm2d, v, kw)
    b.load_state_dict(sd, strict=True)
    for k, t in sd.items():
        assert torch.equal(t, b.state_dict()[k]), k
    x = torch.from_numpy(_x(shape, 7))
    assert torch.equal(a(x), b(x))
    for k, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[k]), k


def test_plain_checkpoint_loads_into_a_renorm_layer_with_its_own_pair():
    """A torch.nn checkpoint has no correction pair: it starts from the loaded running pair (§13.3),
    exactly as a fresh renorm layer starts it from its own."""
    src = nn.BatchNorm2d(3, dtype=torch.float64)
    for step in range(3):
        src(torch.from_numpy(_x((8, 3, 2, 2), step)))
    layer = bnt.BatchNorm2d(3, dtype=torch.float64, variant=OWN_PAIR)
    layer.load_state_dict(src.state_dict(), strict=True)
    np.testing.assert_array_equal(_arr(layer.renorm_mean), _arr(src.running_mean))
    np.testing.assert_allclose(_arr(layer.renorm_stat), np.sqrt(_arr(src.running_var) + 1e-5), rtol=1e-15)
    # and a fresh layer's pair is the same function of its own initial running pair
    fresh = bnt.BatchNorm2d(3, dtype=torch.float64, variant=OWN_PAIR)
    np.testing.assert_allclose(_arr(fresh.renorm_stat), np.sqrt(np.ones(3) + 1e-5), rtol=1e-15)
    layer.reset_running_stats()
    assert torch.equal(layer.renorm_stat, fresh.renorm_stat) and torch.equal(layer.renorm_mean, fresh.renorm_mean)
    # the other direction: torch.nn loads a renorm layer's state without the pair
    sd = {k: t for k, t in layer.state_dict().items() if not k.startswith("renorm_")}
    nn.BatchNorm2d(3, dtype=torch.float64).load_state_dict(sd, strict=True)


# -- bad input -------------------------------------------------------------------------------------


def test_constructor_errors_name_the_argument():
    with pytest.raises(TypeError, match="variant must be a bn_ref.variants.Variant"):
        bnt.BatchNorm2d(3, variant="renorm")
    with pytest.raises(ValueError, match=r"track_running_stats=True disagrees with variant\.track_running_stats=False"):
        bnt.BatchNorm2d(3, variant=Variant(track_running_stats=False))
    with pytest.raises(ValueError, match=r"track_running_stats=False disagrees with variant\.track_running_stats=True"):
        bnt.BatchNorm2d(3, track_running_stats=False, variant=Variant())
    with pytest.raises(ValueError, match="ghost batches without running statistics"):
        bnt.BatchNorm1d(3, track_running_stats=False, variant=Variant(ghost_batch_size=2, track_running_stats=False))
    with pytest.raises(ValueError, match="variant"):
        bnt.convert_sync_batchnorm(nn.Sequential(bnt.BatchNorm1d(3, variant=Variant(ghost_batch_size=2))))


@pytest.mark.parametrize(("v", "x", "needle"), [
    (Variant(ghost_batch_size=2), _x((5, 3), 0), "n = 1"),  # the last sub-batch has one sample (§7.1)
    (OWN_PAIR, _x((1, 3), 0), "n = 1"),
    (Variant(renorm=True), _x((1, 3), 0), "n = 1"),
    (Variant(), _x((4, 2), 0), "expected 3 features"),
], ids=["ghost-n1", "renorm-own-n1", "renorm-n1", "channels"])
def test_bad_input_changes_no_state(v, x, needle):
    layer = _layer(bnt.BatchNorm1d, v, {})
    layer(torch.from_numpy(_x((6, 3), 1)))  # some state first
    before = {k: t.clone() for k, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match=needle):
        layer(torch.from_numpy(x))
    for k, t in layer.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_integer_input_is_a_type_error():
    layer = bnt.BatchNorm1d(3, variant=Variant(ghost_batch_size=2))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(4, 3, dtype=torch.long))
    assert int(layer.num_batches_tracked) == 0


# -- the modes matrix (§17) -------------------------------------------------------------------------


@pytest.mark.parametrize("row", MODES, ids=[f"{'train' if r[0] else 'eval'}-{r[1]}-{'tracked' if r[2] else 'untracked'}"
                                             for r in MODES])
def test_modes_matrix(row):
    assert len(MODES) == 8
    training, frozen, tracked, norm, upd, grad = row
    v = Variant(frozen=frozen, track_running_stats=tracked)
    assert variants.mode(training, v) == (norm, upd, grad)
    layer = _layer(bnt.BatchNorm2d, v, {"track_running_stats": tracked})
    if tracked:
        with torch.no_grad():
            layer.running_mean.copy_(torch.tensor(RM, dtype=torch.float64))
            layer.running_var.copy_(torch.tensor(RV, dtype=torch.float64))
    before = {k: t.clone() for k, t in layer.state_dict().items()}
    layer.train(training)
    x = _x((6, 3, 2, 2), 4)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = layer(xt)
    stats = variants.forward(x, G, B, None, None, training=True, convention="pytorch",
                             variant=Variant(track_running_stats=False)).y
    running = variants.forward(x, G, B, RM, RV, training=False, convention="pytorch").y
    np.testing.assert_allclose(_arr(y), stats if norm == "batch statistics" else running, rtol=1e-10, atol=1e-12)
    changed = any(not torch.equal(t, before[k]) for k, t in layer.state_dict().items())
    assert changed == (upd == "yes")
    assert (layer.running_mean is None) == (upd == "none kept")
    y.sum().backward()
    assert xt.grad is not None and (layer.weight.grad is not None) == grad.startswith("yes")


# -- FrozenBatchNorm2d (§15) -------------------------------------------------------------------------

def _frozen(dtype=torch.float32, eps=1e-5):
    f = bnt.FrozenBatchNorm2d(3, eps=eps).to(dtype)
    with torch.no_grad():
        f.weight.copy_(torch.tensor(G))
        f.bias.copy_(torch.tensor(B))
        f.running_mean.copy_(torch.tensor(RM, dtype=torch.float64))
        f.running_var.copy_(torch.tensor(RV, dtype=torch.float64))
    return f


def test_frozen_matches_the_reference_in_both_modes():
    f = _frozen(torch.float64)
    x = _x((4, 3, 3, 2), 0)
    dy = _x((4, 3, 3, 2), 1)
    ref = variants.forward(x, G, B, RM, RV, training=True, convention="pytorch", variant=Variant(frozen="all"))
    gx, gg, gb = variants.backward(dy, x, G, RM, RV, training=True, convention="pytorch", variant=Variant(frozen="all"))
    assert gg is None and gb is None and list(f.parameters()) == []
    for training in (True, False):
        f.train(training)
        xt = torch.from_numpy(x).requires_grad_(True)
        y = f(xt)
        np.testing.assert_allclose(_arr(y), ref.y, rtol=1e-12, atol=1e-13)
        y.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(_arr(xt.grad), gx, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(_arr(f.running_mean), RM)  # never updated


def test_frozen_loads_batch_norm_checkpoints_and_matches_their_eval():
    for src in (nn.BatchNorm2d(3), bnt.BatchNorm2d(3)):
        with torch.no_grad():
            src.weight.copy_(torch.tensor(G))
            src.bias.copy_(torch.tensor(B))
        src(torch.from_numpy(_x((8, 3, 2, 2), 2)).float())
        src.eval()
        f = bnt.FrozenBatchNorm2d(3)
        f.load_state_dict(src.state_dict(), strict=True)  # num_batches_tracked dropped on load
        assert set(f.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
        g = bnt.FrozenBatchNorm2d.from_batch_norm(src)
        x = torch.from_numpy(_x((4, 3, 3, 3), 3)).float()
        assert torch.equal(f(x), g(x))
        # float32: the fold rounds differently from (x - mean) * inv_std; a few ulps of |y|
        torch.testing.assert_close(f(x), src(x), rtol=2e-6, atol=2e-6)


def test_frozen_bad_input():
    f = bnt.FrozenBatchNorm2d(3)
    with pytest.raises(ValueError, match="4D"):
        f(torch.ones(2, 3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        f(torch.ones(2, 4, 1, 1))
    with pytest.raises(ValueError, match="eps"):
        bnt.FrozenBatchNorm2d(3, eps=-1.0)
    with pytest.raises(ValueError, match="running statistics"):
        bnt.FrozenBatchNorm2d.from_batch_norm(nn.BatchNorm2d(3, track_running_stats=False))


def _torchvision_frozen():
    try:
        from torchvision.ops import FrozenBatchNorm2d
    except Exception as exc:  # not installed, or its compiled extension does not load here
        pytest.skip(f"torchvision.ops.FrozenBatchNorm2d not importable: {exc}")
    return FrozenBatchNorm2d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_frozen_is_torchvisions_bit_for_bit(dtype):
    TV = _torchvision_frozen()
    def params(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert params(TV) == params(bnt.FrozenBatchNorm2d)
    for eps in (1e-5, 0.0, 1e-3):
        ours, theirs = _frozen(eps=eps), TV(3, eps=eps)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        assert repr(ours) == repr(theirs) and list(ours.state_dict()) == list(theirs.state_dict())
        x = torch.from_numpy(_x((2, 3, 4, 5), 5)).to(dtype)
        assert torch.equal(ours(x), theirs(x)) and ours(x).dtype == theirs(x).dtype
    src = nn.BatchNorm2d(3)
    src(torch.randn(4, 3, 2, 2))
    a, b = bnt.FrozenBatchNorm2d(3), TV(3)
    a.load_state_dict(src.state_dict())
    b.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(a(x), b(x))


# -- precise BN (§16.2) -------------------------------------------------------------------------------


def test_precise_bn_single_layers_match_the_reference():
    batches = [torch.from_numpy(_x((6, 3, 2, 2), s)) for s in range(4)]
    want_m, want_v = variants.precise_statistics([b.numpy() for b in batches], convention="pytorch")
    for layer in (bnt.BatchNorm2d(3, dtype=torch.float64, variant=Variant(ghost_batch_size=2)),
                  nn.BatchNorm2d(3, dtype=torch.float64)):
        layer.train()
        layer(torch.from_numpy(_x((6, 3, 2, 2), 9)))  # some training first
        layer.eval()
        nbt = int(layer.num_batches_tracked)
        assert bnt.precise_bn_(layer, [(b, None) for b in batches]) == 4
        np.testing.assert_allclose(_arr(layer.running_mean), want_m, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(_arr(layer.running_var), want_v, rtol=1e-12)
        assert not layer.training and int(layer.num_batches_tracked) == nbt and layer.momentum == 0.1


def test_precise_bn_model_and_what_it_leaves_alone():
    torch.manual_seed(0)
    first = bnt.BatchNorm1d(3, dtype=torch.float64, variant=OWN_PAIR)
    lin = nn.Linear(3, 3, dtype=torch.float64)
    second = bnt.BatchNorm1d(3, dtype=torch.float64)
    frozen = bnt.BatchNorm1d(3, dtype=torch.float64, variant=Variant(frozen="statistics"))
    model = nn.Sequential(first, lin, second, frozen).eval()
    batches = [torch.from_numpy(_x((5, 3), s)) for s in range(3)]
    pair = (first.renorm_mean.clone(), first.renorm_stat.clone())
    with pytest.raises(ValueError, match="at least one batch"):
        bnt.precise_bn_(model, [])
    assert bnt.precise_bn_(model, iter(batches), num_batches=2) == 2
    m1, v1 = variants.precise_statistics([b.numpy() for b in batches[:2]], convention="pytorch")
    np.testing.assert_allclose(_arr(first.running_mean), m1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_arr(first.running_var), v1, rtol=1e-12)
    # the second layer sees the first layer's training-mode output (plain BN on the whole batch)
    with torch.no_grad():
        h = [lin(bnt.batch_norm(b, None, None, first.weight, first.bias, training=True)).numpy() for b in batches[:2]]
    m2, v2 = variants.precise_statistics(h, convention="pytorch")
    np.testing.assert_allclose(_arr(second.running_mean), m2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_arr(second.running_var), v2, rtol=1e-12)
    assert torch.equal(frozen.running_mean, torch.zeros(3)) and torch.equal(frozen.running_var, torch.ones(3))
    assert torch.equal(first.renorm_mean, pair[0]) and torch.equal(first.renorm_stat, pair[1])
    assert first.variant is OWN_PAIR and not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="no BN layer"):
        bnt.precise_bn_(nn.Linear(2, 2), batches)


def test_precise_bn_restores_the_statistics_when_a_batch_fails():
    layer = bnt.BatchNorm1d(3, dtype=torch.float64)
    layer(torch.from_numpy(_x((6, 3), 0)))
    before = {k: t.clone() for k, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match="expected 3 features"):
        bnt.precise_bn_(layer, [torch.from_numpy(_x((6, 3), 1)), torch.ones(6, 4, dtype=torch.float64)])
    for k, t in layer.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_precise_bn_keeps_a_convention_and_its_estimator():
    layer = bnt.BatchNorm1d(3, dtype=torch.float64, convention="keras", feature_axis=1)
    batches = [_x((4, 3), s) for s in range(3)]
    bnt.precise_bn_(layer, [torch.from_numpy(b) for b in batches])
    conv = dataclasses.replace(layer.convention, feature_axis=1)
    want_m, want_v = variants.precise_statistics(batches, convention=conv)
    np.testing.assert_allclose(_arr(layer.running_var), want_v, rtol=1e-12)  # keras: biased (§3.4)
    np.testing.assert_allclose(_arr(layer.running_mean), want_m, rtol=1e-12, atol=1e-14)
    assert layer.momentum == 0.99
