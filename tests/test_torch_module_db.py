"""bn_ref.torch.BatchNorm1d/2d/3d driven by PyTorch's own module test inputs.

``torch.testing._internal.common_modules.module_db`` (shipped in the torch wheel) describes how
PyTorch tests ``nn.BatchNorm1d/2d/3d``: constructor arguments (positional, as torch users write
them: ``BatchNorm1d(10, 1e-3, None)``, ``bias=False``, ...) and forward inputs, for training and
eval, with and without ``requires_grad``. Every one of those samples builds a bn-ref layer exactly
as PyTorch builds its own, loads torch.nn's state, and must match torch.nn in float64 over three
training steps and an eval step (outputs, input and parameter gradients, running statistics,
``num_batches_tracked``).

One sample departs on purpose: ``zero_batch`` in training (N = 0). torch.nn returns an empty
output and counts a step; bn-ref rejects the call before any state changes (docs/spec.md §7.3,
docs/differences.md). The test asserts exactly that, and that both agree in eval.

Importing ``common_modules`` needs the ``expecttest`` package (in the ``dev`` extra).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bn_ref.torch as bnt
from bn_ref import oracle, tolerances

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install expecttest; in the dev extra)")
from torch.testing._internal.common_modules import module_db  # noqa: E402

OURS = {nn.BatchNorm1d: bnt.BatchNorm1d, nn.BatchNorm2d: bnt.BatchNorm2d, nn.BatchNorm3d: bnt.BatchNorm3d}
INFOS = [info for info in module_db if info.module_cls in OURS]
assert sorted(info.module_cls.__name__ for info in INFOS) == ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

DTYPE = torch.float64


def _samples(info, *, training: bool, requires_grad: bool):
    return info.module_inputs_func(info, device="cpu", dtype=DTYPE, requires_grad=requires_grad, training=training)


CASES = [
    pytest.param(info, training, rg, i, id=f"{info.module_cls.__name__}-{'train' if training else 'eval'}-"
                                          f"{'grad' if rg else 'nograd'}-{i}-{sample.desc or 'default'}")
    for info in INFOS
    for training in (True, False)
    for rg in (False, True)
    for i, sample in enumerate(_samples(info, training=training, requires_grad=rg))
]


def test_every_module_db_sample_is_collected():
    expected = sum(len(_samples(info, training=t, requires_grad=rg)) for info in INFOS for t in (True, False)
                   for rg in (False, True))
    assert expected > 0 and len(CASES) == expected
    assert len(CASES) >= 4 * 3 * 6  # torch 2.13: 8 + 7 + 7 samples per (training, requires_grad)


def _close(actual, expected, *, kappa, what):
    tolerances.assert_close(actual.detach().double().numpy(), expected.detach().double().numpy(), "float64",
                            kappa=kappa, what=what)


def _randomize_(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name == "running_var":
                t.copy_(torch.rand(t.shape, generator=gen, dtype=DTYPE) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=DTYPE) * 0.5 + (1.0 if name == "weight" else 0.0))


def _assert_same_state(ours: nn.Module, theirs: nn.Module, what: str) -> None:
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert list(sd_o) == list(sd_t), what
    for key, t in sd_t.items():
        assert sd_o[key].dtype == t.dtype and sd_o[key].shape == t.shape, f"{what}: {key}"
        if t.is_floating_point():
            _close(sd_o[key], t, kappa=1.0, what=f"{what}: {key}")
        else:
            assert torch.equal(sd_o[key], t), f"{what}: {key}"


def _step(ours, theirs, x, *, requires_grad: bool, seed: int, what: str) -> None:
    x_o = x.detach().clone().requires_grad_(requires_grad)
    x_t = x.detach().clone().requires_grad_(requires_grad)
    y_o, y_t = ours(x_o), theirs(x_t)
    assert y_o.shape == y_t.shape and y_o.dtype == y_t.dtype, what
    kappa = oracle.condition_number(x.detach().numpy(), convention="pytorch") if x.numel() else 1.0
    _close(y_o, y_t, kappa=kappa, what=f"y {what}")
    if requires_grad and x.numel():
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
        y_o.backward(dy)
        y_t.backward(dy)
        _close(x_o.grad, x_t.grad, kappa=kappa, what=f"dx {what}")
        for name, p_t in theirs.named_parameters():
            p_o = dict(ours.named_parameters())[name]
            _close(p_o.grad, p_t.grad, kappa=kappa, what=f"d{name} {what}")
            p_o.grad = p_t.grad = None
    _assert_same_state(ours, theirs, what)


@pytest.mark.parametrize(("info", "training", "requires_grad", "index"), CASES)
def test_module_db_sample_matches_torch_nn(info, training, requires_grad, index):
    sample = _samples(info, training=training, requires_grad=requires_grad)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    fwd_args, fwd_kwargs = sample.forward_input.args, sample.forward_input.kwargs
    assert len(fwd_args) == 1 and not fwd_kwargs
    (x,) = fwd_args
    # built as PyTorch's own module tests build it: cls(*args, **kwargs), then .to(device).to(dtype)
    theirs = info.module_cls(*args, **kwargs).to("cpu").to(DTYPE)
    ours = OURS[info.module_cls](*args, **kwargs).to("cpu").to(DTYPE)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    _randomize_(theirs, seed=index)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _assert_same_state(ours, theirs, "after load")

    if training and x.shape[0] == 0:
        # The one planned difference (spec §7.3): an empty batch in training.
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        theirs.train()
        ours.train()
        assert theirs(x).shape == x.shape
        with pytest.raises(ValueError, match="empty batch"):
            ours(x)
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items())
        # torch.nn kept its running statistics but counted the step; undo the count to compare the rest
        sd_t = theirs.state_dict()
        assert int(sd_t["num_batches_tracked"]) == int(before["num_batches_tracked"]) + 1
        assert all(torch.equal(sd_t[k], before[k]) for k in ("running_mean", "running_var"))
        theirs.num_batches_tracked.sub_(1)
        ours.eval()
        theirs.eval()
        _step(ours, theirs, x, requires_grad=requires_grad, seed=1, what="eval, empty batch")
        return

    if training:
        ours.train()
        theirs.train()
        for step in range(3):  # the sample's input, then shifted and scaled copies of it
            xs = x.detach() * (1.0 + 0.5 * step) + 0.3 * step
            _step(ours, theirs, xs, requires_grad=requires_grad, seed=10 + step, what=f"train step {step}")
    ours.eval()
    theirs.eval()
    _step(ours, theirs, x, requires_grad=requires_grad, seed=20, what="eval")
    _step(ours, theirs, x.detach() * 2.0 - 1.0, requires_grad=requires_grad, seed=21, what="eval 2")
