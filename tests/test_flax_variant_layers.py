"""bn-ref's Flax layers (linen and NNX) with ``variant=`` (spec §13-§17) against the NumPy reference
``bn_ref.variants`` in float64: several training steps then an eval step (outputs, running
statistics, the renorm correction pair, count, gradients of x, scale and bias), linen and NNX
bit-identical, under ``jax.jit`` and ``jax.vjp``; finite differences through the layers; the §17
modes matrix; bad input refused before any state changes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from bn_ref import variants
from bn_ref.conventions import get_convention, resolve
from bn_ref.flax import BatchNorm
from bn_ref.flax.nnx import BatchNorm as NNXBatchNorm
from bn_ref.variants import MODES, Variant

pytestmark = pytest.mark.usefixtures("x64")

G = np.array([1.5, -0.5, 2.0])
B = np.array([0.1, 0.2, -0.3])
RM = np.array([0.3, -1.0, 2.0])
RV = np.array([0.5, 2.0, 1.5])
F64 = jnp.float64

# (id, variant, convention, x shape, separate renorm pair). The convention's feature axis is the
# layer's; "pytorch" is NCHW-style (axis 1, unbiased running variance, momentum on the batch term).
CASES = [
    ("plain", Variant(), "flax", (8, 3), False),
    ("renorm", Variant(renorm=True, rmax=1.5, dmax=0.5), "flax", (10, 3), False),
    ("renorm-own-momentum", Variant(renorm=True, rmax=2.0, dmax=1.0, renorm_momentum=0.5), "pytorch", (8, 3, 2), True),
    ("renorm-stddev", Variant(renorm=True, renorm_momentum=0.9, renorm_track="stddev"), "keras", (10, 2, 3), True),
    ("ghost-seq", Variant(ghost_batch_size=3), "pytorch", (8, 3), False),
    ("ghost-mean", Variant(ghost_batch_size=4, ghost_update="mean"), "flax", (8, 2, 3), False),
    ("ghost-cumulative", Variant(ghost_batch_size=3), resolve("pytorch", momentum=None), (7, 3, 2), False),
    ("frozen-statistics", Variant(frozen="statistics"), "flax", (6, 2, 3), False),
    ("frozen-all", Variant(frozen="all"), "keras", (6, 3), False),
    ("untracked", Variant(track_running_stats=False), "flax", (8, 3), False),
]
IDS = [c[0] for c in CASES]
STEPS = 3  # training steps before the eval step


def test_case_count():
    assert len(CASES) == 10 and len(set(IDS)) == 10
    assert sum(c[4] for c in CASES) == 2  # the two renorm cases whose correction pair is its own state


def _x(shape, seed=0, loc=1.0):
    return np.random.default_rng(seed).normal(size=shape) * 2.0 + loc


def _start_state(v: Variant, conv, separate: bool) -> dict[str, np.ndarray]:
    """Non-trivial starting statistics (so eval and frozen steps are not the identity)."""
    st: dict[str, np.ndarray] = {}
    if v.track_running_stats:
        st.update(mean=RM.copy(), var=RV.copy())
    if separate:
        eps = get_convention(conv).eps
        st["renorm_mean"] = RM * 0.5
        st["renorm_stat"] = RV * 1.2 if v.renorm_track == "variance" else np.sqrt(RV * 1.2 + eps)
    if get_convention(conv).momentum is None:
        st["count"] = np.array(2)
    return st


def _linen_variables(st):
    stats = {k: jnp.asarray(a, jnp.int32 if k == "count" else F64) for k, a in st.items()}
    out = {"params": {"scale": jnp.asarray(G), "bias": jnp.asarray(B)}}
    if stats:
        out["batch_stats"] = stats
    return out


def _nnx_layer(v, conv, c, st):
    layer = NNXBatchNorm(c, convention=conv, param_dtype=F64, variant=v)
    layer.scale[...] = jnp.asarray(G)
    layer.bias[...] = jnp.asarray(B)
    for k, a in st.items():
        getattr(layer, k)[...] = jnp.asarray(a, jnp.float32 if k == "count" else F64)
    return layer


def _linen_step(layer: BatchNorm, training: bool):
    def step(variables, x, dy):
        def fwd(x, params):
            y, upd = layer.apply({**variables, "params": params}, x, use_running_average=not training,
                                 mutable=["batch_stats"])
            return y, dict(upd.get("batch_stats", {}))

        y, vjp, stats = jax.vjp(fwd, x, variables["params"], has_aux=True)
        gx, gp = vjp(dy)
        return y, stats, gx, gp["scale"], gp["bias"]

    return jax.jit(step)


def _nnx_step(gdef, training: bool):
    def step(params, stats, x, dy):
        def fwd(x, params):
            m = nnx.merge(gdef, params, stats, copy=True)
            y = m(x, use_running_average=not training)
            return y, nnx.state(m, nnx.BatchStat)

        y, vjp, new_stats = jax.vjp(fwd, x, params, has_aux=True)
        gx, gp = vjp(dy)
        gp = nnx.to_pure_dict(gp)
        return y, new_stats, gx, gp["scale"], gp["bias"]

    return jax.jit(step)


@pytest.mark.parametrize(("name", "v", "conv", "shape", "separate"), CASES, ids=IDS)
def test_layers_match_reference_over_steps(name, v, conv, shape, separate):
    c = shape[get_convention(conv).feature_axis]
    st = _start_state(v, conv, separate)
    linen_layer = BatchNorm(convention=conv, param_dtype=F64, variant=v)
    variables = _linen_variables(st)
    nnx_layer = _nnx_layer(v, conv, c, st)
    gdef, params, nstats = nnx.split(nnx_layer, nnx.Param, nnx.BatchStat)
    assert set(nnx.to_pure_dict(nstats)) == set(st)  # the state the variant keeps, and nothing else

    # The reference's state, carried from step to step.
    ref_rm, ref_rv = st.get("mean"), st.get("var")
    ref_pair = (st["renorm_mean"], st["renorm_stat"]) if separate else (None, None)
    ref_count = int(st.get("count", 0))
    linen_steps = {t: _linen_step(linen_layer, t) for t in (True, False)}  # one compilation per mode
    nnx_steps = {t: _nnx_step(gdef, t) for t in (True, False)}
    for k in range(STEPS + 1):
        training = k < STEPS
        x, dy = _x(shape, seed=k), _x(shape, seed=100 + k, loc=0.0)
        ref = variants.forward(x, G, B, ref_rm, ref_rv, training=training, convention=conv, variant=v,
                               count=ref_count, renorm_mean=ref_pair[0], renorm_stat=ref_pair[1])
        wx, wg, wb = variants.backward(dy, x, G, ref_rm, ref_rv, training=training, convention=conv, variant=v,
                                       r=ref.r, d=ref.d)
        y_l, stats_l, gx_l, gg_l, gb_l = linen_steps[training](variables, jnp.asarray(x), jnp.asarray(dy))
        y_n, nstats, gx_n, gg_n, gb_n = nnx_steps[training](params, nstats, jnp.asarray(x), jnp.asarray(dy))

        np.testing.assert_allclose(np.asarray(y_l), ref.y, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(gx_l), wx, rtol=1e-9, atol=1e-11)
        if wg is None:  # frozen="all" (§15): a zero gradient reaches scale and bias
            assert v.frozen == "all"
            assert not np.any(np.asarray(gg_l)) and not np.any(np.asarray(gb_l))
        else:
            np.testing.assert_allclose(np.asarray(gg_l), wg, rtol=1e-9, atol=1e-11)
            np.testing.assert_allclose(np.asarray(gb_l), wb, rtol=1e-9, atol=1e-11)
        # linen and NNX: one computation path, the same bits.
        for a, b_ in ((y_l, y_n), (gx_l, gx_n), (gg_l, gg_n), (gb_l, gb_n)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))

        stats_n = nnx.to_pure_dict(nstats)
        assert set(stats_l) == set(st) == set(stats_n)  # eval: the collection comes back unchanged
        for key in st:
            np.testing.assert_array_equal(np.asarray(stats_l[key]).astype(np.float64),
                                          np.asarray(stats_n[key]).astype(np.float64))
        if v.track_running_stats:
            np.testing.assert_allclose(np.asarray(stats_n["mean"]), ref.running_mean, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(np.asarray(stats_n["var"]), ref.running_var, rtol=1e-12)
        if "count" in st:
            assert int(stats_n["count"]) == ref.count
        if v.renorm and training:
            if separate:
                np.testing.assert_allclose(np.asarray(stats_n["renorm_mean"]), ref.renorm_mean, rtol=1e-12, atol=1e-14)
                np.testing.assert_allclose(np.asarray(stats_n["renorm_stat"]), ref.renorm_stat, rtol=1e-12)
            else:  # §13.3: the correction pair is the running pair
                np.testing.assert_allclose(ref.renorm_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
                np.testing.assert_allclose(ref.renorm_stat, ref.running_var, rtol=1e-12)
        if training and stats_l:
            variables = {**variables, "batch_stats": stats_l}
        ref_rm, ref_rv, ref_count = ref.running_mean, ref.running_var, ref.count
        if separate and training:
            ref_pair = (ref.renorm_mean, ref.renorm_stat)


def test_plain_variant_is_variant_none_bit_for_bit():
    x = jnp.asarray(_x((8, 3)))
    variables = _linen_variables(_start_state(Variant(), "flax", False))
    y0, u0 = BatchNorm(param_dtype=F64).apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    y1, u1 = BatchNorm(param_dtype=F64, variant=Variant()).apply(variables, x, use_running_average=False,
                                                                 mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))
    for k in ("mean", "var"):
        np.testing.assert_array_equal(np.asarray(u0["batch_stats"][k]), np.asarray(u1["batch_stats"][k]))


# -- variables ------------------------------------------------------------------------------------

VARIABLE_CASES = [
    (None, {"mean", "var"}),
    (Variant(renorm=True, rmax=3.0, dmax=5.0), {"mean", "var"}),
    (Variant(renorm=True, renorm_momentum=0.99), {"mean", "var"}),  # = the layer's momentum: one pair
    (Variant(renorm=True, renorm_momentum=0.9), {"mean", "var", "renorm_mean", "renorm_stat"}),
    (Variant(renorm=True, renorm_track="stddev"), {"mean", "var", "renorm_mean", "renorm_stat"}),
    (Variant(ghost_batch_size=2), {"mean", "var"}),
    (Variant(frozen="all"), {"mean", "var"}),
    (Variant(track_running_stats=False), set()),
]


@pytest.mark.parametrize(("v", "names"), VARIABLE_CASES)
def test_variables_each_variant_keeps(v, names):
    assert len(VARIABLE_CASES) == 8
    x = jnp.ones((4, 3))
    variables = BatchNorm(variant=v).init(jax.random.key(0), x, use_running_average=False)
    assert set(variables.get("batch_stats", {})) == names
    assert set(variables["params"]) == {"scale", "bias"}
    layer = NNXBatchNorm(3, variant=v)
    state = nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))
    assert set(state) == names
    if not names:
        assert layer.mean is None and layer.var is None
    if "renorm_mean" in names:  # started from the running pair's start (0, 1), as from_running maps it
        stat0 = 1.0 if v.renorm_track == "variance" else np.sqrt(1.0 + 1e-5)
        for st in (variables["batch_stats"], state):
            np.testing.assert_array_equal(np.asarray(st["renorm_mean"]), np.zeros(3, np.float32))
            np.testing.assert_allclose(np.asarray(st["renorm_stat"]), np.full(3, stat0), rtol=1e-7)


# -- finite differences through the layers ---------------------------------------------------------

FD_CASES = [
    ("plain", Variant(), "flax", (6, 3)),
    # rmax = 1 pins r = 1, and |d| > dmax clips d: r and d are then locally constant, so the layer's
    # stop-gradient derivative (§13.2) is the true derivative and finite differences apply.
    ("renorm-clipped", Variant(renorm=True, rmax=1.0, dmax=0.1), "flax", (6, 3)),
    ("ghost-seq", Variant(ghost_batch_size=3), "pytorch", (7, 3, 2)),
    ("ghost-mean", Variant(ghost_batch_size=2, ghost_update="mean"), "flax", (6, 3)),
    ("frozen-statistics", Variant(frozen="statistics"), "flax", (5, 3)),
    ("frozen-all", Variant(frozen="all"), "flax", (5, 3)),
    ("untracked", Variant(track_running_stats=False), "pytorch", (6, 3)),
]


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.parametrize(("name", "v", "conv", "shape"), FD_CASES, ids=[c[0] for c in FD_CASES])
def test_finite_differences(name, v, conv, shape, framework):
    assert len(FD_CASES) == 7
    c = shape[get_convention(conv).feature_axis]
    st = _start_state(v, conv, False)
    if v.renorm:  # running mean -3, far below every batch mean: every channel's |d| > dmax
        st["mean"] = np.full(c, -3.0)
    x = jnp.asarray(_x(shape, seed=3))
    if framework == "linen":
        layer, variables = BatchNorm(convention=conv, param_dtype=F64, variant=v), _linen_variables(st)

        def f(x, g, b):
            return layer.apply({**variables, "params": {"scale": g, "bias": b}}, x, use_running_average=False,
                               mutable=["batch_stats"])[0]
    else:
        gdef, _, stats = nnx.split(_nnx_layer(v, conv, c, st), nnx.Param, nnx.BatchStat)

        def f(x, g, b):
            m = nnx.merge(gdef, nnx.State({"scale": nnx.Param(g), "bias": nnx.Param(b)}), stats, copy=True)
            return m(x, use_running_average=False)

    if v.renorm:
        ref = variants.forward(np.asarray(x), G, B, st["mean"], st["var"], training=True, convention=conv, variant=v)
        assert np.all(ref.r == 1.0) and np.all(np.abs(ref.d) == 0.1)  # both clipped: the premise holds
    g, b = jnp.asarray(G), jnp.asarray(B)
    f = jax.jit(f)
    if v.frozen == "all":  # §15: only x has a gradient; scale and bias get zeros
        check_grads(lambda x: f(x, g, b), (x,), order=1, modes=["rev"], eps=1e-6)
        _, vjp = jax.vjp(lambda g, b: f(x, g, b), g, b)
        gg, gb = vjp(jnp.ones(shape, F64))
        assert not np.any(np.asarray(gg)) and not np.any(np.asarray(gb))
    else:
        check_grads(f, (x, g, b), order=1, modes=["rev"], eps=1e-6)


# -- the modes matrix (§17) ------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.parametrize("row", MODES, ids=[f"train={t}-frozen={f}-track={tr}" for t, f, tr, *_ in MODES])
def test_modes_matrix(row, framework):
    assert len(MODES) == 8
    training, frozen, tracked, normalizes, updates, grads = row
    v = Variant(frozen=frozen, track_running_stats=tracked)
    assert variants.mode(training, v) == (normalizes, updates, grads)
    x = _x((6, 3), seed=5)
    st = _start_state(v, "flax", False)
    if framework == "linen":
        layer, variables = BatchNorm(param_dtype=F64, variant=v), _linen_variables(st)

        def f(g, b):
            y, upd = layer.apply({**variables, "params": {"scale": g, "bias": b}}, jnp.asarray(x),
                                 use_running_average=not training, mutable=["batch_stats"])
            return y, {k: np.asarray(a) for k, a in upd.get("batch_stats", {}).items()} or dict(st)
    else:
        gdef, _, stats = nnx.split(_nnx_layer(v, "flax", 3, st), nnx.Param, nnx.BatchStat)

        def f(g, b):
            m = nnx.merge(gdef, nnx.State({"scale": nnx.Param(g), "bias": nnx.Param(b)}), stats, copy=True)
            y = m(jnp.asarray(x), use_running_average=not training)
            return y, nnx.state(m, nnx.BatchStat)

    y, vjp, after = jax.vjp(f, jnp.asarray(G), jnp.asarray(B), has_aux=True)
    after = {k: np.asarray(a) for k, a in (nnx.to_pure_dict(after) if framework == "nnx" else after).items()}
    plain = Variant()
    batch_y = variants.forward(x, G, B, RM, RV, training=True, convention="flax", variant=plain)
    running_y = variants.forward(x, G, B, RM, RV, training=False, convention="flax", variant=plain)
    want = batch_y.y if normalizes == "batch statistics" else running_y.y
    other = running_y.y if normalizes == "batch statistics" else batch_y.y
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-10, atol=1e-12)
    assert not np.allclose(np.asarray(y), other)  # the two choices really differ here
    if updates == "none kept":
        assert after == {}
    elif updates == "yes":
        np.testing.assert_allclose(after["mean"], batch_y.running_mean, rtol=1e-12)
        np.testing.assert_allclose(after["var"], batch_y.running_var, rtol=1e-12)
    else:
        np.testing.assert_array_equal(after["mean"], RM)
        np.testing.assert_array_equal(after["var"], RV)
    gg, gb = vjp(jnp.asarray(_x((6, 3), seed=6, loc=0.0)))
    if grads.startswith("no"):
        assert not np.any(np.asarray(gg)) and not np.any(np.asarray(gb))
    else:
        assert np.all(np.asarray(gg) != 0) and np.all(np.asarray(gb) != 0)


# -- bad input, refused before any state changes ------------------------------------------------------


def test_bad_variant_argument():
    x = jnp.ones((4, 3))
    with pytest.raises(TypeError, match="variant must be a bn_ref.variants.Variant or None; got str"):
        BatchNorm(variant="renorm").init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(TypeError, match="variant must be"):
        NNXBatchNorm(3, variant={"renorm": True})
    v = Variant(renorm=True)
    with pytest.raises(ValueError, match="axis_name='batch'"):
        BatchNorm(variant=v, axis_name="batch").init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match="axis_name='batch'"):
        NNXBatchNorm(3, variant=v, axis_name="batch")
    with pytest.raises(ValueError, match="use_fast_variance=True"):
        BatchNorm(variant=v, use_fast_variance=True).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match="use_fast_variance=True"):
        NNXBatchNorm(3, variant=v, use_fast_variance=True)
    mask = jnp.array([True, True, False, True])
    variables = BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match="mask is not supported with a variant"):
        BatchNorm(variant=v).apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    layer = NNXBatchNorm(3, variant=v)
    with pytest.raises(ValueError, match="mask is not supported with a variant"):
        layer(x, mask=mask)


def _nnx_snapshot(layer):
    return {k: np.asarray(a) for k, a in nnx.to_pure_dict(nnx.state(layer)).items()}


def test_bad_state_and_batches_refused_before_state_changes():
    x = jnp.asarray(_x((5, 3)))
    # A loaded correction pair of the wrong shape names itself.
    v = Variant(renorm=True, renorm_momentum=0.9)
    variables = BatchNorm(variant=v).init(jax.random.key(0), x, use_running_average=False)
    variables = {**variables, "batch_stats": {**variables["batch_stats"], "renorm_stat": jnp.ones(4)}}
    with pytest.raises(ValueError, match=r"renorm_stat must have shape \(C,\) = \(3,\).*got shape \(4,\)"):
        BatchNorm(variant=v).apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    layer = NNXBatchNorm(3, variant=v)
    layer.renorm_mean = nnx.BatchStat(jnp.zeros(2))
    before = _nnx_snapshot(layer)
    with pytest.raises(ValueError, match="renorm_mean must have shape"):
        layer(x)
    after = _nnx_snapshot(layer)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    # A ghost sub-batch with one value per channel under a convention that refuses n = 1 (§14.1, §7.1):
    # 5 samples in ghost batches of 2 leave one of 1 sample.
    layer = NNXBatchNorm(3, convention="pytorch", axis=-1, variant=Variant(ghost_batch_size=2))
    before = _nnx_snapshot(layer)
    with pytest.raises(ValueError, match="n = 1"):
        layer(x)
    after = _nnx_snapshot(layer)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # §16.1: no running statistics, so n = 1 is refused in eval too under such a convention.
    layer = NNXBatchNorm(3, convention="pytorch", axis=-1, variant=Variant(track_running_stats=False))
    with pytest.raises(ValueError, match="n = 1"):
        layer(x[:1], use_running_average=True)
    # Integer input names x.
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        NNXBatchNorm(3, variant=Variant(ghost_batch_size=2))(jnp.ones((4, 3), jnp.int32))


# -- in a model: NNX's transforms and linen's, one SGD trajectory ---------------------------------


def test_nnx_and_linen_train_identically_under_jit_and_grad():
    v = Variant(renorm=True, rmax=2.0, dmax=1.0, renorm_momentum=0.8)
    xs = [jnp.asarray(_x((8, 4), seed=s)) for s in range(3)]
    targets = [jnp.asarray(_x((8, 3), seed=10 + s)) for s in range(3)]

    class LinenNet(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            h = nn.Dense(3, param_dtype=F64, kernel_init=nn.initializers.constant(0.3))(x)
            return BatchNorm(param_dtype=F64, variant=v)(h, use_running_average=not train)

    class NNXNet(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(4, 3, param_dtype=F64, kernel_init=nnx.initializers.constant(0.3),
                                    rngs=nnx.Rngs(0))
            self.bn = NNXBatchNorm(3, param_dtype=F64, variant=v)

        def __call__(self, x):
            return self.bn(self.dense(x))

    net = LinenNet()
    variables = net.init(jax.random.key(0), xs[0], train=False)
    params, stats = variables["params"], variables["batch_stats"]

    @jax.jit
    def linen_step(params, stats, x, t):
        def loss(p):
            y, upd = net.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return jnp.sum((y - t) ** 2), upd["batch_stats"]

        (lv, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, params, g), stats, lv

    model = NNXNet()

    @nnx.jit
    def nnx_step(model, x, t):
        def loss(m):
            return jnp.sum((m(x) - t) ** 2)

        lv, g = nnx.value_and_grad(loss)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, params, g))
        return lv

    for x, t in zip(xs, targets):
        params, stats, l_linen = linen_step(params, stats, x, t)
        l_nnx = nnx_step(model, x, t)
        assert float(l_linen) == float(l_nnx)
    s = nnx.to_pure_dict(nnx.state(model.bn, nnx.BatchStat))
    assert set(s) == set(stats["BatchNorm_0"]) == {"mean", "var", "renorm_mean", "renorm_stat"}
    for k in s:
        np.testing.assert_array_equal(np.asarray(s[k]), np.asarray(stats["BatchNorm_0"][k]))
    np.testing.assert_array_equal(np.asarray(model.bn.scale[...]), np.asarray(params["BatchNorm_0"]["scale"]))
    np.testing.assert_array_equal(np.asarray(model.dense.kernel[...]), np.asarray(params["Dense_0"]["kernel"]))
    # The correction pair moved away from the running pair (renorm_momentum 0.8, not 0.99).
    assert not np.allclose(np.asarray(s["renorm_mean"]), np.asarray(s["mean"]))
    model.eval()
    linen_eval = net.apply({"params": params, "batch_stats": stats}, xs[0], train=False)
    np.testing.assert_array_equal(np.asarray(model(xs[0])), np.asarray(linen_eval))
