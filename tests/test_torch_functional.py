"""bn_ref.torch.batch_norm and its autograd Functions against the NumPy oracle and finite differences.

Every preset, ranks 2-5, the convention's feature axis and the other one, both implementations:
y, dx, dgamma, dbeta and the running statistics over 5 training steps, then an eval step.
float64 is held to the float64 tolerance; float32/float16/bfloat16 to theirs, against the oracle
evaluated on the inputs rounded to the working dtype (``docs/spec.md`` §8.4).
CUDA parametrizations run when a GPU is present and skip otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bn_ref.torch as bnt
import bn_ref.torch.functional as bnf
from bn_ref import PRESETS, oracle, resolve, tolerances

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")]),
]
IMPLS = ["function", "autograd"]
assert tuple(IMPLS) == bnt.IMPLEMENTATIONS
PRESET_NAMES = list(PRESETS)
assert len(PRESET_NAMES) == 6

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
C = 3
SPATIAL = {2: (), 3: (5,), 4: (3, 2), 5: (2, 2, 2)}
BATCH = {2: 8, 3: 4, 4: 3, 5: 2}


# -- helpers -------------------------------------------------------------------------------------


def make_shape(rank: int, ax: int, c: int = C) -> tuple[int, ...]:
    """(N, spatial...) with C inserted at the (non-negative) feature axis ``ax``."""
    shape = [BATCH[rank], *SPATIAL[rank]]
    shape.insert(ax, c)
    return tuple(shape)


def make_data(rng: np.random.Generator, shape: tuple[int, ...], ax: int):
    """x with per-channel offsets and scales (statistics far from 0/1), and dy."""
    c = shape[ax]
    bshape = tuple(c if i == ax else 1 for i in range(len(shape)))
    offset = rng.uniform(-3, 3, c).reshape(bshape)
    scale = rng.uniform(0.5, 2.0, c).reshape(bshape)
    x = rng.standard_normal(shape) * scale + offset
    dy = rng.standard_normal(shape)
    return x, dy


def make_params(rng: np.random.Generator, c: int = C):
    gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.standard_normal(c)
    rm = rng.standard_normal(c)
    rv = rng.uniform(0.5, 2.0, c)
    return gamma, beta, rm, rv


def tt(a, device, dtype=torch.float64, grad=False):
    t = torch.tensor(np.asarray(a), dtype=torch.float64, device=device).to(dtype)
    return t.requires_grad_(grad)


def close(actual, expected, dtype: str, *, kappa: float = 1.0, what: str):
    a = actual.detach().to(torch.float64).cpu().numpy() if isinstance(actual, torch.Tensor) else actual
    tolerances.assert_close(a, expected, dtype, kappa=kappa, what=what)


def other_axis(feature_axis: int) -> int:
    return 1 if feature_axis == -1 else -1


# -- float64 sequences against the oracle -----------------------------------------------------------

SEQ_CASES = [
    (preset, rank, axis_mode, impl)
    for preset in PRESET_NAMES
    for rank in (2, 3, 4, 5)
    for axis_mode in ("convention", "override")
    for impl in IMPLS
]
assert len(SEQ_CASES) == 96


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("preset", "rank", "axis_mode", "impl"), SEQ_CASES)
def test_float64_sequence_matches_oracle(preset, rank, axis_mode, impl, device):
    conv = PRESETS[preset]
    axis = None if axis_mode == "convention" else other_axis(conv.feature_axis)
    eff = resolve(conv, feature_axis=axis)
    ax = eff.feature_axis % rank
    shape = make_shape(rank, ax)
    rng = np.random.default_rng([rank, len(preset), ax])
    gamma, beta, rm, rv = make_params(rng)
    rm_t, rv_t = tt(rm, device), tt(rv, device)
    for step in range(6):
        training = step < 5
        x, dy = make_data(rng, shape, ax)
        xt, wt, bt = tt(x, device, grad=True), tt(gamma, device, grad=True), tt(beta, device, grad=True)
        y = bnt.batch_norm(
            xt, rm_t, rv_t, wt, bt, training=training, convention=preset, axis=axis, count=step, implementation=impl
        )
        y.backward(tt(dy, device))
        ref = oracle.forward(x, gamma, beta, rm, rv, training=training, convention=eff, count=step)
        dx, dgamma, dbeta = oracle.backward(
            dy, x, gamma, training=training, convention=eff, running_mean=rm, running_var=rv
        )
        kappa = oracle.condition_number(x, convention=eff)
        tag = f"step {step} ({'train' if training else 'eval'})"
        assert y.shape == x.shape and y.dtype == torch.float64
        close(y, ref.y, "float64", kappa=kappa, what=f"y {tag}")
        close(xt.grad, dx, "float64", kappa=kappa, what=f"dx {tag}")
        close(wt.grad, dgamma, "float64", kappa=kappa, what=f"dgamma {tag}")
        close(bt.grad, dbeta, "float64", what=f"dbeta {tag}")
        close(rm_t, ref.running_mean, "float64", kappa=kappa, what=f"running_mean {tag}")
        close(rv_t, ref.running_var, "float64", kappa=kappa, what=f"running_var {tag}")
        rm, rv = ref.running_mean, ref.running_var


CMA_CASES = [(preset, impl, count_kind) for preset in PRESET_NAMES for impl in IMPLS for count_kind in ("int", "tensor")]
assert len(CMA_CASES) == 24


@pytest.mark.parametrize(("preset", "impl", "count_kind"), CMA_CASES)
def test_cumulative_average_and_overrides(preset, impl, count_kind):
    """momentum=None (§3.3) with the count as an int or a 0-d int64 tensor; eps overridden too."""
    eff = resolve(preset, momentum=None, eps=1e-3)
    ax = eff.feature_axis % 4
    shape = make_shape(4, ax)
    rng = np.random.default_rng(7)
    gamma, beta, rm, rv = make_params(rng)
    rm_t, rv_t = tt(rm, "cpu"), tt(rv, "cpu")
    batch_means = []
    for step in range(6):
        x, _ = make_data(rng, shape, ax)
        count = step if count_kind == "int" else torch.tensor(step, dtype=torch.int64)
        y = bnt.batch_norm(
            tt(x, "cpu"), rm_t, rv_t, tt(gamma, "cpu"), tt(beta, "cpu"),
            training=True, convention=preset, momentum=None, eps=1e-3, count=count, implementation=impl,
        )
        ref = oracle.forward(x, gamma, beta, rm, rv, training=True, convention=eff, count=step)
        close(y, ref.y, "float64", kappa=oracle.condition_number(x, convention=eff), what=f"y step {step}")
        close(rm_t, ref.running_mean, "float64", what=f"running_mean step {step}")
        close(rv_t, ref.running_var, "float64", what=f"running_var step {step}")
        rm, rv = ref.running_mean, ref.running_var
        batch_means.append(ref.batch_mean)
    # The cumulative average is the plain mean of the batch means (the initial value is discarded).
    np.testing.assert_allclose(rm_t.numpy(), np.mean(batch_means, axis=0), rtol=1e-12, atol=1e-12)


# -- low precision against the oracle on rounded inputs ------------------------------------------------

LOWP_CASES = [
    (preset, dtype, pdtype, rank, impl)
    for preset in PRESET_NAMES
    for dtype, pdtypes in (("float32", ("float32",)), ("float16", ("float32", "float16")), ("bfloat16", ("float32", "bfloat16")))
    for pdtype in pdtypes
    for rank in (2, 4)
    for impl in IMPLS
]
assert len(LOWP_CASES) == 6 * 5 * 2 * 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("preset", "dtype", "pdtype", "rank", "impl"), LOWP_CASES)
def test_low_precision_matches_oracle(preset, dtype, pdtype, rank, impl, device):
    """x in ``dtype``; weight, bias and running statistics in ``pdtype`` (float32 = mixed precision)."""
    conv = PRESETS[preset]
    tdt, pdt = TORCH_DTYPES[dtype], TORCH_DTYPES[pdtype]
    ax = conv.feature_axis % rank
    shape = make_shape(rank, ax)
    rng = np.random.default_rng([rank, len(preset), len(dtype)])
    gamma, beta, rm, rv = make_params(rng)
    wt, bt = tt(gamma, device, pdt, grad=True), tt(beta, device, pdt, grad=True)
    rm_t, rv_t = tt(rm, device, pdt), tt(rv, device, pdt)
    g_r = wt.detach().double().cpu().numpy()
    b_r = bt.detach().double().cpu().numpy()
    rm_r, rv_r = rm_t.double().cpu().numpy(), rv_t.double().cpu().numpy()
    for step in range(4):
        training = step < 3
        x, dy = make_data(rng, shape, ax)
        xt = tt(x, device, tdt, grad=True)
        dyt = tt(dy, device, tdt)
        x_r, dy_r = xt.detach().double().cpu().numpy(), dyt.double().cpu().numpy()
        wt.grad = bt.grad = None
        y = bnt.batch_norm(xt, rm_t, rv_t, wt, bt, training=training, convention=conv, count=step, implementation=impl)
        y.backward(dyt)
        assert y.dtype == tdt and xt.grad.dtype == tdt and wt.grad.dtype == pdt and bt.grad.dtype == pdt
        assert rm_t.dtype == pdt and rv_t.dtype == pdt
        ref = oracle.forward(x_r, g_r, b_r, rm_r, rv_r, training=training, convention=conv, count=step)
        dx, dgamma, dbeta = oracle.backward(
            dy_r, x_r, g_r, training=training, convention=conv, running_mean=rm_r, running_var=rv_r
        )
        kappa = oracle.condition_number(x_r, convention=conv)
        tag = f"step {step}"
        close(y, ref.y, dtype, kappa=kappa, what=f"y {tag}")
        close(xt.grad, dx, dtype, kappa=kappa, what=f"dx {tag}")
        close(wt.grad, dgamma, dtype, kappa=kappa, what=f"dgamma {tag}")
        close(bt.grad, dbeta, dtype, what=f"dbeta {tag}")
        close(rm_t, ref.running_mean, dtype, kappa=kappa, what=f"running_mean {tag}")
        close(rv_t, ref.running_var, dtype, kappa=kappa, what=f"running_var {tag}")
        # Carry the statistics as stored (rounded to pdtype), as the next call sees them.
        rm_r, rv_r = rm_t.double().cpu().numpy(), rv_t.double().cpu().numpy()


def test_low_precision_statistics_accumulate_in_float32():
    """§8.3: a float16 batch whose sum overflows float16 still has a finite, exact mean."""
    x = torch.full((4096, 2), 100.0, dtype=torch.float16)  # the sum, 409600, exceeds float16's 65504
    x[::2] += 1.0
    mean, var = bnt.batch_statistics(x, 1)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    torch.testing.assert_close(mean, torch.full((2,), 100.5), rtol=0, atol=1e-4)
    torch.testing.assert_close(var, torch.full((2,), 0.25), rtol=0, atol=1e-4)
    for impl in IMPLS:
        y = bnt.batch_norm(x, None, None, None, None, training=True, implementation=impl)
        assert y.dtype == torch.float16 and torch.isfinite(y).all()
        torch.testing.assert_close(y.abs().float(), torch.ones_like(y, dtype=torch.float32), rtol=1e-3, atol=1e-3)


# -- gradcheck and gradgradcheck (float64) ------------------------------------------------------------

GRAD_CASES = [
    (training, affine, impl, layout)
    for training in (True, False)
    for affine in (True, False)
    for impl in IMPLS
    for layout in ("rank2", "rank4_first", "rank3_last")
]
assert len(GRAD_CASES) == 24
LAYOUTS = {"rank2": ((5, 3), 1), "rank4_first": ((3, 2, 2, 2), 1), "rank3_last": ((3, 2, 2), -1)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("training", "affine", "impl", "layout"), GRAD_CASES)
def test_gradcheck_and_gradgradcheck(training, affine, impl, layout, device):
    shape, axis = LAYOUTS[layout]
    c = shape[axis]
    gen = torch.Generator().manual_seed(3)
    opts = {"dtype": torch.float64}
    x = (torch.randn(shape, generator=gen, **opts) * 1.5 + 0.7).to(device).requires_grad_()
    inputs = [x]
    if affine:
        inputs += [
            (torch.rand(c, generator=gen, **opts) + 0.5).to(device).requires_grad_(),
            torch.randn(c, generator=gen, **opts).to(device).requires_grad_(),
        ]
    if not training:  # eval: the running statistics are differentiable inputs too
        inputs += [
            torch.randn(c, generator=gen, **opts).to(device).requires_grad_(),
            (torch.rand(c, generator=gen, **opts) + 0.5).to(device).requires_grad_(),
        ]

    def fn(*args):
        x, rest = args[0], list(args[1:])
        w, b = (rest.pop(0), rest.pop(0)) if affine else (None, None)
        rm, rv = (rest.pop(0), rest.pop(0)) if not training else (None, None)
        return bnt.batch_norm(x, rm, rv, w, b, training=training, axis=axis, implementation=impl)

    assert gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_function_backward_reuses_saved_statistics(monkeypatch):
    """First-order backward uses the saved mean/inv_std; only double backward recomputes (§5.4)."""
    calls = []
    real = bnf.batch_statistics

    def counting(x, ax):
        calls.append(ax)
        return real(x, ax)

    monkeypatch.setattr(bnf, "batch_statistics", counting)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    y = bnt.batch_norm(x, None, None, w, None, training=True)
    assert len(calls) == 1  # forward
    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert len(calls) == 1  # first-order backward: no recomputation
    y = bnt.batch_norm(x, None, None, w, None, training=True)
    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)
    assert len(calls) == 3  # forward + the differentiable recomputation
    gx.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_implementations_agree_on_second_derivatives():
    """A Hessian-vector product through the closed form equals plain autograd's (§5.4)."""
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)
    w0 = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    dy = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)
    v = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)
    results = []
    for impl in IMPLS:
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = bnt.batch_norm(x, None, None, w, None, training=True, implementation=impl)
        (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
        hx, hw = torch.autograd.grad((gx * v).sum(), (x, w))
        results.append((gx.detach(), hx, hw))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -- edge cases ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_stay_in_their_channel(impl, bad):
    """§7.4: a non-finite value poisons its own channel only: y, dx, dgamma, dbeta, running stats."""
    rng = np.random.default_rng(5)
    shape = (4, C, 3)
    x, dy = make_data(rng, shape, 1)
    x[2, 1, 1] = bad
    gamma, beta, rm, rv = make_params(rng)
    xt, wt, bt = tt(x, "cpu", grad=True), tt(gamma, "cpu", grad=True), tt(beta, "cpu", grad=True)
    rm_t, rv_t = tt(rm, "cpu"), tt(rv, "cpu")
    y = bnt.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, implementation=impl)
    y.backward(tt(dy, "cpu"))
    ref = oracle.forward(x, gamma, beta, rm, rv, training=True, convention="pytorch")
    dx, dgamma, dbeta = oracle.backward(dy, x, gamma, training=True, convention="pytorch")
    for what, a, e in (
        ("y", y, ref.y), ("dx", xt.grad, dx), ("dgamma", wt.grad, dgamma), ("dbeta", bt.grad, dbeta),
        ("running_mean", rm_t, ref.running_mean), ("running_var", rv_t, ref.running_var),
    ):
        close(a, e, "float64", what=what)
    others = [0, 2]
    assert torch.isfinite(y[:, others]).all() and torch.isfinite(xt.grad[:, others]).all()
    assert torch.isfinite(rm_t[others]).all() and torch.isfinite(rv_t[others]).all()
    assert not torch.isfinite(y[:, 1]).any() and not torch.isfinite(rm_t[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_variance_channel_and_single_value_allow(impl):
    """§7.2: a constant channel gives y = beta (x_hat = 0); §7.1: n = 1 under "allow" is var = 0."""
    rng = np.random.default_rng(9)
    x, dy = make_data(rng, (5, C), 1)
    x[:, 0] = 2.5
    gamma, beta, rm, rv = make_params(rng)
    xt = tt(x, "cpu", grad=True)
    y = bnt.batch_norm(xt, None, None, tt(gamma, "cpu"), tt(beta, "cpu"), training=True, implementation=impl)
    y.backward(tt(dy, "cpu"))
    torch.testing.assert_close(y[:, 0], torch.full((5,), beta[0], dtype=torch.float64), rtol=0, atol=1e-12)
    dx, _, _ = oracle.backward(dy, x, gamma, training=True, convention="pytorch")
    close(xt.grad, dx, "float64", what="dx")  # = gamma / sqrt(eps) * (dy - mean(dy)) in channel 0

    x1 = rng.standard_normal((1, C))  # n = 1, flax allows it
    rm_t, rv_t = tt(rm, "cpu"), tt(rv, "cpu")
    y1 = bnt.batch_norm(tt(x1, "cpu"), rm_t, rv_t, tt(gamma, "cpu"), tt(beta, "cpu"), training=True,
                        convention="flax", axis=1, implementation=impl)
    ref = oracle.forward(x1, gamma, beta, rm, rv, training=True, convention="flax", axis=1)
    close(y1, ref.y, "float64", what="y (n = 1)")
    close(rv_t, ref.running_var, "float64", what="running_var (n = 1)")


def test_empty_batch_in_eval_and_error_in_training():
    rm, rv = torch.zeros(C), torch.ones(C)
    y = bnt.batch_norm(torch.zeros(0, C, 2), rm, rv, None, None, training=False)
    assert y.shape == (0, C, 2)
    with pytest.raises(ValueError, match="empty batch"):
        bnt.batch_norm(torch.zeros(0, C, 2), rm, rv, None, None, training=True)
    assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C))


# -- validation: clear errors, before any state changes -------------------------------------------------


def _bad_calls():
    x = torch.randn(4, C, 2)
    w = torch.ones(C)
    return [
        ("integer x", TypeError, "floating dtype", dict(x=torch.ones(4, C, 2, dtype=torch.int64))),
        ("bool x", TypeError, "floating dtype", dict(x=torch.ones(4, C, 2, dtype=torch.bool))),
        ("not a tensor", TypeError, "torch.Tensor", dict(x=np.ones((4, C)))),
        ("rank 1", ValueError, "rank >= 2", dict(x=torch.randn(4))),
        ("axis 0", ValueError, "batch axis", dict(axis=0)),
        ("axis out of range", ValueError, "out of range", dict(axis=3)),
        ("weight shape", ValueError, r"weight must have shape \(C,\)", dict(weight=torch.ones(C + 1))),
        ("bias shape", ValueError, r"bias must have shape", dict(bias=torch.ones(1, C))),
        ("integer weight", TypeError, "weight must have a real floating dtype", dict(weight=w.long())),
        ("running stat shape", ValueError, "running_var must have shape", dict(running_var=torch.ones(2))),
        ("one running stat", ValueError, "given together", dict(running_var=None)),
        ("training flag", TypeError, "training must be a bool", dict(training=1)),
        ("implementation", ValueError, "implementation must be one of", dict(implementation="cudnn")),
        ("negative count", ValueError, "count must be", dict(count=-1)),
        ("float count", ValueError, "count must be", dict(count=1.0)),
        ("float tensor count", ValueError, "count must be", dict(count=torch.tensor(1.0))),
        ("momentum range", ValueError, "momentum", dict(momentum=1.5)),
        ("eps", ValueError, "eps", dict(eps=-1.0)),
        ("n = 1", ValueError, "more than 1 value per channel", dict(x=torch.randn(1, C))),
        ("n = 1, rank 4", ValueError, "more than 1 value per channel", dict(x=torch.randn(1, C, 1, 1))),
        ("unknown convention", ValueError, "unknown convention", dict(convention="caffe")),
        ("device", ValueError, "must be on the device of x", dict(weight=torch.ones(C, device="meta"))),
    ], x


BAD = _bad_calls()[0]
assert len(BAD) == 22


@pytest.mark.parametrize(("label", "exc", "match", "override"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_before_state_changes(label, exc, match, override):
    _, x = _bad_calls()
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    kwargs = dict(x=x, running_mean=rm, running_var=rv, weight=torch.ones(C), bias=torch.zeros(C),
                  training=True, count=2)
    kwargs.update(override)
    with pytest.raises(exc, match=match):
        bnt.batch_norm(
            kwargs.pop("x"), kwargs.pop("running_mean"), kwargs.pop("running_var"),
            kwargs.pop("weight"), kwargs.pop("bias"), **kwargs,
        )
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_eval_requires_running_statistics():
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        bnt.batch_norm(torch.randn(4, C), None, None, None, None, training=False)


def test_training_without_running_statistics_needs_none():
    x = torch.randn(6, C, dtype=torch.float64)
    y = bnt.batch_norm(x, None, None, None, None, training=True)
    ref = oracle.forward(x.numpy(), None, None, None, None, training=True, convention="pytorch")
    close(y, ref.y, "float64", what="y")
