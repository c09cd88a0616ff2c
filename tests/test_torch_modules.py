"""bn_ref.torch.BatchNorm* modules against torch.nn.BatchNorm1d/2d/3d and the NumPy oracle.

Same outputs, gradients, buffers and num_batches_tracked as torch.nn (preset "pytorch", with
momentum=None, affine=False, track_running_stats=False), state_dict round trips both ways,
train/eval from ``module.training`` only, memory layouts, dtypes, and validation that leaves the
state untouched. CUDA parametrizations run when a GPU is present and skip otherwise.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import bn_ref.torch as bnt
from bn_ref import PRESETS, oracle, resolve, tolerances

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")]),
]
IMPLS = ["function", "autograd"]
C = 3
PAIRS = {  # rank -> (ours, torch's, input shape)
    2: (bnt.BatchNorm1d, nn.BatchNorm1d, (6, C)),
    3: (bnt.BatchNorm1d, nn.BatchNorm1d, (4, C, 5)),
    4: (bnt.BatchNorm2d, nn.BatchNorm2d, (3, C, 4, 3)),
    5: (bnt.BatchNorm3d, nn.BatchNorm3d, (2, C, 3, 2, 2)),
}
OPTIONS = {
    "default": {},
    "momentum_none": {"momentum": None},
    "momentum_0.3": {"momentum": 0.3},
    "no_affine": {"affine": False},
    "no_track": {"track_running_stats": False},
}


def close(actual, expected, dtype, *, kappa=1.0, what="value"):
    a = actual.detach().to(torch.float64).cpu().numpy() if isinstance(actual, torch.Tensor) else actual
    e = expected.detach().to(torch.float64).cpu().numpy() if isinstance(expected, torch.Tensor) else expected
    tolerances.assert_close(a, e, dtype, kappa=kappa, what=what)


def make_x(shape, *, seed, dtype=torch.float64, device="cpu", offset=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.7 + offset
    return x.to(device=device, dtype=dtype)


def randomize_(module, seed):
    """Non-trivial weight, bias and running statistics (same values for twin modules)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(module.num_features, generator=gen))
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen))
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)


def assert_same_state(ours, theirs, dtype, what):
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert list(sd_o) == list(sd_t), what
    for key in sd_o:
        assert sd_o[key].dtype == sd_t[key].dtype and sd_o[key].shape == sd_t[key].shape, f"{what}: {key}"
        if sd_o[key].dtype == torch.int64:
            assert torch.equal(sd_o[key], sd_t[key]), f"{what}: {key}"
        else:
            close(sd_o[key], sd_t[key], dtype, what=f"{what}: {key}")


# -- against torch.nn.BatchNorm1d/2d/3d --------------------------------------------------------------

NATIVE_CASES = [
    (rank, option, impl, dtype)
    for rank in PAIRS
    for option in OPTIONS
    for impl in IMPLS
    for dtype in ("float64", "float32")
]
assert len(NATIVE_CASES) == 4 * 5 * 2 * 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rank", "option", "impl", "dtype"), NATIVE_CASES)
def test_matches_torch_nn(rank, option, impl, dtype, device):
    ours_cls, torch_cls, shape = PAIRS[rank]
    tdt = getattr(torch, dtype)
    kwargs = OPTIONS[option]
    ours = ours_cls(C, implementation=impl, device=device, dtype=tdt, **kwargs)
    theirs = torch_cls(C, device=device, dtype=tdt, **kwargs)
    randomize_(theirs, seed=rank)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_same_state(ours, theirs, dtype, "after load")
    for step in range(4):
        training = step < 3
        ours.train(training)
        theirs.train(training)
        x = make_x(shape, seed=10 * rank + step, dtype=tdt, device=device)
        x_o, x_t = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_o, y_t = ours(x_o), theirs(x_t)
        dy = make_x(shape, seed=100 + step, dtype=tdt, device=device, offset=0.0)
        y_o.backward(dy)
        y_t.backward(dy)
        kappa = oracle.condition_number(x.double().cpu().numpy(), convention="pytorch")
        tag = f"step {step} ({'train' if training else 'eval'})"
        assert y_o.dtype == y_t.dtype and y_o.shape == y_t.shape
        close(y_o, y_t, dtype, kappa=kappa, what=f"y {tag}")
        close(x_o.grad, x_t.grad, dtype, kappa=kappa, what=f"dx {tag}")
        for name in ("weight", "bias"):
            p_o, p_t = getattr(ours, name), getattr(theirs, name)
            assert (p_o is None) == (p_t is None)
            if p_o is not None:
                close(p_o.grad, p_t.grad, dtype, kappa=kappa, what=f"d{name} {tag}")
                p_o.grad = p_t.grad = None
        assert_same_state(ours, theirs, dtype, tag)
    # state_dict round trip both ways, strict, then the same eval outputs.
    fresh_t = torch_cls(C, device=device, dtype=tdt, **kwargs)
    fresh_t.load_state_dict(ours.state_dict(), strict=True)
    fresh_o = ours_cls(C, implementation=impl, device=device, dtype=tdt, **kwargs)
    fresh_o.load_state_dict(theirs.state_dict(), strict=True)
    assert_same_state(fresh_o, fresh_t, dtype, "round trip")
    x = make_x(shape, seed=999, dtype=tdt, device=device)
    fresh_o.eval()
    fresh_t.eval()
    close(fresh_o(x), fresh_t(x), dtype, kappa=oracle.condition_number(x.double().cpu().numpy(), convention="pytorch"),
          what="eval after round trip")


def test_parameter_and_buffer_layout_matches_torch():
    for ours_cls, torch_cls, _ in PAIRS.values():
        for kwargs in OPTIONS.values():
            ours, theirs = ours_cls(C, **kwargs), torch_cls(C, **kwargs)
            assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
            assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                a, b = getattr(ours, name), getattr(theirs, name)
                assert (a is None) == (b is None), name
                if a is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
            assert ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"] == 2


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_without_num_batches_tracked(direction):
    """An old state_dict (no counter, no version metadata) loads strictly, as torch.nn does."""
    src = nn.BatchNorm2d(C) if direction == "torch_to_ours" else bnt.BatchNorm2d(C)
    randomize_(src, seed=1)
    old = OrderedDict((k, v) for k, v in src.state_dict().items() if k != "num_batches_tracked")
    dst = bnt.BatchNorm2d(C) if direction == "torch_to_ours" else nn.BatchNorm2d(C)
    dst.num_batches_tracked.fill_(7)
    dst.load_state_dict(old, strict=True)
    assert int(dst.num_batches_tracked) == 7  # the module's own counter is kept
    torch.testing.assert_close(dst.running_var, src.running_var)
    # With version-2 metadata the counter is required, for both layers alike.
    new = OrderedDict(old)
    new._metadata = OrderedDict({"": {"version": 2}})
    for layer in (bnt.BatchNorm2d(C), nn.BatchNorm2d(C)):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            layer.load_state_dict(new, strict=True)


# -- every convention through the module shell ----------------------------------------------------------

MODULE_ORACLE_CASES = [(preset, impl, mom) for preset in PRESETS for impl in IMPLS for mom in ("convention", "none")]
assert len(MODULE_ORACLE_CASES) == 24


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("preset", "impl", "mom"), MODULE_ORACLE_CASES)
def test_module_sequence_matches_oracle(preset, impl, mom, device):
    extra = {} if mom == "convention" else {"momentum": None}
    layer = bnt.BatchNorm(C, convention=preset, implementation=impl, dtype=torch.float64, device=device, **extra)
    conv = resolve(preset, **extra)
    assert layer.convention == conv
    randomize_(layer, seed=4)
    gamma, beta = layer.weight.detach().cpu().numpy().copy(), layer.bias.detach().cpu().numpy().copy()
    rm, rv = layer.running_mean.cpu().numpy().copy(), layer.running_var.cpu().numpy().copy()
    shape = (3, 2, 2, C) if conv.feature_axis == -1 else (3, C, 2, 2)
    for step in range(6):
        training = step < 5
        layer.train(training)
        x = make_x(shape, seed=step, device=device)
        y = layer(x)
        x_np = x.cpu().numpy()
        ref = oracle.forward(x_np, gamma, beta, rm, rv, training=training, convention=conv, count=step)
        kappa = oracle.condition_number(x_np, convention=conv)
        close(y, ref.y, "float64", kappa=kappa, what=f"y step {step}")
        close(layer.running_mean, ref.running_mean, "float64", kappa=kappa, what=f"running_mean step {step}")
        close(layer.running_var, ref.running_var, "float64", kappa=kappa, what=f"running_var step {step}")
        assert int(layer.num_batches_tracked) == ref.count
        rm, rv = ref.running_mean, ref.running_var


# -- train/eval strictly from module.training ------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_mode_comes_from_module_training_not_grad_mode(impl):
    layer = bnt.BatchNorm2d(C, dtype=torch.float64, implementation=impl)
    randomize_(layer, seed=2)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    x = make_x((4, C, 3, 3), seed=3)
    layer.eval()
    with torch.enable_grad():
        x_g = x.clone().requires_grad_()
        y = layer(x_g)
    ref = oracle.forward(x.numpy(), w, b, rm.numpy(), rv.numpy(), training=False, convention="pytorch")
    close(y, ref.y, "float64", what="eval with grad enabled")
    assert torch.equal(layer.running_mean, rm) and torch.equal(layer.running_var, rv)
    assert int(layer.num_batches_tracked) == 0
    y.sum().backward()  # the eval graph is differentiable
    close(x_g.grad, np.broadcast_to((w / np.sqrt(rv.numpy() + 1e-5)).reshape(1, C, 1, 1), x.shape), "float64", what="eval dx")

    layer.train()
    with torch.no_grad():
        y = layer(x)
    ref = oracle.forward(x.numpy(), w, b, rm.numpy(), rv.numpy(), training=True, convention="pytorch")
    close(y, ref.y, "float64", what="train under no_grad")
    close(layer.running_mean, ref.running_mean, "float64", what="running_mean after train under no_grad")
    assert int(layer.num_batches_tracked) == 1


# -- layouts, devices and dtypes ----------------------------------------------------------------------------

LAYOUT_CASES = [(layout, impl) for layout in ("channels_last", "channels_last_3d", "transposed", "sliced") for impl in IMPLS]
assert len(LAYOUT_CASES) == 8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("layout", "impl"), LAYOUT_CASES)
def test_memory_layouts_match_contiguous_and_torch(layout, impl, device):
    if layout == "channels_last":
        leaf = make_x((3, C, 4, 5), seed=1, device=device).requires_grad_()
        x = leaf.to(memory_format=torch.channels_last)
        ours_cls, torch_cls = bnt.BatchNorm2d, nn.BatchNorm2d
    elif layout == "channels_last_3d":
        leaf = make_x((2, C, 3, 2, 4), seed=1, device=device).requires_grad_()
        x = leaf.to(memory_format=torch.channels_last_3d)
        ours_cls, torch_cls = bnt.BatchNorm3d, nn.BatchNorm3d
    elif layout == "transposed":
        leaf = make_x((3, 4, 5, C), seed=1, device=device).requires_grad_()
        x = leaf.permute(0, 3, 1, 2)
        ours_cls, torch_cls = bnt.BatchNorm2d, nn.BatchNorm2d
    else:
        leaf = make_x((3, 2 * C, 8), seed=1, device=device).requires_grad_()
        x = leaf[:, ::2, 1::2]
        ours_cls, torch_cls = bnt.BatchNorm1d, nn.BatchNorm1d
    assert not x.is_contiguous()
    ours = ours_cls(C, dtype=torch.float64, device=device, implementation=impl)
    theirs = torch_cls(C, dtype=torch.float64, device=device)
    randomize_(theirs, seed=5)
    ours.load_state_dict(theirs.state_dict())
    twin = copy.deepcopy(ours)
    dy = make_x(tuple(x.shape), seed=2, device=device, offset=0.0)
    y = ours(x)
    if layout.startswith("channels_last"):  # the output keeps the input's memory format, as torch.nn's
        fmt = torch.channels_last if layout == "channels_last" else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)
    (dx,) = torch.autograd.grad(y, x, dy)
    outs, grads = [y], [dx]
    for module in (twin, theirs):
        dense = x.detach().contiguous().requires_grad_()
        y_d = module(dense)
        y_d.backward(dy)
        outs.append(y_d)
        grads.append(dense.grad)
    kappa = oracle.condition_number(x.detach().cpu().numpy(), convention="pytorch")
    for i, name in ((1, "contiguous"), (2, "torch.nn")):
        close(outs[0], outs[i], "float64", kappa=kappa, what=f"y vs {name}")
        close(grads[0], grads[i], "float64", kappa=kappa, what=f"dx vs {name}")
    close(ours.running_var, theirs.running_var, "float64", what="running_var vs torch.nn")
    close(ours.running_mean, twin.running_mean, "float64", what="running_mean vs contiguous")


MIXED_CASES = [(dtype, impl) for dtype in ("float16", "bfloat16") for impl in IMPLS]
assert len(MIXED_CASES) == 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "impl"), MIXED_CASES)
def test_mixed_precision_module(dtype, impl, device):
    """float32 parameters and buffers with a half/bfloat16 input: output in the input dtype,
    statistics in float32, values within the dtype's tolerance of the oracle and of torch.nn."""
    tdt = getattr(torch, dtype)
    ours = bnt.BatchNorm2d(C, device=device, implementation=impl)
    theirs = nn.BatchNorm2d(C, device=device)
    randomize_(theirs, seed=8)
    ours.load_state_dict(theirs.state_dict())
    w, b = theirs.weight.detach().double().cpu().numpy(), theirs.bias.detach().double().cpu().numpy()
    rm, rv = theirs.running_mean.double().cpu().numpy(), theirs.running_var.double().cpu().numpy()
    x = make_x((4, C, 3, 3), seed=6, dtype=tdt, device=device).requires_grad_()
    y = ours(x)
    y.float().sum().backward()
    assert y.dtype == tdt and x.grad.dtype == tdt
    assert ours.running_mean.dtype == torch.float32 and ours.weight.grad.dtype == torch.float32
    x_r = x.detach().double().cpu().numpy()
    ref = oracle.forward(x_r, w, b, rm, rv, training=True, convention="pytorch")
    dx, dgamma, dbeta = oracle.backward(np.ones_like(x_r), x_r, w, training=True, convention="pytorch")
    kappa = oracle.condition_number(x_r, convention="pytorch")
    close(y, ref.y, dtype, kappa=kappa, what="y")
    close(x.grad, dx, dtype, kappa=kappa, what="dx")
    close(ours.weight.grad, dgamma, dtype, kappa=kappa, what="dgamma")
    close(ours.bias.grad, dbeta, dtype, what="dbeta")
    close(ours.running_var, ref.running_var, dtype, kappa=kappa, what="running_var")
    y_t = theirs(x.detach())
    close(y, y_t, dtype, kappa=kappa, what="y vs torch.nn")
    close(ours.running_mean, theirs.running_mean, dtype, kappa=kappa, what="running_mean vs torch.nn")


def test_float64_stays_float64_and_to_moves_buffers():
    layer = bnt.BatchNorm1d(C)
    layer.to(torch.float64)
    assert layer.weight.dtype == layer.running_var.dtype == torch.float64
    assert layer.num_batches_tracked.dtype == torch.int64
    y = layer(make_x((5, C), seed=0))
    assert y.dtype == torch.float64


# -- attributes and overrides ----------------------------------------------------------------------------


def test_attributes_and_overrides():
    layer = bnt.BatchNorm(5, convention="flax", eps=1e-3, momentum=None, feature_axis=1, implementation="autograd")
    assert layer.convention == resolve("flax", eps=1e-3, momentum=None, feature_axis=1)
    assert (layer.num_features, layer.eps, layer.momentum, layer.feature_axis) == (5, 1e-3, None, 1)
    assert layer.affine and layer.track_running_stats and layer.implementation == "autograd"
    layer.momentum = 0.9
    assert layer.convention.momentum == 0.9 and layer.convention.momentum_on == "running"
    layer.eps = 1e-4
    assert layer.convention.eps == 1e-4
    default = bnt.BatchNorm(2)
    assert default.convention == PRESETS["pytorch"] and default.momentum == 0.1 and default.eps == 1e-5
    plain = bnt.BatchNorm(2, affine=False, track_running_stats=False)
    assert plain.weight is None and plain.bias is None
    assert plain.running_mean is None and plain.running_var is None and plain.num_batches_tracked is None
    assert "convention='flax'" in repr(layer)


def test_reset_parameters_and_running_stats():
    layer = bnt.BatchNorm2d(C)
    randomize_(layer, seed=0)
    layer.num_batches_tracked.fill_(3)
    layer.reset_running_stats()
    assert torch.equal(layer.running_mean, torch.zeros(C)) and torch.equal(layer.running_var, torch.ones(C))
    assert int(layer.num_batches_tracked) == 0 and not torch.equal(layer.weight.detach(), torch.ones(C))
    layer.reset_parameters()
    assert torch.equal(layer.weight.detach(), torch.ones(C)) and torch.equal(layer.bias.detach(), torch.zeros(C))


def test_generic_module_any_rank():
    for rank in (2, 3, 4, 5, 6):
        shape = (3, C) + (2,) * (rank - 2)
        x = make_x(shape, seed=rank)
        y = bnt.BatchNorm(C, dtype=torch.float64)(x)
        ref = oracle.forward(x.numpy(), np.ones(C), np.zeros(C), np.zeros(C), np.ones(C), training=True,
                             convention="pytorch")
        close(y, ref.y, "float64", what=f"rank {rank}")


# -- validation, before any state changes ------------------------------------------------------------------

BAD_MODULE_CALLS = [
    ("BatchNorm1d rank 4", bnt.BatchNorm1d, (4, C, 2, 2), torch.float32, ValueError, r"expected 2D or 3D input \(got 4D"),
    ("BatchNorm2d rank 3", bnt.BatchNorm2d, (4, C, 2), torch.float32, ValueError, r"expected 4D input \(got 3D"),
    ("BatchNorm3d rank 4", bnt.BatchNorm3d, (4, C, 2, 2), torch.float32, ValueError, r"expected 5D input \(got 4D"),
    ("BatchNorm rank 1", bnt.BatchNorm, (4,), torch.float32, ValueError, "rank >= 2"),
    ("channels", bnt.BatchNorm2d, (4, C + 1, 2, 2), torch.float32, ValueError, f"expected {C} features.*got {C + 1}"),
    ("integer input", bnt.BatchNorm2d, (4, C, 2, 2), torch.int32, TypeError, "floating dtype.*int32"),
    ("n = 1", bnt.BatchNorm1d, (1, C), torch.float32, ValueError, "more than 1 value per channel"),
    ("n = 1 rank 4", bnt.BatchNorm2d, (1, C, 1, 1), torch.float32, ValueError, "more than 1 value per channel"),
]
assert len(BAD_MODULE_CALLS) == 8


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("label", "cls", "shape", "dtype", "exc", "match"), BAD_MODULE_CALLS,
                         ids=[b[0] for b in BAD_MODULE_CALLS])
def test_failed_call_leaves_state_untouched(label, cls, shape, dtype, exc, match, impl):
    layer = cls(C, implementation=impl)
    good = (4, C) + (2,) * {bnt.BatchNorm1d: 0, bnt.BatchNorm2d: 2, bnt.BatchNorm3d: 3, bnt.BatchNorm: 2}[cls]
    layer(make_x(good, seed=0, dtype=torch.float32))  # one real step: non-trivial state
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert int(before["num_batches_tracked"]) == 1
    x = torch.ones(shape, dtype=dtype) if not dtype.is_floating_point else make_x(shape, seed=1, dtype=dtype)
    with pytest.raises(exc, match=match):
        layer(x)
    after = layer.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_features"):
        bnt.BatchNorm(0)
    with pytest.raises(ValueError, match="implementation"):
        bnt.BatchNorm2d(3, implementation="cudnn")
    with pytest.raises(ValueError, match="unknown convention"):
        bnt.BatchNorm2d(3, convention="caffe")
    with pytest.raises(ValueError, match="momentum"):
        bnt.BatchNorm2d(3, momentum=2.0)
    with pytest.raises(TypeError, match="floating"):
        bnt.BatchNorm2d(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="affine"):
        bnt.BatchNorm2d(3, affine=1)


def test_track_running_stats_false_uses_batch_statistics_in_eval():
    layer = bnt.BatchNorm2d(C, track_running_stats=False, dtype=torch.float64).eval()
    x = make_x((3, C, 2, 2), seed=4)
    ref = oracle.forward(x.numpy(), np.ones(C), np.zeros(C), None, None, training=True, convention="pytorch")
    close(layer(x), ref.y, "float64", what="eval without running stats")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(make_x((1, C, 1, 1), seed=0))  # as torch.nn: batch statistics need n > 1 even in eval


def test_nan_in_one_channel_stays_there_in_module():
    layer = bnt.BatchNorm2d(C, dtype=torch.float64)
    x = make_x((3, C, 2, 2), seed=12)
    x[1, 2, 0, 1] = float("nan")
    x.requires_grad_()
    y = layer(x)
    y.sum().backward()
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    assert torch.isfinite(x.grad[:, :2]).all()
    assert torch.isnan(layer.running_mean[2]) and torch.isfinite(layer.running_mean[:2]).all()
    assert torch.isfinite(layer.running_var[:2]).all()
