"""bn_ref.torch layers as drop-ins for torch.nn: constructor signatures, errors, transforms, tooling.

Everything here is checked against torch.nn itself (float64 unless said otherwise):

* constructors take torch 2.13's arguments in its order with its defaults (``inspect.signature``),
  ``bias=`` included, and bn-ref's options keyword-only; defaults still mean "the convention's";
* shape and size mismatches raise ``RuntimeError`` wherever torch.nn does (bn-ref's
  ``ShapeMismatchError`` is also a ``ValueError``), naming the argument and the shapes;
* forward-mode AD (dual tensors, ``torch.func.jvp``), ``torch.func.functional_call``,
  ``torch.func.vmap``, ``torch.compile(fullgraph=True)``, ``torch.export`` and ONNX export agree
  with torch.nn's results, and fail where torch.nn's fail.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vmap

import bn_ref.torch as bnt
from bn_ref import oracle, tolerances
from bn_ref._checks import ShapeMismatchError

IMPLS = ["function", "autograd"]
C = 3
PAIRS = {  # name -> (ours, torch's, input shape)
    "1d": (bnt.BatchNorm1d, nn.BatchNorm1d, (6, C)),
    "1d_seq": (bnt.BatchNorm1d, nn.BatchNorm1d, (4, C, 5)),
    "2d": (bnt.BatchNorm2d, nn.BatchNorm2d, (3, C, 4, 3)),
    "3d": (bnt.BatchNorm3d, nn.BatchNorm3d, (2, C, 3, 2, 2)),
}


def close(actual, expected, dtype="float64", *, kappa=1.0, what="value"):
    a = actual.detach().to(torch.float64).cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().to(torch.float64).cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    tolerances.assert_close(a, e, dtype, kappa=kappa, what=what)


def make_x(shape, *, seed, dtype=torch.float64, offset=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.7 + offset).to(dtype)


def kappa_of(x: torch.Tensor) -> float:
    return oracle.condition_number(x.detach().double().numpy(), convention="pytorch")


def twins(ours_cls, torch_cls, *args, impl="function", seed=0, **kwargs):
    """A torch.nn layer with non-trivial state and a bn-ref layer holding a strict copy of it."""
    theirs = torch_cls(*args, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            t = getattr(theirs, name)
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + (1.0 if name == "weight" else 0.0))
        if theirs.running_var is not None:
            theirs.running_var.copy_(torch.rand(theirs.running_var.shape, generator=gen) + 0.5)
    ours = ours_cls(*args, implementation=impl, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def assert_same_state(ours, theirs, what):
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert list(sd_o) == list(sd_t), what
    for key in sd_o:
        assert sd_o[key].dtype == sd_t[key].dtype and sd_o[key].shape == sd_t[key].shape, f"{what}: {key}"
        if sd_o[key].dtype == torch.int64:
            assert torch.equal(sd_o[key], sd_t[key]), f"{what}: {key}"
        else:
            close(sd_o[key], sd_t[key], str(sd_o[key].dtype).replace("torch.", ""), what=f"{what}: {key}")


# -- 1. constructor signatures ---------------------------------------------------------------------------

SIGNATURE_PAIRS = [
    (bnt.BatchNorm1d, nn.BatchNorm1d),
    (bnt.BatchNorm2d, nn.BatchNorm2d),
    (bnt.BatchNorm3d, nn.BatchNorm3d),
    (bnt.BatchNorm, nn.BatchNorm1d),  # bn-ref's any-rank layer takes the same arguments
    (bnt.SyncBatchNorm, nn.SyncBatchNorm),
]
BNREF_OPTIONS = ("convention", "feature_axis", "implementation")


@pytest.mark.parametrize(("ours", "theirs"), SIGNATURE_PAIRS, ids=[p[0].__name__ for p in SIGNATURE_PAIRS])
def test_signature_is_torchs_then_keyword_only_options(ours, theirs):
    p_o = list(inspect.signature(ours).parameters.values())
    p_t = list(inspect.signature(theirs).parameters.values())
    assert len(p_t) >= 8 and [p.name for p in p_t][:2] == ["num_features", "eps"]
    # torch's parameters first, same names, kinds, defaults and default reprs
    for a, b in zip(p_o, p_t):
        assert (a.name, a.kind) == (b.name, b.kind), (a, b)
        assert a.default == b.default and repr(a.default) == repr(b.default), (a, b)
    rest = p_o[len(p_t):]
    # the layers (not SyncBatchNorm) also take a BN variant (spec §13-§17)
    assert tuple(p.name for p in rest) == BNREF_OPTIONS + (() if ours is bnt.SyncBatchNorm else ("variant",))
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest)


# positional and keyword constructions as torch users (and torch's own module tests) write them
CONSTRUCTIONS = [
    ("2d", (C,), {}),
    ("1d", (C, 1e-3, None), {}),  # eps, cumulative average
    ("1d", (C, 1e-3, 0.3, False), {}),  # no affine
    ("1d_seq", (C, 1e-3, 0.3, True, False), {}),  # no running statistics
    ("2d", (C, 1e-3, 0.8), {}),
    ("3d", (C, 1e-3, 0.7, True, True, "cpu", torch.float64), {}),  # device and dtype positionally
    ("2d", (C,), {"bias": False}),
    ("1d", (C,), {"bias": False, "momentum": None}),
    ("3d", (C,), {"affine": False, "bias": False}),
]
assert len(CONSTRUCTIONS) == 9


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("pair", "args", "kwargs"), CONSTRUCTIONS, ids=[f"{c[0]}-{c[1][1:]}-{c[2]}" for c in CONSTRUCTIONS])
def test_torch_style_construction_matches_torch_nn(pair, args, kwargs, impl):
    ours_cls, torch_cls, shape = PAIRS[pair]
    kwargs = dict(kwargs)
    if len(args) < 7:
        kwargs.setdefault("dtype", torch.float64)
    ours, theirs = twins(ours_cls, torch_cls, *args, impl=impl, **kwargs)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert (ours.bias is None) == (theirs.bias is None) and (ours.weight is None) == (theirs.weight is None)
    assert "bias=" in repr(ours)
    for step in range(4):
        training = step < 3
        ours.train(training)
        theirs.train(training)
        x = make_x(shape, seed=step)
        x_o, x_t = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_o, y_t = ours(x_o), theirs(x_t)
        dy = make_x(shape, seed=50 + step, offset=0.0)
        y_o.backward(dy)
        y_t.backward(dy)
        k = kappa_of(x)
        close(y_o, y_t, kappa=k, what=f"y step {step}")
        close(x_o.grad, x_t.grad, kappa=k, what=f"dx step {step}")
        for name in ("weight", "bias"):
            g_o, g_t = getattr(ours, name), getattr(theirs, name)
            if g_t is not None:
                close(g_o.grad, g_t.grad, kappa=k, what=f"d{name} step {step}")
        assert_same_state(ours, theirs, f"step {step}")


def test_defaults_stand_for_the_conventions_values():
    keras = bnt.BatchNorm2d(C, convention="keras")
    assert (keras.eps, keras.momentum, keras.feature_axis) == (1e-3, 0.99, -1)
    # an explicit value, torch's default value included, overrides the convention
    explicit = bnt.BatchNorm2d(C, 1e-5, 0.1, convention="keras")
    assert (explicit.eps, explicit.momentum) == (1e-5, 0.1)
    assert explicit.convention.momentum_on == "running"  # read as the convention reads it
    assert bnt.BatchNorm2d(C, eps=1e-5, convention="keras").eps == 1e-5
    assert bnt.BatchNorm2d(C, momentum=None, convention="flax").momentum is None
    # bn-ref's older spellings still keep the convention's value
    from bn_ref import DEFAULT

    legacy = bnt.BatchNorm2d(C, eps=None, momentum=DEFAULT, convention="keras")
    assert (legacy.eps, legacy.momentum) == (1e-3, 0.99)
    # the defaults are plain floats to torch code that reads the signature
    defaults = inspect.signature(bnt.BatchNorm2d).parameters
    assert isinstance(defaults["eps"].default, float) and defaults["eps"].default == 1e-5
    assert float(defaults["momentum"].default) == 0.1
    # bn-ref's options cannot be given positionally
    with pytest.raises(TypeError):
        bnt.BatchNorm2d(C, 1e-5, 0.1, True, True, None, None, "flax")


def test_sync_batchnorm_constructor_and_conversion_keep_bias_false():
    args = (C, 1e-3, None, True, True, None, "cpu", torch.float64)
    ours, theirs = bnt.SyncBatchNorm(*args, bias=False), nn.SyncBatchNorm(*args, bias=False)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "process_group"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert list(ours.state_dict()) == list(theirs.state_dict()) and ours.bias is None
    # single process: synchronized BN is plain BN, as torch.nn.SyncBatchNorm outside a process group
    ours.load_state_dict(theirs.state_dict())
    x = make_x((4, C, 3), seed=3)
    close(ours(x), theirs(x), kappa=kappa_of(x), what="y")
    assert_same_state(ours, theirs, "after a step")
    converted = bnt.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(C, bias=False, dtype=torch.float64)))
    assert isinstance(converted[0], bnt.SyncBatchNorm) and converted[0].bias is None
    assert converted[0].weight is not None


# -- 3. shape and size mismatches raise RuntimeError as in torch.nn ------------------------------------------


def _resize(module, name, size):
    old = getattr(module, name)
    new = torch.ones(size, dtype=old.dtype)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new))
    else:
        setattr(module, name, new)


MODULE_MISMATCHES = [
    # (label, layer kwargs, what to resize, input shape, training, bn-ref message)
    ("channels", {}, None, (4, C + 1, 2, 2), True, rf"expected {C} features on axis 1 .*got {C + 1} \(input shape \(4, {C + 1}, 2, 2\)\)"),
    ("channels eval", {}, None, (4, C + 1, 2, 2), False, rf"expected {C} features .*got {C + 1}"),
    ("channels no running stats", {"track_running_stats": False}, None, (4, C + 1, 2, 2), True, "expected 3 features"),
    ("running_mean size", {}, ("running_mean", C + 1), (4, C, 2, 2), True, r"running_mean must have shape \(C,\) = \(3,\).*got shape \(4,\)"),
    ("running_var size eval", {}, ("running_var", C - 1), (4, C, 2, 2), False, r"running_var must have shape \(C,\) = \(3,\).*got shape \(2,\)"),
    ("weight size", {}, ("weight", C + 2), (4, C, 2, 2), True, r"weight must have shape \(C,\) = \(3,\).*got shape \(5,\)"),
    ("bias size eval", {}, ("bias", 1), (4, C, 2, 2), False, r"bias must have shape \(C,\) = \(3,\).*got shape \(1,\)"),
]
assert len(MODULE_MISMATCHES) == 7


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("label", "kwargs", "resize", "shape", "training", "match"), MODULE_MISMATCHES,
                         ids=[m[0] for m in MODULE_MISMATCHES])
def test_module_size_mismatch_is_a_runtime_error_like_torch(label, kwargs, resize, shape, training, match, impl):
    ours = bnt.BatchNorm2d(C, implementation=impl, **kwargs).train(training)
    theirs = nn.BatchNorm2d(C, **kwargs).train(training)
    if resize is not None:
        _resize(ours, *resize)
        _resize(theirs, *resize)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = make_x(shape, seed=1, dtype=torch.float32)
    with pytest.raises(RuntimeError):
        theirs(x)
    with pytest.raises(RuntimeError, match=match) as info:
        ours(x)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ShapeMismatchError)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items())  # nothing changed


FUNCTIONAL_MISMATCHES = ["running_mean", "running_var", "weight", "bias"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", FUNCTIONAL_MISMATCHES)
def test_functional_size_mismatch_is_a_runtime_error_like_torch(name, training, impl):
    x = make_x((4, C, 5), seed=2)
    args = {"running_mean": torch.zeros(C, dtype=torch.float64), "running_var": torch.ones(C, dtype=torch.float64),
            "weight": torch.ones(C, dtype=torch.float64), "bias": torch.zeros(C, dtype=torch.float64)}
    args[name] = torch.ones(C + 1, dtype=torch.float64)
    order = ("running_mean", "running_var", "weight", "bias")
    with pytest.raises(RuntimeError):
        F.batch_norm(x, *(args[k] for k in order), training=training)
    with pytest.raises(RuntimeError, match=rf"{name} must have shape \(C,\) = \(3,\).*x.shape \(4, 3, 5\); got shape \(4,\)"):
        bnt.batch_norm(x, *(args[k] for k in order), training=training, implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["weight", "running_mean"])
def test_device_mismatch_is_a_runtime_error_like_torch(name, impl):
    """A per-channel tensor on another device ("meta" stands in for a GPU on CPU-only machines)."""
    layers = [bnt.BatchNorm1d(C, implementation=impl), nn.BatchNorm1d(C)]
    for layer in layers:
        old = getattr(layer, name)
        meta = torch.ones(C, device="meta")
        setattr(layer, name, nn.Parameter(meta) if isinstance(old, nn.Parameter) else meta)
    x = make_x((4, C), seed=3, dtype=torch.float32)
    with pytest.raises(RuntimeError):
        layers[1](x)
    with pytest.raises(RuntimeError, match=rf"{name} must be on the device of x \(cpu\); got meta") as info:
        layers[0](x)
    assert isinstance(info.value, ValueError) and isinstance(info.value, bnt.DeviceMismatchError)


# -- 2a. forward-mode AD --------------------------------------------------------------------------------------


def _tangent(shape, seed):
    return make_x(shape, seed=seed, offset=0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pair", ["1d", "2d", "3d"])
def test_dual_tensor_forward_ad_matches_torch_nn(pair, training, impl):
    ours_cls, torch_cls, shape = PAIRS[pair]
    ours, theirs = twins(ours_cls, torch_cls, C, impl=impl, dtype=torch.float64)
    ours.train(training)
    theirs.train(training)
    x, tx = make_x(shape, seed=4), _tangent(shape, 5)
    tw, tb = _tangent((C,), 6), _tangent((C,), 7)
    w, b = ours.weight.detach().clone(), ours.bias.detach().clone()
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()
    results = []
    for layer in (ours, theirs):
        buffers = dict(layer.named_buffers())
        with fwAD.dual_level():
            duals = {"weight": fwAD.make_dual(layer.weight.detach(), tw), "bias": fwAD.make_dual(layer.bias.detach(), tb)}
            y = functional_call(layer, {**duals, **buffers}, (fwAD.make_dual(x, tx),))
            primal, tangent = fwAD.unpack_dual(y)
            assert tangent is not None
            results.append((primal.clone(), tangent.clone()))
    k = kappa_of(x)
    close(results[0][0], results[1][0], kappa=k, what="primal")
    close(results[0][1], results[1][1], kappa=k, what="tangent")
    assert_same_state(ours, theirs, "running statistics after a dual step")

    # the tangent is the directional derivative: central differences of the functional form
    def f(s):
        return bnt.batch_norm(x + s * tx, None if training else rm, None if training else rv, w + s * tw, b + s * tb,
                              training=training, implementation="autograd")

    h = 1e-6
    fd = (f(h) - f(-h)) / (2 * h)
    np.testing.assert_allclose(results[0][1].numpy(), fd.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_ad_in_running_statistics_matches_autograd(impl):
    """Eval tangents through running_mean/running_var (torch.nn drops them; bn-ref's equal plain autograd)."""
    x = make_x((5, C, 2), seed=8)
    rm, rv = make_x((C,), seed=9, offset=0.0), torch.rand(C, dtype=torch.float64) + 0.5
    w, b = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    tangents = [_tangent(t.shape, 20 + i) for i, t in enumerate((x, rm, rv, w, b))]

    def f(impl_):
        return lambda x, rm, rv, w, b: bnt.batch_norm(x, rm, rv, w, b, training=False, implementation=impl_)

    _, t_ours = jvp(f(impl), (x, rm, rv, w, b), tuple(tangents))
    _, t_ref = jvp(f("autograd"), (x, rm, rv, w, b), tuple(tangents))
    close(t_ours, t_ref, what="eval tangent")
    # one tangent at a time (per-channel tangents alone must still give an x-shaped tangent)
    primals = (x, rm, rv, w, b)
    for i, name in enumerate(("x", "running_mean", "running_var", "weight", "bias")):
        def g(t, impl_, i=i):
            return f(impl_)(*primals[:i], t, *primals[i + 1:])

        _, t_one = jvp(lambda t: g(t, impl), (primals[i],), (tangents[i],))
        _, t_one_ref = jvp(lambda t: g(t, "autograd"), (primals[i],), (tangents[i],))
        assert t_one.shape == x.shape
        close(t_one, t_one_ref, what=f"eval tangent in {name} alone")
        if name in ("x", "weight", "bias"):  # torch.nn's eval tangent ignores the running statistics
            def native(t, i=i):
                return F.batch_norm(*primals[:i], t, *primals[i + 1:], training=False)

            _, t_nn = jvp(native, (primals[i],), (tangents[i],))
            close(t_one, t_nn, what=f"eval tangent in {name} vs F.batch_norm")
    # and against reverse mode: <J t, v> = <t, J^T v>
    v = _tangent(x.shape, 30)
    inputs = [t.clone().requires_grad_() for t in (x, rm, rv, w, b)]
    y = f(impl)(*inputs)
    grads = torch.autograd.grad(y, inputs, v)
    np.testing.assert_allclose(float((t_ours * v).sum()), float(sum((g * t).sum() for g, t in zip(grads, tangents))),
                               rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_jvp_matches_torch_nn(training, impl):
    shape = PAIRS["2d"][2]
    x, tx = make_x(shape, seed=11), _tangent(shape, 12)
    # training with running statistics: torch.nn's module refuses (it increments
    # num_batches_tracked in place inside the transform), and so does bn-ref's.
    ours, theirs = twins(bnt.BatchNorm2d, nn.BatchNorm2d, C, impl=impl, dtype=torch.float64)
    ours.train(training)
    theirs.train(training)
    if training:
        for layer in (theirs, ours):
            with pytest.raises(RuntimeError, match="in-place operation"):
                jvp(layer, (x,), (tx,))
        ours, theirs = twins(bnt.BatchNorm2d, nn.BatchNorm2d, C, impl=impl, dtype=torch.float64, track_running_stats=False)
    y_o, t_o = jvp(ours, (x,), (tx,))
    y_t, t_t = jvp(theirs, (x,), (tx,))
    k = kappa_of(x)
    close(y_o, y_t, kappa=k, what="primal")
    close(t_o, t_t, kappa=k, what="tangent")
    if training:  # the functional form without running statistics, as F.batch_norm
        _, t_f = jvp(lambda x: bnt.batch_norm(x, None, None, ours.weight.detach(), ours.bias.detach(), training=True,
                                              implementation=impl), (x,), (tx,))
        close(t_f, t_t, kappa=k, what="functional tangent")


FUNC_TRANSFORMS = {
    "grad": torch.func.grad,
    "jacrev": torch.func.jacrev,
    "jacfwd": torch.func.jacfwd,
    "hessian": torch.func.hessian,  # forward over reverse: jvp through the closed-form backward
    "jacrev(jacrev)": lambda f: torch.func.jacrev(torch.func.jacrev(f)),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("transform", list(FUNC_TRANSFORMS))
def test_func_derivatives_match_f_batch_norm(transform, training, impl):
    x = make_x((4, C, 2), seed=14)
    w = torch.rand(C, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    rm, rv = (None, None) if training else (make_x((C,), seed=15, offset=0.0), torch.rand(C, dtype=torch.float64) + 0.5)

    def ours(x):
        return (bnt.batch_norm(x, rm, rv, w, None, training=training, implementation=impl) ** 3).sum()

    def theirs(x):
        return (F.batch_norm(x, rm, rv, w, None, training=training) ** 3).sum()

    tr = FUNC_TRANSFORMS[transform]
    torch.testing.assert_close(tr(ours)(x), tr(theirs)(x), rtol=1e-9, atol=1e-11)


# -- 2b. functional_call and vmap ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_call_matches_torch_nn(training, impl):
    shape = PAIRS["2d"][2]
    ours, theirs = twins(bnt.BatchNorm2d, nn.BatchNorm2d, C, impl=impl, dtype=torch.float64)
    ours.train(training)
    theirs.train(training)
    x = make_x(shape, seed=13)
    outs, states = [], []
    for layer in (ours, theirs):
        state = {k: v.detach().clone() * 1.5 if v.is_floating_point() else v.clone()
                 for k, v in list(layer.named_parameters()) + list(layer.named_buffers())}
        outs.append(functional_call(layer, state, (x,)))
        states.append(state)
    close(outs[0], outs[1], kappa=kappa_of(x), what="y")
    for key in states[1]:  # the passed buffers are updated in place, as torch.nn does
        close(states[0][key], states[1][key], what=key)
    assert int(states[0]["num_batches_tracked"]) == int(training)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_matches_torch_nn_and_refuses_where_it_does(impl):
    shape = PAIRS["2d"][2]
    xs = torch.stack([make_x(shape, seed=40 + i) for i in range(4)])
    # eval: per-sample normalization with the shared running statistics
    ours, theirs = twins(bnt.BatchNorm2d, nn.BatchNorm2d, C, impl=impl, dtype=torch.float64)
    ours.eval()
    theirs.eval()
    close(vmap(ours)(xs), vmap(theirs)(xs), what="vmap eval")
    # training without running statistics: each mapped batch has its own statistics
    ours, theirs = twins(bnt.BatchNorm2d, nn.BatchNorm2d, C, impl=impl, dtype=torch.float64, track_running_stats=False)
    close(vmap(ours)(xs), vmap(theirs)(xs), kappa=max(kappa_of(x) for x in xs), what="vmap train, no running stats")
    # training with running statistics updated in place: both refuse
    ours, theirs = twins(bnt.BatchNorm2d, nn.BatchNorm2d, C, impl=impl, dtype=torch.float64)
    for layer in (theirs, ours):
        with pytest.raises(RuntimeError):
            vmap(layer)(xs)


# -- 2c. torch.compile, torch.export, ONNX ------------------------------------------------------------------------


def _conv_bn(bn2d, bn1d, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, C, 3), bn2d(C), nn.ReLU(), nn.Flatten(), nn.Linear(C * 16, 5), bn1d(5))


def _model_pair(impl, seed=0, dtype=torch.float64):
    theirs = _conv_bn(nn.BatchNorm2d, nn.BatchNorm1d, seed).to(dtype)
    ours = _conv_bn(lambda c: bnt.BatchNorm2d(c, implementation=impl), lambda c: bnt.BatchNorm1d(c, implementation=impl), seed)
    ours = ours.to(dtype)
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_equals_eager(training, impl):
    """``fullgraph=True`` fails on any graph break; aot_eager checks capture and AOT autograd quickly."""
    torch._dynamo.reset()
    eager, _ = _model_pair(impl)
    compiled_src, _ = _model_pair(impl)
    eager.train(training)
    compiled_src.train(training)
    compiled = torch.compile(compiled_src, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = make_x((4, 2, 6, 6), seed=60 + step)
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, rtol=1e-12, atol=1e-12)
        if training:
            y_e.square().sum().backward()
            y_c.square().sum().backward()
    for (name, t_e), t_c in zip(eager.state_dict().items(), compiled_src.state_dict().values()):
        torch.testing.assert_close(t_c, t_e, rtol=1e-12, atol=1e-12, msg=name)
    if training:
        assert int(compiled_src[1].num_batches_tracked) == 2
        for (name, p_e), p_c in zip(eager.named_parameters(), compiled_src.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_compile_inductor_eval_equals_eager():
    """The default backend (inductor, C++ codegen) on the eval model, float32 against eager."""
    torch._dynamo.reset()
    ours, _ = _model_pair("function", dtype=torch.float32)
    ours.eval()
    compiled = torch.compile(ours, fullgraph=True)
    x = make_x((4, 2, 6, 6), seed=70, dtype=torch.float32)
    torch.testing.assert_close(compiled(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_export_matches_eager_and_torch_nn(training, impl):
    ours, theirs = _model_pair(impl)
    ours.train(training)
    theirs.train(training)
    x = make_x((4, 2, 6, 6), seed=80)
    ep = torch.export.export(ours, (x,))
    exported = ep.module()
    y_x = exported(x)
    y_t = theirs(x)
    close(y_x, y_t, kappa=1e3, what="exported vs torch.nn")
    # the running update is part of the exported program (train) or absent (eval), as torch.nn's
    sd = exported.state_dict()
    for key, value in theirs.state_dict().items():
        if "running" in key:
            close(sd[key], value, kappa=1e3, what=key)
        elif "num_batches" in key:
            assert torch.equal(sd[key], value), key
    assert int(sd["1.num_batches_tracked"]) == int(training)


@pytest.mark.parametrize("impl", IMPLS)
def test_onnx_export_runs_in_onnxruntime(impl, tmp_path):
    """Eval model through the TorchScript-based exporter (``dynamo=False``), with a dynamic batch axis.

    torch 2.13's default ``dynamo=True`` exporter needs the ``onnxscript`` package, for torch.nn's
    layers as for bn-ref's.
    """
    ort = pytest.importorskip("onnxruntime")
    ours, theirs = _model_pair(impl, dtype=torch.float32)
    ours.eval()
    theirs.eval()
    path = str(tmp_path / "model.onnx")
    x = make_x((4, 2, 6, 6), seed=90, dtype=torch.float32)
    torch.onnx.export(ours, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch, seed in ((4, 91), (7, 92)):
        xb = make_x((batch, 2, 6, 6), seed=seed, dtype=torch.float32)
        (y,) = session.run(None, {"x": xb.numpy()})
        with torch.no_grad():
            expected = theirs(xb).double().numpy()
            mine = ours(xb).double().numpy()
        np.testing.assert_allclose(y, mine, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
