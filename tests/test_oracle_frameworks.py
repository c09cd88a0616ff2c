"""The oracle agrees with real frameworks, each under the preset that reproduces its defaults
(docs/spec.md §9): PyTorch ``F.batch_norm`` / ``nn.BatchNorm*d`` (``pytorch``), Flax linen
``BatchNorm(use_fast_variance=False)`` (``flax``), the ONNX reference evaluator (``onnx``) and the
d2l book's from-scratch layer as re-implemented in :mod:`bn_ref.d2l_scratch` (``d2l``).

Everything runs in float64 (the frameworks' defaults for eps and momentum are *not* passed, so
the presets' values are checked too) and is compared with :func:`bn_ref.tolerances.assert_close`.
Checked: y, running statistics over several steps (momentum=None too where the framework has
it), eval output, and gradients (dx, dgamma, dbeta) where the framework differentiates. ONNX has
no gradient, and the d2l layer has none in eval (its eval *is* ``torch.no_grad``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bn_ref import oracle
from bn_ref.conventions import PRESETS
from bn_ref.tolerances import assert_close

F64 = "float64"
STEPS = 4


def _data(shape, axis, seed, steps=STEPS):
    """Batches with per-channel offsets/spreads, gamma, beta, running stats, dy (float64)."""
    rng = np.random.default_rng(seed)
    ax = axis % len(shape)
    c = shape[ax]
    bs = tuple(c if i == ax else 1 for i in range(len(shape)))
    xs = [
        rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=c).reshape(bs) + rng.uniform(-4, 4, size=c).reshape(bs)
        for _ in range(steps)
    ]
    gamma = rng.uniform(0.5, 2.0, size=c) * rng.choice([-1.0, 1.0], size=c)
    beta = rng.normal(size=c)
    rm = rng.normal(size=c)
    rv = rng.uniform(0.5, 2.0, size=c)
    dy = rng.normal(size=shape)
    return xs, gamma, beta, rm, rv, dy


def _oracle_steps(xs, gamma, beta, rm, rv, conv, axis):
    """Run the oracle over the batches; returns the list of ForwardResults."""
    out, count = [], 0
    for x in xs:
        res = oracle.forward(x, gamma, beta, rm, rv, training=True, convention=conv, axis=axis, count=count)
        out.append(res)
        rm, rv, count = res.running_mean, res.running_var, res.count
    return out


# ============================================================================================
# PyTorch (preset "pytorch")
# ============================================================================================

TORCH_SHAPES = [(8, 3), (5, 1), (4, 3, 5), (3, 2, 4, 3), (2, 4, 1, 1), (2, 3, 2, 3, 2), (1, 2, 3, 2, 2)]
assert len(TORCH_SHAPES) == 7 and {len(s) for s in TORCH_SHAPES} == {2, 3, 4, 5}


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _t(torch, a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("shape", TORCH_SHAPES)
def test_pytorch_functional(torch, shape):
    import torch.nn.functional as F

    conv = PRESETS["pytorch"]
    xs, gamma, beta, rm0, rv0, dy = _data(shape, 1, seed=len(shape) * 100 + shape[0])
    expected = _oracle_steps(xs, gamma, beta, rm0, rv0, conv, None)
    rm, rv = _t(torch, rm0), _t(torch, rv0)
    w, b = _t(torch, gamma), _t(torch, beta)
    for x, exp in zip(xs, expected):
        y = F.batch_norm(_t(torch, x), rm, rv, w, b, training=True)  # framework defaults: momentum 0.1, eps 1e-5
        assert_close(y.numpy(), exp.y, F64, what="y")
        assert_close(rm.numpy(), exp.running_mean, F64, what="running_mean")
        assert_close(rv.numpy(), exp.running_var, F64, what="running_var")
    # Eval with the running statistics reached.
    x = xs[0]
    y = F.batch_norm(_t(torch, x), rm, rv, w, b, training=False)
    ev = oracle.forward(x, gamma, beta, rm.numpy(), rv.numpy(), training=False, convention=conv)
    assert_close(y.numpy(), ev.y, F64, what="eval y")
    # Gradients, training and eval, with and without affine parameters.
    for training in (True, False):
        for affine in (True, False):
            xt = _t(torch, x, grad=True)
            wt, bt = (_t(torch, gamma, True), _t(torch, beta, True)) if affine else (None, None)
            y = F.batch_norm(xt, rm.clone(), rv.clone(), wt, bt, training=training)
            (y * _t(torch, dy)).sum().backward()
            dx, dgamma, dbeta = oracle.backward(
                dy,
                x,
                gamma if affine else None,
                training=training,
                convention=conv,
                running_mean=rm.numpy(),
                running_var=rv.numpy(),
            )
            assert_close(xt.grad.numpy(), dx, F64, what=f"dx training={training}")
            if affine:
                assert_close(wt.grad.numpy(), dgamma, F64, what="dgamma")
                assert_close(bt.grad.numpy(), dbeta, F64, what="dbeta")


@pytest.mark.parametrize("shape", TORCH_SHAPES)
@pytest.mark.parametrize("momentum", ["default", None])
def test_pytorch_module_running_stats(torch, shape, momentum):
    """nn.BatchNorm*d, momentum default (0.1) and None (cumulative average, num_batches_tracked)."""
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[
        len(shape)
    ]
    conv = PRESETS["pytorch"]
    kwargs = {}
    if momentum is None:
        conv = dataclasses.replace(conv, name="pytorch-cma", momentum=None)
        kwargs["momentum"] = None
    c = shape[1]
    xs, gamma, beta, rm0, rv0, _ = _data(shape, 1, seed=len(shape) * 7 + shape[0])
    bn = cls(c, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        bn.weight.copy_(_t(torch, gamma))
        bn.bias.copy_(_t(torch, beta))
        bn.running_mean.copy_(_t(torch, rm0))
        bn.running_var.copy_(_t(torch, rv0))
    expected = _oracle_steps(xs, gamma, beta, rm0, rv0, conv, None)
    bn.train()
    for x, exp in zip(xs, expected):
        y = bn(_t(torch, x))
        assert_close(y.detach().numpy(), exp.y, F64, what="y")
        assert_close(bn.running_mean.numpy(), exp.running_mean, F64, what="running_mean")
        assert_close(bn.running_var.numpy(), exp.running_var, F64, what="running_var")
        assert int(bn.num_batches_tracked) == exp.count
    bn.eval()
    with torch.no_grad():
        y = bn(_t(torch, xs[-1]))
    ev = oracle.forward(
        xs[-1], gamma, beta, expected[-1].running_mean, expected[-1].running_var, training=False, convention=conv
    )
    assert_close(y.numpy(), ev.y, F64, what="eval y")


def test_pytorch_single_value_rejected_like_the_oracle(torch):
    import torch.nn.functional as F

    x = np.ones((1, 3))
    with pytest.raises(ValueError):
        F.batch_norm(_t(torch, x), None, None, training=True)
    with pytest.raises(ValueError, match="n = 1"):
        oracle.forward(x, None, None, None, None, training=True, convention="pytorch")


# ============================================================================================
# Flax linen (preset "flax")
# ============================================================================================

FLAX_CASES = [((8, 3), -1), ((4, 5, 3), -1), ((3, 4, 2, 3), -1), ((2, 3, 2, 2, 4), -1), ((5, 1), -1), ((3, 4, 2, 3), 1)]
assert len(FLAX_CASES) == 6


@pytest.fixture(scope="module")
def jax_x64():
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield jax
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("shape, axis", FLAX_CASES)
def test_flax_linen(jax_x64, shape, axis):
    jax = jax_x64
    import flax.linen as fnn
    import jax.numpy as jnp

    conv = PRESETS["flax"]
    xs, gamma, beta, rm0, rv0, dy = _data(shape, axis, seed=len(shape) * 31 + shape[0] + axis)
    kw = dict(use_fast_variance=False, dtype=jnp.float64, param_dtype=jnp.float64)
    if axis != -1:
        kw["axis"] = axis  # the default is -1; momentum 0.99 and epsilon 1e-5 are left at the defaults
    train_bn = fnn.BatchNorm(use_running_average=False, **kw)
    eval_bn = fnn.BatchNorm(use_running_average=True, **kw)
    params = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
    stats = {"mean": jnp.asarray(rm0), "var": jnp.asarray(rv0)}
    expected = _oracle_steps(xs, gamma, beta, rm0, rv0, conv, axis)
    for x, exp in zip(xs, expected):
        y, upd = train_bn.apply({"params": params, "batch_stats": stats}, jnp.asarray(x), mutable=["batch_stats"])
        stats = upd["batch_stats"]
        assert y.dtype == jnp.float64 and stats["var"].dtype == jnp.float64
        assert_close(np.asarray(y), exp.y, F64, what="y")
        assert_close(np.asarray(stats["mean"]), exp.running_mean, F64, what="running mean")
        assert_close(np.asarray(stats["var"]), exp.running_var, F64, what="running var")
    x = xs[0]
    rm, rv = np.asarray(stats["mean"]), np.asarray(stats["var"])
    for training, module in ((True, train_bn), (False, eval_bn)):

        def loss(x_, p_, module=module):
            out = module.apply({"params": p_, "batch_stats": stats}, x_, mutable=["batch_stats"])
            return jnp.sum(out[0] * dy)

        dx, dp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), params)
        edx, edgamma, edbeta = oracle.backward(
            dy, x, gamma, training=training, convention=conv, axis=axis, running_mean=rm, running_var=rv
        )
        assert_close(np.asarray(dx), edx, F64, what=f"dx training={training}")
        assert_close(np.asarray(dp["scale"]), edgamma, F64, what="dgamma")
        assert_close(np.asarray(dp["bias"]), edbeta, F64, what="dbeta")
    y = eval_bn.apply({"params": params, "batch_stats": stats}, jnp.asarray(x))
    ev = oracle.forward(x, gamma, beta, rm, rv, training=False, convention=conv, axis=axis)
    assert_close(np.asarray(y), ev.y, F64, what="eval y")


# ============================================================================================
# ONNX reference evaluator (preset "onnx", opset 15)
# ============================================================================================

ONNX_SHAPES = [(8, 3), (4, 3, 5), (3, 2, 4, 3), (2, 3, 2, 3, 2), (6, 1)]
assert len(ONNX_SHAPES) == 5


@pytest.fixture(scope="module")
def onnx_mod():
    return pytest.importorskip("onnx")


def _onnx_bn(onnx, rank: int, training_mode: int):
    """A one-node opset-15 model; epsilon and momentum are left at the operator's defaults."""
    from onnx import TensorProto, helper

    outs = ["Y", "running_mean", "running_var"] if training_mode else ["Y"]
    node = helper.make_node(
        "BatchNormalization", ["X", "scale", "B", "input_mean", "input_var"], outs, training_mode=training_mode
    )
    dims = [f"d{i}" for i in range(rank)]
    inputs = [helper.make_tensor_value_info("X", TensorProto.DOUBLE, dims)] + [
        helper.make_tensor_value_info(n, TensorProto.DOUBLE, ["C"]) for n in ("scale", "B", "input_mean", "input_var")
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, dims if n == "Y" else ["C"]) for n in outs]
    model = helper.make_model(
        helper.make_graph([node], "bn", inputs, outputs), opset_imports=[helper.make_opsetid("", 15)]
    )
    onnx.checker.check_model(model, full_check=True)
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model)


def _onnx_float_attr_defaults(onnx):
    schema = onnx.defs.get_schema("BatchNormalization", 15)
    return {k: schema.attributes[k].default_value.f for k in ("epsilon", "momentum")}


def test_onnx_preset_is_the_opset15_defaults(onnx_mod):
    """ONNX float attributes are float32: the preset's numbers round to the schema's defaults."""
    conv = PRESETS["onnx"]
    defaults = _onnx_float_attr_defaults(onnx_mod)
    assert np.float32(conv.eps) == np.float32(defaults["epsilon"])
    assert np.float32(conv.momentum) == np.float32(defaults["momentum"])
    assert conv.momentum_on == "running" and conv.running_var == "biased" and conv.feature_axis == 1


@pytest.mark.parametrize("shape", ONNX_SHAPES)
def test_onnx_reference(onnx_mod, shape):
    # The evaluator computes with the float32 attribute values (0.9f is 0.8999999762), so the
    # oracle gets the same numbers, rounded to float32, through dataclasses.replace.
    defaults = _onnx_float_attr_defaults(onnx_mod)
    conv = dataclasses.replace(
        PRESETS["onnx"], eps=float(np.float32(defaults["epsilon"])), momentum=float(np.float32(defaults["momentum"]))
    )
    train, infer = _onnx_bn(onnx_mod, len(shape), 1), _onnx_bn(onnx_mod, len(shape), 0)
    xs, gamma, beta, rm, rv, _ = _data(shape, 1, seed=len(shape) * 13 + shape[0])
    expected = _oracle_steps(xs, gamma, beta, rm, rv, conv, None)
    for x, exp in zip(xs, expected):
        y, rm, rv = train.run(None, {"X": x, "scale": gamma, "B": beta, "input_mean": rm, "input_var": rv})
        assert y.dtype == np.float64
        assert_close(y, exp.y, F64, what="y")
        assert_close(rm, exp.running_mean, F64, what="running_mean")
        assert_close(rv, exp.running_var, F64, what="running_var")
    (y,) = infer.run(None, {"X": xs[1], "scale": gamma, "B": beta, "input_mean": rm, "input_var": rv})
    ev = oracle.forward(xs[1], gamma, beta, rm, rv, training=False, convention=conv)
    assert_close(y, ev.y, F64, what="eval y")


# ============================================================================================
# The d2l book's from-scratch layer (preset "d2l"), bn_ref.d2l_scratch
# ============================================================================================

D2L_SHAPES = [(8, 3), (5, 1), (1, 4), (4, 3, 2, 3), (2, 2, 3, 1), (1, 3, 1, 1)]
assert len(D2L_SHAPES) == 6 and {len(s) for s in D2L_SHAPES} == {2, 4}


@pytest.fixture(scope="module")
def d2l(torch):
    from bn_ref import d2l_scratch

    return d2l_scratch


def _per_channel(t):
    return t.detach().reshape(-1).numpy()


@pytest.mark.parametrize("shape", D2L_SHAPES)
@pytest.mark.parametrize("init", ["book", "random"])
def test_d2l_scratch(torch, d2l, shape, init):
    conv = PRESETS["d2l"]
    c = shape[1]
    xs, gamma, beta, rm0, rv0, dy = _data(shape, 1, seed=len(shape) * 17 + shape[0] + c)
    bn = d2l.BatchNorm(c, len(shape)).double()
    pshape = (1, c) if len(shape) == 2 else (1, c, 1, 1)
    with torch.no_grad():
        bn.gamma.copy_(_t(torch, gamma).reshape(pshape))
        bn.beta.copy_(_t(torch, beta).reshape(pshape))
    # Moving statistics are held to float64 tolerances, except after the book's own float32
    # initial values: its first update computes momentum * moving in float32 (0.9 * 1.0f is
    # 0.89999998), a faithful consequence of .double() not converting plain attributes.
    stats_dtype = F64
    if init == "book":  # the layer's own initial statistics: zeros and ones (float32)
        assert bn.moving_mean.dtype == torch.float32
        rm0, rv0 = np.zeros(c), np.ones(c)
        stats_dtype = "float32"
    else:
        bn.moving_mean = _t(torch, rm0).reshape(pshape)
        bn.moving_var = _t(torch, rv0).reshape(pshape)
    expected = _oracle_steps(xs, gamma, beta, rm0, rv0, conv, None)
    for x, exp in zip(xs, expected):
        assert torch.is_grad_enabled()
        y = bn(_t(torch, x))
        assert_close(y.detach().numpy(), exp.y, F64, what="y")
        assert bn.moving_mean.shape == pshape and bn.moving_mean.dtype == torch.float64
        assert_close(_per_channel(bn.moving_mean), exp.running_mean, stats_dtype, what="moving_mean")
        assert_close(_per_channel(bn.moving_var), exp.running_var, stats_dtype, what="moving_var")
    # Gradients in training, through the batch statistics.
    x = xs[0]
    bn.gamma.grad = bn.beta.grad = None
    xt = _t(torch, x, grad=True)
    (bn(xt) * _t(torch, dy)).sum().backward()
    dx, dgamma, dbeta = oracle.backward(dy, x, gamma, training=True, convention=conv)
    assert_close(xt.grad.numpy(), dx, F64, what="dx")
    assert_close(_per_channel(bn.gamma.grad), dgamma, F64, what="dgamma")
    assert_close(_per_channel(bn.beta.grad), dbeta, F64, what="dbeta")
    # Eval is grad mode off; the moving statistics are used and left alone.
    rm, rv = _per_channel(bn.moving_mean).copy(), _per_channel(bn.moving_var).copy()
    with torch.no_grad():
        y = bn(_t(torch, xs[1]))
    ev = oracle.forward(xs[1], gamma, beta, rm, rv, training=False, convention=conv)
    assert_close(y.numpy(), ev.y, F64, what="eval y")
    np.testing.assert_array_equal(_per_channel(bn.moving_mean), rm)
    np.testing.assert_array_equal(_per_channel(bn.moving_var), rv)


def test_d2l_function_matches_preset_numbers(torch, d2l):
    """batch_norm with the preset's eps and momentum, called directly, 4-D, plus a custom variant."""
    rng = np.random.default_rng(21)
    x = rng.normal(size=(3, 2, 4, 2)) * 2 + 1
    gamma, beta, rm, rv = rng.normal(size=2), rng.normal(size=2), rng.normal(size=2), rng.uniform(1, 2, size=2)
    for eps, m in ((d2l.EPS, d2l.MOMENTUM), (1e-3, 0.5)):
        conv = dataclasses.replace(PRESETS["d2l"], eps=eps, momentum=m)
        args = [_t(torch, a).reshape(1, 2, 1, 1) for a in (gamma, beta, rm, rv)]
        y, new_m, new_v = d2l.batch_norm(_t(torch, x), *args, eps=eps, momentum=m)
        exp = oracle.forward(x, gamma, beta, rm, rv, training=True, convention=conv)
        assert_close(y.detach().numpy(), exp.y, F64, what="y")
        assert_close(_per_channel(new_m), exp.running_mean, F64, what="moving_mean")
        assert_close(_per_channel(new_v), exp.running_var, F64, what="moving_var")
    assert (d2l.EPS, d2l.MOMENTUM) == (PRESETS["d2l"].eps, PRESETS["d2l"].momentum)


def test_d2l_faithful_quirks(torch, d2l):
    """The book's behaviour kept on purpose: grad-mode switch, plain-attribute statistics, 2-D/4-D only."""
    bn = d2l.BatchNorm(3, 2).double()
    # .double() converts the parameters but not the moving statistics (not buffers).
    assert bn.gamma.dtype == torch.float64 and bn.moving_mean.dtype == torch.float32
    assert set(bn.state_dict()) == {"gamma", "beta"}
    x = _t(torch, np.random.default_rng(22).normal(size=(6, 3)))
    # model.eval() alone still trains: batch statistics are used and the moving ones change.
    bn.eval()
    y = bn(x)
    assert not np.allclose(_per_channel(bn.moving_mean), 0.0)
    exp = oracle.forward(x.numpy(), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), training=True, convention="d2l")
    assert_close(y.detach().numpy(), exp.y, F64, what="y under model.eval()")
    # model.train() under no_grad is eval.
    bn.train()
    before = _per_channel(bn.moving_mean).copy()
    with torch.no_grad():
        bn(x)
    np.testing.assert_array_equal(_per_channel(bn.moving_mean), before)
    # Only 2-D and 4-D inputs train.
    with pytest.raises(AssertionError):
        d2l.BatchNorm(3, 3)(torch.ones(2, 3, 4))
    assert not bn.moving_mean.requires_grad


def test_d2l_moves_statistics_to_the_input_device(torch, d2l):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    bn = d2l.BatchNorm(3, 4).cuda()
    assert bn.moving_mean.device.type == "cpu"  # plain attributes: .cuda() leaves them behind
    x = np.random.default_rng(23).normal(size=(4, 3, 2, 2)).astype(np.float32)
    y = bn(torch.tensor(x, device="cuda"))
    assert bn.moving_mean.device.type == "cuda" and bn.moving_var.device.type == "cuda"
    exp = oracle.forward(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), training=True, convention="d2l")
    kappa = oracle.condition_number(x, convention="d2l")
    assert_close(y.detach().cpu().numpy(), exp.y, "float32", kappa=kappa, what="y on CUDA")
    assert_close(_per_channel(bn.moving_var.cpu()), exp.running_var, "float32", kappa=kappa, what="moving_var on CUDA")
