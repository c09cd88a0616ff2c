"""bn_ref.apps.lenet_torch: the d2l LeNet-BN with bn-ref's layer, torch.nn's, or none.

bn="ref" and bn="native" loaded with the same weights give the same outputs, gradients and
running statistics in float64 (training steps, then eval), under every convention torch.nn BN
can express; the shapes and the init follow the book.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bn_ref.torch as bnt
from bn_ref import PRESETS, resolve, tolerances
from bn_ref.apps.lenet_torch import lenet, native_batch_norm_kwargs

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")]),
]
BN_INDICES = (1, 5, 10, 13)
EXPRESSIBLE = [name for name, conv in PRESETS.items() if conv.running_var == "unbiased"]
NOT_EXPRESSIBLE = [name for name, conv in PRESETS.items() if conv.running_var == "biased"]
assert EXPRESSIBLE == ["pytorch", "tf_fused"] and len(NOT_EXPRESSIBLE) == 4


def close(actual, expected, what):
    tolerances.assert_close(
        actual.detach().double().cpu().numpy(), expected.detach().double().cpu().numpy(), "float64", what=what
    )


@pytest.mark.parametrize("bn", ["ref", "native", "none"])
def test_shapes_and_layers(bn):
    torch.manual_seed(0)
    net = lenet(bn)
    x = torch.randn(5, 1, 28, 28)
    shapes = []
    h = x
    for layer in net:
        h = layer(h)
        shapes.append(tuple(h.shape))
    assert shapes[-1] == (5, 10)
    bns = [m for m in net if isinstance(m, (bnt.BatchNorm, nn.modules.batchnorm._BatchNorm))]
    if bn == "none":
        assert len(net) == 12 and bns == []
        return
    assert len(net) == 16
    assert [i for i, m in enumerate(net) if m in bns] == list(BN_INDICES)
    assert [m.num_features for m in bns] == [6, 16, 120, 84]
    assert shapes[1] == (5, 6, 24, 24) and shapes[5] == (5, 16, 8, 8) and shapes[8] == (5, 256)
    want = (bnt.BatchNorm2d, bnt.BatchNorm2d, bnt.BatchNorm1d, bnt.BatchNorm1d) if bn == "ref" else (
        nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm1d)
    assert [type(m) for m in bns] == list(want)


def test_state_dict_keys_agree():
    ref, native = lenet("ref"), lenet("native")
    assert list(ref.state_dict()) == list(native.state_dict())
    native.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(native.state_dict(), strict=True)


def test_xavier_init_as_train_ch6():
    torch.manual_seed(1)
    net = lenet("ref")
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w_max = float(m.weight.detach().abs().max())
            assert w_max <= bound and w_max > 0.9 * bound, (m, w_max, bound)
    # PyTorch's default Linear init bound is 1/sqrt(fan_in) = 1/16 for Linear(256, 120): xavier's is larger.
    assert float(net[9].weight.detach().abs().max()) > 1 / 16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", ["convention", None])
@pytest.mark.parametrize("convention", EXPRESSIBLE)
def test_ref_and_native_agree_in_float64(convention, momentum, device):
    conv = PRESETS[convention] if momentum == "convention" else resolve(convention, momentum=None)
    torch.manual_seed(2)
    native = lenet("native", conv, dtype=torch.float64, device=device)
    ref = lenet("ref", conv, dtype=torch.float64, device=device)
    ref.load_state_dict(native.state_dict(), strict=True)
    for i in BN_INDICES:
        assert ref[i].feature_axis == 1 and ref[i].eps == native[i].eps == conv.eps
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        training = step < 3
        ref.train(training)
        native.train(training)
        x = torch.rand(6, 1, 28, 28, generator=gen, dtype=torch.float64).to(device)
        y_r, y_n = ref(x), native(x)
        close(y_r, y_n, f"logits step {step}")
        dy = torch.randn(6, 10, generator=gen, dtype=torch.float64).to(device)
        ref.zero_grad()
        native.zero_grad()
        y_r.backward(dy)
        y_n.backward(dy)
        for (name, p_r), (_, p_n) in zip(ref.named_parameters(), native.named_parameters()):
            close(p_r.grad, p_n.grad, f"grad {name} step {step}")
        for (name, b_r), (_, b_n) in zip(ref.named_buffers(), native.named_buffers()):
            if b_r.dtype == torch.int64:
                assert torch.equal(b_r, b_n), name
            else:
                close(b_r, b_n, f"{name} step {step}")
        with torch.no_grad():  # one SGD step, identically on both
            for p_r, p_n in zip(ref.parameters(), native.parameters()):
                p_r -= 0.1 * p_r.grad
                p_n -= 0.1 * p_n.grad


def test_native_mapping():
    assert native_batch_norm_kwargs("pytorch") == {"eps": 1e-5, "momentum": 0.1}
    kw = native_batch_norm_kwargs("tf_fused")
    assert kw["eps"] == 1e-3 and kw["momentum"] == pytest.approx(0.01)
    assert native_batch_norm_kwargs(resolve("pytorch", momentum=None)) == {"eps": 1e-5, "momentum": None}
    net = lenet("native", "tf_fused")
    assert net[1].momentum == pytest.approx(0.01) and net[1].eps == 1e-3


@pytest.mark.parametrize("convention", NOT_EXPRESSIBLE)
def test_native_rejects_biased_running_variance(convention):
    with pytest.raises(ValueError, match="biased running variance"):
        lenet("native", convention)
    net = lenet("ref", convention)  # bn-ref's layer expresses every convention, NCHW forced
    assert all(net[i].convention.running_var == "biased" and net[i].feature_axis == 1 for i in BN_INDICES)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_bad_bn_and_dtype_device():
    with pytest.raises(ValueError, match="bn must be one of"):
        lenet("batchnorm")
    net = lenet("ref", dtype=torch.float64, device="cpu")
    assert all(t.dtype == torch.float64 for t in net.parameters())
    assert all(b.dtype in (torch.float64, torch.int64) for b in net.buffers())
