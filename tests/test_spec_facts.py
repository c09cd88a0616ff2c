"""Every framework fact docs/spec.md marks **[v]**, executed against the installed framework.

Each test is named ``test_fact_<slug>``; the spec's marker names it (``**[v: fact_<slug>]**``) or
the generated §9 table (``**[v: §9]**``). ``test_every_v_marker_names_an_executed_check`` fails
when the spec carries a [v] marker that names nothing executable here, so a claim cannot be
promoted to "verified" without a check behind it.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bn_ref import oracle

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"


def test_every_v_marker_names_an_executed_check():
    text = SPEC.read_text(encoding="utf-8")
    markers = re.findall(r"\*\*\[v(?::\s*([^\]]*))?\]\*\*", text)
    assert len(markers) >= 20
    here = {name[len("test_"):] for name, _ in inspect.getmembers(sys.modules[__name__], inspect.isfunction)
            if name.startswith("test_fact_")}
    unnamed, unknown = 0, []
    for ref in markers:
        if not ref:
            unnamed += 1
            continue
        for part in (p.strip().strip("`") for p in ref.split(";")):
            if part == "§9":
                continue
            if part.startswith("tests/") and "::" in part:
                path, name = part.split("::")
                target = ROOT / path
                if not target.is_file() or f"def {name}(" not in target.read_text(encoding="utf-8"):
                    unknown.append(part)
            elif part not in here:
                unknown.append(part)
    assert unnamed == 0, f"{unnamed} **[v]** markers name no check"
    assert not unknown, f"markers naming no test: {unknown}"


# -- PyTorch ---------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _x(shape, seed=0, scale=2.0, shift=0.5):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape) * scale + shift)


def test_fact_torch_functional_defaults():
    """§3.1: F.batch_norm defaults to eps 1e-5 and momentum 0.1 on the batch term."""
    sig = inspect.signature(F.batch_norm)
    assert sig.parameters["eps"].default == 1e-5 and sig.parameters["momentum"].default == 0.1
    x = _x((8, 3))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    F.batch_norm(x, rm, rv, training=True)
    want = oracle.forward(x.numpy(), None, None, np.zeros(3), np.ones(3), training=True, convention="pytorch")
    np.testing.assert_allclose(rm.numpy(), want.running_mean, rtol=1e-12)
    np.testing.assert_allclose(rv.numpy(), want.running_var, rtol=1e-12)


def test_fact_torch_cumulative_average():
    """§3.3: momentum=None counts steps in num_batches_tracked; the running mean is the plain mean
    of the batch means."""
    bn = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    means = []
    for k in range(3):
        x = _x((6, 3), seed=k)
        bn(x)
        means.append(x.mean(0))
    assert int(bn.num_batches_tracked) == 3
    np.testing.assert_allclose(bn.running_mean.detach().numpy(), torch.stack(means).mean(0).numpy(), rtol=1e-12)


def test_fact_eval_leaves_running_statistics():
    """§3.6: eval forward calls leave the running statistics untouched (PyTorch, Flax, Keras)."""
    bn = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    bn(_x((8, 3)))
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    bn.eval()
    bn(_x((8, 3), seed=1))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]

    import flax.linen as nn
    import jax

    layer = nn.BatchNorm(use_running_average=True)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    v = layer.init(jax.random.PRNGKey(0), x)
    _, upd = layer.apply(v, x + 3, mutable=["batch_stats"])
    assert np.array_equal(upd["batch_stats"]["mean"], v["batch_stats"]["mean"])
    assert np.array_equal(upd["batch_stats"]["var"], v["batch_stats"]["var"])

    keras = _keras()
    kl = keras.layers.BatchNormalization()
    kl.build((8, 3))
    kl(x + 3, training=False)
    assert np.array_equal(keras.ops.convert_to_numpy(kl.moving_mean), np.zeros(3))


def test_fact_flax_init_keeps_initial_statistics():
    """§3.6: linen's init does not update batch_stats, even with use_running_average=False."""
    import flax.linen as nn
    import jax

    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32) + 5
    v = nn.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x)
    assert np.array_equal(v["batch_stats"]["mean"], np.zeros(3))
    assert np.array_equal(v["batch_stats"]["var"], np.ones(3))


def test_fact_torch_untracked_uses_batch_statistics_in_eval():
    """§3.6: track_running_stats=False has no buffers and normalizes with batch statistics in eval."""
    bn = torch.nn.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64)
    assert bn.running_mean is None and bn.running_var is None
    bn.eval()
    x = _x((8, 3))
    want = oracle.forward(x.numpy(), np.ones(3), np.zeros(3), None, None, training=True, convention="pytorch").y
    np.testing.assert_allclose(bn(x).detach().numpy(), want, rtol=1e-10, atol=1e-12)


def test_fact_torch_counter_every_step():
    """§3.6: num_batches_tracked increments on every training forward, whatever the momentum."""
    bn = torch.nn.BatchNorm1d(3, momentum=0.1, dtype=torch.float64)
    for _ in range(4):
        bn(_x((5, 3)))
    assert int(bn.num_batches_tracked) == 4


def test_fact_torch_backward_closed_form():
    """§5.1: PyTorch autograd equals the closed form and differs from the stop-gradient version."""
    x = _x((6, 3, 2)).requires_grad_(True)
    g = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    dy = _x((6, 3, 2), seed=1)
    y = F.batch_norm(x, None, None, g, b, training=True)
    dx, dg, db = torch.autograd.grad(y, (x, g, b), dy)
    w_dx, w_dg, w_db = oracle.backward(dy.numpy(), x.detach().numpy(), g.detach().numpy(), training=True,
                                       convention="pytorch")
    np.testing.assert_allclose(dx.numpy(), w_dx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dg.numpy(), w_dg, rtol=1e-9)
    np.testing.assert_allclose(db.numpy(), w_db, rtol=1e-9)
    mean = x.detach().mean((0, 2), keepdim=True)
    var = x.detach().var((0, 2), unbiased=False, keepdim=True)
    stop = torch.autograd.grad(((x - mean) / torch.sqrt(var + 1e-5) * g.reshape(1, 3, 1)), x, dy)[0]
    assert float((stop - dx).abs().max()) > 1e-2


def test_fact_flax_backward_closed_form():
    """§5.1: Flax linen's autodiff equals the closed form."""
    import flax.linen as nn
    import jax

    with jax.enable_x64(True):
        x = np.random.default_rng(0).normal(size=(6, 2, 3))
        dy = np.random.default_rng(1).normal(size=(6, 2, 3))
        layer = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
        v = layer.init(jax.random.PRNGKey(0), x)

        def f(xx):
            return layer.apply(v, xx, mutable=["batch_stats"])[0]

        _, vjp = jax.vjp(f, x)
        (dx,) = vjp(dy)
    want, _, _ = oracle.backward(dy, x, np.ones(3), training=True, convention="flax")
    np.testing.assert_allclose(np.asarray(dx), want, rtol=1e-9, atol=1e-12)


def test_fact_sum_dx_xhat_eps_term():
    """§5.1: with gamma = 1, PyTorch's sum(dx) = 0 while sum(dx * x_hat) = n s mean(dy x_hat) eps / (var + eps)."""
    x = np.random.default_rng(0).normal(size=(10, 2)) * 0.01  # var comparable to eps: the term is visible
    dy = np.random.default_rng(1).normal(size=(10, 2))
    xt = torch.from_numpy(x).requires_grad_(True)
    (dx,) = torch.autograd.grad(F.batch_norm(xt, None, None, training=True), xt, torch.from_numpy(dy))
    dx = dx.numpy()
    np.testing.assert_allclose(dx, oracle.backward(dy, x, None, training=True, convention="pytorch")[0], rtol=1e-9)
    var, eps = x.var(0), 1e-5
    s = 1 / np.sqrt(var + eps)
    xh = (x - x.mean(0)) * s
    np.testing.assert_allclose(dx.sum(0), 0, atol=1e-10)
    np.testing.assert_allclose((dx * xh).sum(0), 10 * s * (dy * xh).mean(0) * eps / (var + eps), rtol=1e-8)
    assert np.all(np.abs((dx * xh).sum(0)) > 1e-3)


def test_fact_torch_eval_backward():
    """§5.2: PyTorch's eval dx equals the closed form, and its kernel refuses gradients for the
    running statistics."""
    rm = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    rv = torch.tensor([1.5, 0.25, 4.0], dtype=torch.float64)
    g = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    x = _x((5, 3)).requires_grad_(True)
    dy = _x((5, 3), seed=1)
    (dx,) = torch.autograd.grad(F.batch_norm(x, rm, rv, g, None, training=False), x, dy)
    want, _, _ = oracle.backward(dy.numpy(), x.detach().numpy(), g.numpy(), training=False, convention="pytorch",
                                 running_mean=rm.numpy(), running_var=rv.numpy())
    np.testing.assert_allclose(dx.numpy(), want, rtol=1e-12)
    rm_req = rm.clone().requires_grad_(True)
    with pytest.raises(RuntimeError):
        y = F.batch_norm(x, rm_req, rv, g, None, training=False)
        torch.autograd.grad(y, rm_req, dy)


def test_fact_torch_double_backward():
    """§5.4: PyTorch's double backward passes gradgradcheck in float64 (bn-ref's closed form is
    compared with it in tests/test_torch_functional.py)."""
    x = _x((4, 2, 3)).requires_grad_(True)
    g = torch.tensor([1.5, -0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: F.batch_norm(a, None, None, b, None, training=True), (x, g))


def test_fact_torch_conv_n():
    """§6: PyTorch reduces N*H*W values per channel: n = 100 for (4, 3, 5, 5)."""
    x = _x((4, 3, 5, 5))
    bn = torch.nn.BatchNorm2d(3, momentum=1.0, dtype=torch.float64)
    bn(x)
    biased = x.var((0, 2, 3), unbiased=False)
    np.testing.assert_allclose((bn.running_var / biased).numpy(), 100 / 99, rtol=1e-12)


def test_fact_torch_single_value():
    """§7.1: PyTorch raises exactly when N * prod(spatial) = 1, and with track_running_stats=False
    also in eval."""
    for shape, raises in (((1, 3), True), ((1, 3, 1, 1), True), ((1, 3, 2, 2), False), ((1, 3, 4), False)):
        bn = (torch.nn.BatchNorm1d if len(shape) < 4 else torch.nn.BatchNorm2d)(3, dtype=torch.float64)
        if raises:
            with pytest.raises(ValueError):
                bn(_x(shape))
        else:
            bn(_x(shape))
    bn = torch.nn.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64).eval()
    with pytest.raises(ValueError):
        bn(_x((1, 3)))


def test_fact_torch_zero_variance_gradient():
    """§7.2: on a constant channel dx = gamma eps^-1/2 (dy - mean(dy)), about 316 gamma times the
    centred dy at eps = 1e-5."""
    x = torch.full((6, 1), 3.0, dtype=torch.float64, requires_grad=True)
    dy = _x((6, 1), seed=2)
    (dx,) = torch.autograd.grad(F.batch_norm(x, None, None, training=True), x, dy)
    np.testing.assert_allclose(dx.numpy(), (dy - dy.mean()).numpy() / np.sqrt(1e-5), rtol=1e-9)


@pytest.mark.parametrize(("value", "err"), [(7.0, 3.05e-5), (1e5, 0.77), (1e7, 105.6)])
def test_fact_torch_constant_channel_float32(value, err):
    """§7.2: float32 PyTorch on a constant channel misses beta by ~3e-5, 0.77 and 105 (the float64
    oracle gives beta exactly)."""
    bn = torch.nn.BatchNorm1d(1)
    with torch.no_grad():
        bn.bias.fill_(0.5)
    y = bn(torch.full((16, 1), value))
    got = float((y.detach().double() - 0.5).abs().max())
    assert got == pytest.approx(err, rel=0.05)
    want = oracle.forward(np.full((16, 1), value), None, np.array([0.5]), None, None, training=True,
                          convention="pytorch").y
    assert np.all(want == 0.5)


def test_fact_torch_nan_sticks():
    """§7.4: one NaN batch makes the running mean NaN; still NaN after 100 clean steps."""
    bn = torch.nn.BatchNorm1d(2, dtype=torch.float64)
    x = _x((4, 2))
    x[0, 0] = float("nan")
    bn(x)
    for k in range(100):
        bn(_x((4, 2), seed=k + 1))
    assert torch.isnan(bn.running_mean[0]) and not torch.isnan(bn.running_mean[1])


def test_fact_torch_eps_zero():
    """§7.5: PyTorch raises ValueError for eps <= 0 in training but accepts eps = 0 in eval."""
    bn = torch.nn.BatchNorm1d(3, eps=0.0, dtype=torch.float64)
    with pytest.raises(ValueError):
        bn(_x((4, 3)))
    bn.eval()
    assert torch.isfinite(bn(_x((4, 3)))).all()


def test_fact_numpy_fast_variance_example():
    """§8.2: the worked float32 example (1000 values 1000 + 0.01 z, seed 0)."""
    x = (1000.0 + 0.01 * np.random.default_rng(0).normal(size=1000)).astype(np.float32)
    exact = x.astype(np.float64).var()
    assert exact == pytest.approx(9.5411e-5, rel=1e-4)
    fast_pairwise = np.float32(np.mean(x * x) - np.float32(np.mean(x)) ** 2)
    assert fast_pairwise == np.float32(0.0625)
    acc_x, acc_xx = np.float32(0), np.float32(0)
    for v in x:
        acc_x = np.float32(acc_x + v)
        acc_xx = np.float32(acc_xx + v * v)
    n = np.float32(x.size)
    assert np.float32(acc_xx / n - (acc_x / n) ** 2) == np.float32(-0.875)
    two = np.mean((x - np.mean(x)) ** 2)
    assert abs(two - exact) / exact < 1e-6


def test_fact_flax_fast_variance_large_mean():
    """§8.2: Flax's default one-pass variance gives batch variances of 0 and 0.0625 on (64, 4)
    large-mean float32 data; use_fast_variance=False is correct."""
    import flax.linen as nn
    import jax

    x = (1000.0 + 0.01 * np.random.default_rng(0).normal(size=(64, 4))).astype(np.float32)
    var = {}
    for fast in (True, False):
        layer = nn.BatchNorm(use_running_average=False, use_fast_variance=fast, momentum=0.0)
        v = layer.init(jax.random.PRNGKey(0), x)
        _, upd = layer.apply(v, x, mutable=["batch_stats"])
        var[fast] = np.asarray(upd["batch_stats"]["var"], np.float64)
    exact = x.astype(np.float64).var(0)
    assert set(np.round(var[True], 6)) <= {0.0, 0.0625} and len(set(np.round(var[True], 6))) == 2
    np.testing.assert_allclose(var[False], exact, rtol=1e-3)


@pytest.mark.parametrize(("backend", "finite"), [("numpy", False), ("torch", False), ("jax", True)])
def test_fact_keras_backend_variance(backend, finite):
    """§8.2: Keras 3 on the torch and numpy backends returns NaN in some channels of large-mean
    float32 data (one-pass, unclipped); on the JAX backend it is correct (two-pass)."""
    code = (
        "import numpy as np, keras\n"
        "x = (1000.0 + 0.01 * np.random.default_rng(0).normal(size=(64, 4))).astype('float32')\n"
        "l = keras.layers.BatchNormalization(epsilon=1e-5)\n"
        "y = keras.ops.convert_to_numpy(l(x, training=True))\n"
        "print('NAN' if np.isnan(y).any() else 'FINITE', float(np.nanmax(np.abs(y))))\n"
    )
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    word, peak = res.stdout.split()[-2:]
    assert word == ("FINITE" if finite else "NAN"), res.stdout
    if finite:
        assert float(peak) < 5.0  # |x_hat| of 64 normal samples


def test_fact_torch_float32_mean_drift():
    """§8.3: on the 2-D (N, C) path the float32 batch mean drifts with n (data in [10, 11))."""
    errs = {}
    for k in (16, 22):
        x = 10 + torch.rand(2 ** k, 2, generator=torch.Generator().manual_seed(0))
        bn = torch.nn.BatchNorm1d(2, momentum=1.0)
        with torch.no_grad():
            bn(x)
        errs[k] = float((bn.running_mean.double() - x.double().mean(0)).abs().max())
    assert errs[16] == pytest.approx(1.6e-5, rel=0.1)
    assert errs[22] == pytest.approx(0.119, rel=0.1)


def test_fact_flax_output_dtype():
    """§8.3: Flax returns float32 for bfloat16 input with float32 parameters; dtype=bfloat16 restores it."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.bfloat16)
    for kw, want in (({}, jnp.float32), ({"dtype": jnp.bfloat16}, jnp.bfloat16)):
        layer = nn.BatchNorm(use_running_average=False, **kw)
        v = layer.init(jax.random.PRNGKey(0), x)
        y, upd = layer.apply(v, x, mutable=["batch_stats"])
        assert y.dtype == want and upd["batch_stats"]["mean"].dtype == jnp.float32


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    return keras


def test_fact_keras_mixed_bfloat16():
    """§8.3: Keras 3 under mixed_bfloat16 returns bfloat16 and keeps float32 moving statistics."""
    keras = _keras()
    layer = keras.layers.BatchNormalization(dtype="mixed_bfloat16")
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer.moving_mean.dtype) == "float32"


def test_fact_keras_training_switch():
    """§3.6: a Keras call without training=True is inference; trainable=False forces inference."""
    keras = _keras()
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32) + 4
    layer = keras.layers.BatchNormalization()
    y = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)  # moving stats 0 / 1
    layer.trainable = False
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)
    assert np.array_equal(keras.ops.convert_to_numpy(layer.moving_mean), np.zeros(3))


def test_fact_flax_use_running_average_once():
    """§9 notes: linen needs use_running_average exactly once (constructor or call); nnx defaults
    to training mode."""
    import flax.linen as nn
    import jax
    from flax import nnx

    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32) + 2
    for layer, kw in ((nn.BatchNorm(), {}), (nn.BatchNorm(use_running_average=True), {"use_running_average": False})):
        with pytest.raises(ValueError):
            layer.init(jax.random.PRNGKey(0), x, **kw)
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    y = np.asarray(bn(x))
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)  # batch statistics: training mode


def test_fact_torch_whole_module_in_T():
    """§8.3: a torch.nn BN cast wholly to bfloat16/float16 folds in T and loses several times the
    accuracy of the mixed-precision layer (float32 parameters) on x = 100 + N(0, 1)."""
    x = 100 + np.random.default_rng(0).normal(size=(16, 3, 4, 4))
    for dt, whole_err, mixed_err in ((torch.bfloat16, 0.041, 0.0072), (torch.float16, 0.0173, 0.00098)):
        xt = torch.from_numpy(x).to(dt)
        want = oracle.forward(xt.double().numpy(), None, None, None, None, training=True, convention="pytorch").y
        with torch.no_grad():
            e_whole = float(np.abs(torch.nn.BatchNorm2d(3, dtype=dt)(xt).double().numpy() - want).max())
            e_mixed = float(np.abs(torch.nn.BatchNorm2d(3)(xt).double().numpy() - want).max())
        assert e_whole == pytest.approx(whole_err, rel=0.1) and e_mixed == pytest.approx(mixed_err, rel=0.1)
        assert e_whole > 5 * e_mixed
