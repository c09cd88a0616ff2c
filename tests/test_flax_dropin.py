"""bn-ref's Flax layers as drop-ins for ``flax.linen.BatchNorm`` / ``flax.nnx.BatchNorm``.

Written from Flax's documented API (the layers' signatures and docstrings, the NNX transform
guides), not from Flax's tests: the constructor and call arguments with Flax's meaning, masks
that broadcast to ``x``, variables written by Flax's layers, and the NNX transforms (tree-mode
``nnx.grad``, ``nnx.vmap`` with ``nnx.StateAxes``, ``nnx.split``/``merge`` filters, Orbax
checkpoints) on small models holding bn-ref layers. Numbers are compared in float64 with Flax's
own layer at ``use_fast_variance=False`` (the two-pass variance bn-ref computes) and with the
oracle.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from bn_ref import PRESETS, oracle
from bn_ref.conventions import resolve
from bn_ref.flax import BatchNorm
from bn_ref.flax.nnx import BatchNorm as NNXBatchNorm
from bn_ref.tolerances import assert_close

F64 = dict(rtol=1e-12, atol=1e-12)


def _oracle_stats(x):
    """The oracle's batch mean and biased variance (Flax's momentum 0 copies them into the stats)."""
    x = np.asarray(x, np.float64)
    c = x.shape[-1]
    r = oracle.forward(x, None, None, np.zeros(c), np.ones(c), training=True, convention=resolve("flax", momentum=0.0))
    return r.running_mean, r.running_var


def _x(shape, seed=0, loc=1.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * rng.uniform(0.5, 2.0, shape[-1]) + loc


# -- signatures ----------------------------------------------------------------------------------


def _linen_fields(cls):
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def test_linen_attributes_are_flax_attributes_in_flax_order_then_bn_refs():
    theirs, ours = _linen_fields(nn.BatchNorm), _linen_fields(BatchNorm)
    assert len(theirs) == 14
    assert ours[: len(theirs)] == theirs  # positional construction means the same thing
    assert ours[len(theirs) :] == ["convention", "eps", "variant"]
    # Defaults: the same values, or sentinels the default convention ("flax") resolves to them.
    d_t = {f.name: f.default for f in dataclasses.fields(nn.BatchNorm)}
    d_o = {f.name: f.default for f in dataclasses.fields(BatchNorm)}
    same = {"use_running_average", "dtype", "param_dtype", "use_bias", "use_scale", "axis_name",
            "axis_index_groups", "force_float32_reductions"}
    for k in same:
        assert d_o[k] == d_t[k], k
    conv = PRESETS["flax"]
    assert (conv.feature_axis, conv.momentum, conv.eps) == (d_t["axis"], d_t["momentum"], d_t["epsilon"])
    assert d_t["use_fast_variance"] is True and d_o["use_fast_variance"] is False  # documented choice


def test_nnx_signature_has_flax_parameters_in_flax_order_then_bn_refs():
    theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
    ours = inspect.signature(NNXBatchNorm.__init__).parameters
    names_t, names_o = list(theirs), list(ours)
    assert len(names_t) == 19  # self, num_features, 17 keywords
    assert names_o[: len(names_t)] == names_t
    assert names_o[len(names_t) :] == ["convention", "eps", "variant"]
    for k in names_t:
        assert ours[k].kind == theirs[k].kind, k
    for k in ("use_running_average", "dtype", "param_dtype", "use_bias", "use_scale", "axis_name",
              "axis_index_groups", "bias_metadata", "scale_metadata"):
        assert ours[k].default == theirs[k].default, k


def test_nnx_exposes_flax_attributes():
    ours, theirs = NNXBatchNorm(3, momentum=0.8, epsilon=1e-3), nnx.BatchNorm(3, momentum=0.8, epsilon=1e-3,
                                                                             rngs=nnx.Rngs(0))
    for k in ("num_features", "axis", "momentum", "epsilon", "use_running_average", "dtype", "param_dtype",
              "use_bias", "use_scale", "axis_name", "axis_index_groups"):
        assert getattr(ours, k) == getattr(theirs, k), k


def test_positional_construction_like_flax():
    x = jnp.asarray(_x((6, 3)), jnp.float32)
    ours = BatchNorm(False, -1, 0.9, 1e-3)
    theirs = nn.BatchNorm(False, -1, 0.9, 1e-3, use_fast_variance=False)
    v = theirs.init(jax.random.key(0), x)
    y_t, u_t = theirs.apply(v, x, mutable=["batch_stats"])
    y_o, u_o = ours.apply(v, x, mutable=["batch_stats"])
    assert_close(np.asarray(y_o), np.asarray(y_t), "float32", what="y")
    assert_close(np.asarray(u_o["batch_stats"]["var"]), np.asarray(u_t["batch_stats"]["var"]), "float32")


def test_epsilon_and_eps_spellings():
    x = jnp.asarray(_x((5, 3)), jnp.float32)
    a = BatchNorm(use_running_average=False, epsilon=0.5)
    b = BatchNorm(use_running_average=False, eps=0.5)
    v = a.init(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(a.apply(v, x)), np.asarray(b.apply(v, x)))
    with pytest.raises(ValueError, match="not both"):
        BatchNorm(use_running_average=False, epsilon=0.5, eps=0.5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="not both"):
        NNXBatchNorm(3, epsilon=0.5, eps=0.5)
    with pytest.raises(ValueError, match="force_float32_reductions"):
        BatchNorm(use_running_average=False, force_float32_reductions=False).init(jax.random.key(0), x)


# -- initializers, metadata, promote_dtype -------------------------------------------------------


def test_linen_scale_init_and_bias_init_as_flax():
    x = jnp.asarray(_x((4, 5)), jnp.float32)
    kw = dict(use_running_average=False, scale_init=nn.initializers.normal(0.3), bias_init=nn.initializers.uniform())
    v_o = BatchNorm(**kw).init(jax.random.key(7), x)
    v_t = nn.BatchNorm(**kw).init(jax.random.key(7), x)
    for k in ("scale", "bias"):
        np.testing.assert_array_equal(np.asarray(v_o["params"][k]), np.asarray(v_t["params"][k]))
    assert float(jnp.std(v_o["params"]["scale"])) > 0.05  # really the random initializer


def test_nnx_initializers_metadata_and_rngs_as_flax():
    kw = dict(scale_init=nnx.initializers.normal(0.3), bias_init=nnx.initializers.uniform(),
              scale_metadata={"tag": "gamma"}, bias_metadata={"tag": "beta"})
    ours, theirs = NNXBatchNorm(5, rngs=nnx.Rngs(3), **kw), nnx.BatchNorm(5, rngs=nnx.Rngs(3), **kw)
    for k in ("scale", "bias"):
        a, b = getattr(ours, k), getattr(theirs, k)
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
        assert a.get_metadata() == b.get_metadata()
    assert ours.scale.get_metadata()["tag"] == "gamma" and ours.bias.get_metadata()["tag"] == "beta"
    with pytest.raises(TypeError, match="rngs"):
        NNXBatchNorm(5, scale_init=nnx.initializers.normal(0.3))  # a random init needs rngs
    NNXBatchNorm(5)  # the constant defaults do not


def test_nnx_promote_dtype_as_flax():
    x = jnp.asarray(_x((6, 4), seed=2), jnp.bfloat16)
    ours = NNXBatchNorm(4, promote_dtype=nnx_dtypes.promote_dtype, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(4, use_fast_variance=False, rngs=nnx.Rngs(0))
    y_o, y_t = ours(x), theirs(x)
    assert y_o.dtype == y_t.dtype == jnp.float32  # Flax's promotion: bf16 input, f32 params
    assert_close(np.asarray(y_o), np.asarray(y_t), "float32", what="y")
    assert NNXBatchNorm(4)(x).dtype == jnp.bfloat16  # bn-ref's default keeps the input dtype (§8.3)
    calls = []

    def spy(args, *, dtype=None):
        calls.append((len(args), dtype))
        return args

    NNXBatchNorm(4, promote_dtype=spy, dtype=jnp.float32)(x)
    assert calls == [(5, jnp.float32)]  # (x, mean, var, scale, bias), dtype=dtype


# -- use_fast_variance ----------------------------------------------------------------------------


def test_use_fast_variance_reproduces_flax_and_warns():
    x = jnp.asarray(_x((16, 3), seed=4), jnp.float32)
    theirs = nn.BatchNorm(use_running_average=False)  # Flax's default: fast variance
    v = theirs.init(jax.random.key(0), x)
    y_t, u_t = theirs.apply(v, x, mutable=["batch_stats"])
    with pytest.warns(UserWarning, match="§8.2"):
        y_o, u_o = BatchNorm(use_running_average=False, use_fast_variance=True).apply(v, x, mutable=["batch_stats"])
    assert_close(np.asarray(y_o), np.asarray(y_t), "float32", what="y")
    assert_close(np.asarray(u_o["batch_stats"]["var"]), np.asarray(u_t["batch_stats"]["var"]), "float32")
    with pytest.warns(UserWarning, match="one pass"):
        NNXBatchNorm(3, use_fast_variance=True)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NNXBatchNorm(3)(x)  # the default (two-pass) does not warn
    # Large mean, small spread (§8.2): the one-pass variance loses every digit, two-pass does not.
    big = jnp.asarray(_x((64, 3), seed=5, loc=0.0) * 1e-2 + 1e3, jnp.float32)
    ref = _oracle_stats(big)
    with pytest.warns(UserWarning):
        _, fast = BatchNorm(use_running_average=False, use_fast_variance=True, momentum=0.0).apply(
            v, big, mutable=["batch_stats"])
    _, slow = BatchNorm(use_running_average=False, momentum=0.0).apply(v, big, mutable=["batch_stats"])
    assert_close(np.asarray(slow["batch_stats"]["var"]), ref[1], "float32", kappa=1e5, what="two-pass var")
    assert np.max(np.abs(np.asarray(fast["batch_stats"]["var"]) / ref[1] - 1)) > 0.1


# -- masks that broadcast to x --------------------------------------------------------------------

MASKS = {
    "per-sample (N,1,1,1)": lambda r: r.uniform(size=(8, 1, 1, 1)) < 0.6,
    "per-row (N,H,1,1)": lambda r: r.uniform(size=(8, 3, 1, 1)) < 0.6,
    "per-position (N,H,W,1)": lambda r: r.uniform(size=(8, 3, 2, 1)) < 0.6,
    "elementwise (N,H,W,C)": lambda r: r.uniform(size=(8, 3, 2, 4)) < 0.6,
    "rank-3 (H,W,C) broadcast over N": lambda r: r.uniform(size=(3, 2, 4)) < 0.6,
}
assert len(MASKS) == 5


def _masked_reference(x, m, conv, rm, rv):
    """Per channel, the oracle's training step on that channel's unmasked values alone."""
    mb = np.broadcast_to(m, x.shape)
    y = np.zeros_like(x)
    nrm, nrv = np.empty(x.shape[-1]), np.empty(x.shape[-1])
    for c in range(x.shape[-1]):
        vals = x[..., c][mb[..., c]].reshape(-1, 1)
        r = oracle.forward(vals, None, None, rm[c : c + 1], rv[c : c + 1], training=True, convention=conv, axis=-1)
        y[..., c][mb[..., c]] = r.y[:, 0]
        nrm[c], nrv[c] = r.running_mean[0], r.running_var[0]
    return y, nrm, nrv


@pytest.mark.parametrize("make", list(MASKS.values()), ids=list(MASKS))
def test_mask_broadcast_like_flax(make, x64):
    r = np.random.default_rng(11)
    x = _x((8, 3, 2, 4), seed=12)
    m = make(r)
    mb = np.broadcast_to(m, x.shape)
    assert mb.sum(axis=(0, 1, 2)).min() >= 2
    theirs = nn.BatchNorm(use_running_average=False, use_fast_variance=False, param_dtype=jnp.float64)
    ours = BatchNorm(use_running_average=False, param_dtype=jnp.float64)
    v = theirs.init(jax.random.key(0), x)
    v = {"params": v["params"], "batch_stats": {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 2.0)}}
    y_t, u_t = theirs.apply(v, x, mask=jnp.asarray(m), mutable=["batch_stats"])
    y_o, u_o = ours.apply(v, x, mask=jnp.asarray(m), mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y_o)[mb], np.asarray(y_t)[mb], **F64)
    np.testing.assert_array_equal(np.asarray(y_o)[~mb], 0.0)  # bn-ref's choice for masked positions
    for k in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(u_o["batch_stats"][k]), np.asarray(u_t["batch_stats"][k]), **F64)
    # the unbiased estimator uses each channel's own count (pytorch convention), against the oracle
    rm, rv = np.full(4, 0.5), np.full(4, 2.0)
    y_ref, rm_ref, rv_ref = _masked_reference(x, m, PRESETS["pytorch"], rm, rv)
    pt = BatchNorm(use_running_average=False, convention="pytorch", axis=-1, param_dtype=jnp.float64)
    y_p, u_p = pt.apply(v, x, mask=jnp.asarray(m), mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y_p), y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(u_p["batch_stats"]["var"]), rv_ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(u_p["batch_stats"]["mean"]), rm_ref, rtol=1e-12, atol=1e-15)


def test_mask_nnx_and_gradients(x64):
    x = _x((6, 5, 3), seed=3)
    m = np.random.default_rng(4).uniform(size=(6, 5, 1)) < 0.7
    ours = NNXBatchNorm(3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(3, use_fast_variance=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    _f64_stats(theirs)
    dy = np.random.default_rng(5).standard_normal(x.shape) * np.broadcast_to(m, x.shape)

    def loss(layer, x):
        return jnp.sum(layer(x, mask=jnp.asarray(m)) * dy)

    g_o = nnx.grad(loss, argnums=(0, 1))(ours, jnp.asarray(x))
    g_t = nnx.grad(loss, argnums=(0, 1))(theirs, jnp.asarray(x))
    mb = np.broadcast_to(m, x.shape)
    # With dy = 0 on masked positions, Flax's gradient is the masked-statistics gradient too.
    np.testing.assert_allclose(np.asarray(g_o[1])[mb], np.asarray(g_t[1])[mb], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(g_o[1])[~mb], 0.0)
    for k in ("scale", "bias"):
        np.testing.assert_allclose(np.asarray(g_o[0][k][...]), np.asarray(g_t[0][k][...]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ours.var[...]), np.asarray(theirs.var[...]), **F64)


def test_mask_rank1_of_length_n_is_per_sample_and_bad_shapes_are_refused():
    x = jnp.asarray(_x((4, 4), seed=8), jnp.float32)
    layer = BatchNorm(use_running_average=False)
    v = layer.init(jax.random.key(0), x)
    rows = jnp.asarray([True, False, True, True])
    # N == C: a rank-1 mask of length N is per sample (bn-ref's form), not per feature
    np.testing.assert_array_equal(np.asarray(layer.apply(v, x, mask=rows)),
                                  np.asarray(layer.apply(v, x, mask=rows[:, None])))
    per_feature = layer.apply(v, x, mask=rows[None, :])
    np.testing.assert_array_equal(np.asarray(per_feature)[:, 1], 0.0)
    assert np.all(np.asarray(per_feature)[:, 0] != 0.0)
    with pytest.raises(ValueError, match="broadcasts to"):
        layer.apply(v, x, mask=jnp.ones((2, 4), bool))
    with pytest.raises(TypeError, match="bool"):
        layer.apply(v, x, mask=jnp.ones((4, 1)))


# -- variables written by Flax's layers ------------------------------------------------------------


def test_linen_loads_flax_variables_in_train_and_eval(x64):
    xs = [_x((6, 2, 3), seed=s) for s in range(4)]
    theirs = nn.BatchNorm(use_fast_variance=False, momentum=0.8, param_dtype=jnp.float64)
    v = theirs.init(jax.random.key(0), xs[0], use_running_average=False)
    for x in xs[:2]:  # Flax trains a little and writes its variables
        _, upd = theirs.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    assert set(v["batch_stats"]) == {"mean", "var"}
    ours = BatchNorm(momentum=0.8, param_dtype=jnp.float64)
    for train in (True, False):
        y_o, u_o = ours.apply(v, xs[2], use_running_average=not train, mutable=["batch_stats"])
        y_t, u_t = theirs.apply(v, xs[2], use_running_average=not train, mutable=["batch_stats"])
        np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_t), **F64)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **F64), u_o, u_t)
    np.testing.assert_allclose(np.asarray(ours.apply(v, xs[3], use_running_average=True)),
                               np.asarray(theirs.apply(v, xs[3], use_running_average=True)), **F64)
    # momentum=None needs a step count Flax never wrote: eval runs without it, training starts it at 0
    cma = BatchNorm(momentum=None, param_dtype=jnp.float64)
    cma.apply(v, xs[3], use_running_average=True)
    cma.apply(v, xs[3], use_running_average=False)  # immutable: normalizes, stores nothing
    _, upd = cma.apply(v, xs[3], use_running_average=False, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["count"]) == 1
    ref = _oracle_stats(xs[3])
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), ref[0], **F64)  # k = 1: the batch's
    # a count the variables already hold (e.g. ported from PyTorch) keeps counting under any momentum
    given = {"params": v["params"], "batch_stats": {**v["batch_stats"], "count": jnp.asarray(5, jnp.int32)}}
    _, upd = ours.apply(given, xs[3], use_running_average=False, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["count"]) == 6


def test_nnx_loads_flax_state_in_train_and_eval(x64):
    xs = [jnp.asarray(_x((5, 4), seed=s)) for s in range(4)]
    theirs = _f64_stats(nnx.BatchNorm(4, use_fast_variance=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    for x in xs[:2]:
        theirs(x)
    ours = NNXBatchNorm(4, param_dtype=jnp.float64)
    nnx.update(ours, nnx.state(theirs))  # Flax's state, as is
    merged = nnx.merge(nnx.graphdef(NNXBatchNorm(4)), nnx.state(theirs))
    for layer in (ours, merged):
        np.testing.assert_array_equal(np.asarray(layer.mean[...]), np.asarray(theirs.mean[...]))
    clone_t = nnx.clone(theirs)
    np.testing.assert_allclose(np.asarray(ours(xs[2])), np.asarray(clone_t(xs[2])), **F64)
    np.testing.assert_allclose(np.asarray(ours.var[...]), np.asarray(clone_t.var[...]), **F64)
    ours.eval(), clone_t.eval()
    np.testing.assert_allclose(np.asarray(ours(xs[3])), np.asarray(clone_t(xs[3])), **F64)


# -- NNX transforms on small models --------------------------------------------------------------


class MLP(nnx.Module):
    """Linear -> BN -> relu -> Linear, with a BN layer class to choose."""

    def __init__(self, bn, *, rngs, **bn_kw):
        self.lin1 = nnx.Linear(3, 4, param_dtype=jnp.float64, rngs=rngs)
        self.bn = bn(4, param_dtype=jnp.float64, rngs=rngs, **bn_kw)
        self.lin2 = nnx.Linear(4, 2, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.lin2(nnx.relu(self.bn(self.lin1(x))))


def _f64_stats(model):
    """flax.nnx.BatchNorm creates float32 statistics whatever param_dtype; make them float64."""
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model, nnx.BatchStat)))
    return model


def _pair(**kw):
    theirs = MLP(nnx.BatchNorm, rngs=nnx.Rngs(0), use_fast_variance=False)
    return MLP(NNXBatchNorm, rngs=nnx.Rngs(0), **kw), _f64_stats(theirs)


def _close_trees(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-13)


def _loss(model, x):
    return jnp.sum(jnp.sin(model(x)))


def test_nnx_tree_mode_grad(x64):
    ours, theirs = _pair()
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
    for k in range(3):
        x = jnp.asarray(_x((8, 3), seed=k))
        g_o = nnx.grad(_loss, graph=False)(ours, x)
        g_t = nnx.grad(_loss, graph=False)(theirs, x)
        _close_trees(nnx.state(g_o, nnx.Param), nnx.state(g_t, nnx.Param))
    # momentum=None keeps a float step count, which tree-mode grad accepts too
    cma = MLP(NNXBatchNorm, rngs=nnx.Rngs(0), momentum=None)
    g = nnx.grad(_loss, graph=False)(cma, jnp.asarray(_x((8, 3))))
    assert np.isfinite(np.asarray(g.lin1.kernel[...])).all()


def test_nnx_jit_train_step_split_merge_filters(x64):
    ours, theirs = _pair()
    results = []
    for model in (ours, theirs):
        graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)  # no `...` needed

        @jax.jit
        def step(params, stats, x, graphdef=graphdef):
            def loss(params):
                # fresh Variables at this trace level (NNX mutates only its own trace's)
                m = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, stats))
                out = _loss(m, x)
                return out, nnx.state(m, nnx.BatchStat)

            (val, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
            params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
            return val, params, new_stats

        vals = []
        for k in range(3):
            val, params, stats = step(params, stats, jnp.asarray(_x((8, 3), seed=10 + k)))
            vals.append(val)
        results.append((vals, params, stats))
    _close_trees(results[0], results[1])


def test_nnx_vmap_ensemble_with_state_axes(x64):
    def build(bn, **kw):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=0, out_axes=0)
        def create(rngs):
            return MLP(bn, rngs=rngs, **kw)

        return create(nnx.Rngs(0))

    ours, theirs = build(NNXBatchNorm), _f64_stats(build(nnx.BatchNorm, use_fast_variance=False))
    axes = nnx.StateAxes({nnx.Param: 0, nnx.BatchStat: 0})

    @nnx.vmap(in_axes=(axes, None), out_axes=0)
    def forward(model, x):
        return model(x)

    x = jnp.asarray(_x((8, 3), seed=20))
    _close_trees(forward(ours, x), forward(theirs, x))
    _close_trees(nnx.state(ours), nnx.state(theirs))
    assert ours.bn.mean[...].shape == (3, 4)


def test_nnx_orbax_checkpoint_round_trip_and_cross_load(tmp_path, x64):
    ocp = pytest.importorskip("orbax.checkpoint")
    ours, theirs = _pair()
    for k in range(2):
        x = jnp.asarray(_x((8, 3), seed=30 + k))
        ours(x), theirs(x)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "theirs", nnx.state(theirs))
    ckpt.wait_until_finished()
    abstract = nnx.state(nnx.eval_shape(lambda: MLP(NNXBatchNorm, rngs=nnx.Rngs(1))))
    restored = ckpt.restore(tmp_path / "theirs", abstract)
    fresh = MLP(NNXBatchNorm, rngs=nnx.Rngs(1))
    nnx.update(fresh, restored)  # a Flax model's checkpoint, restored into bn-ref layers
    _close_trees(nnx.state(fresh), nnx.state(theirs))
    x = jnp.asarray(_x((8, 3), seed=40))
    fresh.eval(), theirs.eval()
    _close_trees(fresh(x), theirs(x))
