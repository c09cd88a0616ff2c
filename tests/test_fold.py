"""BN folding for inference (docs/spec.md §12): the oracle against an unfolded float64 reference and
PyTorch's own eval BN, the PyTorch and JAX folds against the oracle, and the fold conformance rows
(torch.nn.utils.fusion.fuse_conv_bn_eval, ONNX Runtime's Conv+BN fusion on vs off, bn-ref's folds)
in float32 and float16."""

from __future__ import annotations

import numpy as np
import pytest

import bn_ref
from bn_ref.porting import fold as F
from bn_ref.porting import fold_checks as FC
from bn_ref.tolerances import assert_close, error_units


def test_oracle_fold_equals_conv_then_bn_float64() -> None:
    case = FC.make_case("float64")
    w, b = F.fold_numpy(case.weight, case.bias, case.gamma, case.beta, case.mean, case.var, eps=case.eps)
    y = FC._conv2d64(case.x, w, b)
    assert_close(y, FC.oracle_output(case), "float64", what="folded float64")


def test_oracle_matches_torch_eval_bn_float64() -> None:
    torch = pytest.importorskip("torch")
    case = FC.make_case("float64")
    conv = torch.nn.Conv2d(3, 6, 3, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(6, dtype=torch.float64).eval()
    with torch.no_grad():
        for p, v in ((conv.weight, case.weight), (conv.bias, case.bias), (bn.weight, case.gamma), (bn.bias, case.beta),
                     (bn.running_mean, case.mean), (bn.running_var, case.var)):
            p.copy_(torch.from_numpy(v))
        y_ref = bn(conv(torch.from_numpy(case.x))).numpy()
    assert_close(FC.oracle_output(case), y_ref, "float64", what="oracle vs torch eval")
    fused = bn_ref.fold(conv, bn)
    with torch.no_grad():
        assert_close(fused(torch.from_numpy(case.x)).numpy(), y_ref, "float64", what="bn_ref.fold modules")


@pytest.mark.parametrize("kind", ["conv1d", "conv2d_nobias", "conv3d", "linear", "bnref_bn"])
def test_fold_torch_modules(kind: str) -> None:
    torch = pytest.importorskip("torch")
    import bn_ref.torch as bt

    g = torch.Generator().manual_seed(0)
    layer, bn, shape = {
        "conv1d": (torch.nn.Conv1d(3, 5, 3), torch.nn.BatchNorm1d(5), (2, 3, 9)),
        "conv2d_nobias": (torch.nn.Conv2d(3, 5, 3, bias=False), torch.nn.BatchNorm2d(5, eps=1e-3), (2, 3, 6, 6)),
        "conv3d": (torch.nn.Conv3d(2, 4, 2), torch.nn.BatchNorm3d(4), (2, 2, 4, 4, 4)),
        "linear": (torch.nn.Linear(7, 4), torch.nn.BatchNorm1d(4), (5, 7)),
        "bnref_bn": (torch.nn.Conv2d(3, 5, 3), bt.BatchNorm2d(5, convention="pytorch"), (2, 3, 6, 6)),
    }[kind]
    with torch.no_grad():
        bn.weight.copy_(1 + 0.3 * torch.randn(bn.weight.shape, generator=g))
        bn.bias.copy_(0.3 * torch.randn(bn.bias.shape, generator=g))
        bn.running_mean.copy_(0.5 * torch.randn(bn.bias.shape, generator=g))
        bn.running_var.copy_(0.2 + torch.rand(bn.bias.shape, generator=g))
    bn.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape, generator=g)
    fused = F.fold_torch_modules(layer, bn)
    with torch.no_grad():
        assert_close(fused(x).numpy(), bn(layer(x)).numpy(), "float32", what=kind)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), "the input layer must not change"
    assert fused.bias is not None


def test_fold_jax_matches_flax_conv_bn() -> None:
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    import flax.linen as nn
    import jax.numpy as jnp

    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=True, epsilon=1e-5)(nn.Conv(5, (3, 3), padding="VALID")(x))

    m = ConvBN()
    x = jnp.asarray(np.random.default_rng(0).normal(0.2, 1.0, (2, 6, 6, 3)), jnp.float32)
    v = m.init(jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(1)
    v = jax.tree_util.tree_map(lambda a: a + 0.2 * rng.standard_normal(a.shape).astype(np.float32), v)
    v["batch_stats"]["BatchNorm_0"]["var"] = jnp.abs(v["batch_stats"]["BatchNorm_0"]["var"]) + 0.1
    p, s = v["params"], v["batch_stats"]["BatchNorm_0"]
    k, b = bn_ref.fold(p["Conv_0"]["kernel"], p["Conv_0"]["bias"], p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"],
                       s["mean"], s["var"], convention="flax")
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    assert_close(np.asarray(y), np.asarray(m.apply(v, x)), "float32", what="fold_jax")
    # the same numbers through the oracle (Flax layout: output channels last)
    wn, bn_ = F.fold_numpy(np.asarray(p["Conv_0"]["kernel"]), np.asarray(p["Conv_0"]["bias"]),
                           np.asarray(p["BatchNorm_0"]["scale"]), np.asarray(p["BatchNorm_0"]["bias"]),
                           np.asarray(s["mean"]), np.asarray(s["var"]), convention="flax", out_axis=-1, dtype=np.float64)
    units = F.fold_error_units(np.asarray(k), np.asarray(b), wn, bn_, "float32", gamma=np.asarray(p["BatchNorm_0"]["scale"]),
                               beta=np.asarray(p["BatchNorm_0"]["bias"]), mean=np.asarray(s["mean"]),
                               var=np.asarray(s["var"]), layer_bias=np.asarray(p["Conv_0"]["bias"]), eps=1e-5)
    assert units["weight"] <= 1 and units["bias"] <= 1


ROW_NAMES = list(FC.ROWS)


@pytest.mark.parametrize("dtype", FC.DTYPES)
@pytest.mark.parametrize("row", ROW_NAMES)
def test_fold_rows_conform(row: str, dtype: str) -> None:
    r = FC.run_row(row, dtype)
    if r.skip:
        pytest.skip(r.skip)
    assert r.error is None, r.error
    assert {"weight", "bias", "y"} <= set(r.units), r.units
    assert r.passed, r.units


def test_fold_row_count() -> None:
    assert len(ROW_NAMES) == 4 and len(FC.DTYPES) == 2


@pytest.mark.parametrize("dtype", FC.DTYPES)
def test_fold_bound_fails_realistic_mistakes(dtype: str) -> None:
    """A fold with the wrong eps (Keras's 1e-3 for PyTorch's 1e-5) or without the layer bias fails the
    §12.3 parameter bound and the §8.4 output bound, in every dtype."""
    case = FC.make_case(dtype)
    ew, eb = F.fold_numpy(case.weight, case.bias, case.gamma, case.beta, case.mean, case.var, eps=case.eps,
                          dtype=np.float64)
    kw = dict(gamma=case.gamma, beta=case.beta, mean=case.mean, var=case.var, layer_bias=case.bias, eps=case.eps)
    w1, b1 = F.fold_numpy(case.weight, case.bias, case.gamma, case.beta, case.mean, case.var, eps=1e-3, dtype=dtype)
    assert F.fold_error_units(w1, b1, ew, eb, dtype, **kw)["weight"] > 1
    assert error_units(FC._conv2d64(case.x, w1.astype(np.float64), b1.astype(np.float64)), FC.oracle_output(case),
                       dtype) > 1
    w2, b2 = F.fold_numpy(case.weight, None, case.gamma, case.beta, case.mean, case.var, eps=case.eps, dtype=dtype)
    assert F.fold_error_units(w2, b2, ew, eb, dtype, **kw)["bias"] > 1
    # and the correctly rounded fold is well inside it
    w0, b0 = F.fold_numpy(case.weight, case.bias, case.gamma, case.beta, case.mean, case.var, eps=case.eps, dtype=dtype)
    units = F.fold_error_units(w0, b0, ew, eb, dtype, **kw)
    assert units["weight"] <= 1 / F.C_FOLD * 1.0001 and units["bias"] <= 1 / F.C_FOLD * 1.0001


def test_bad_input() -> None:
    torch = pytest.importorskip("torch")
    w = np.ones((4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"mean must have shape \(4,\)"):
        F.fold_numpy(w, None, None, None, np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match="rank >= 2"):
        F.fold_numpy(np.ones(4), None, None, None, np.zeros(4), np.ones(4))
    with pytest.raises(TypeError, match="Conv1d/2d/3d or Linear"):
        F.fold_torch_modules(torch.nn.ConvTranspose2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="no running statistics"):
        F.fold_torch_modules(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False))


def test_fold_checks_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert FC.main(["--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.count("pass") == 4 and "fuse_conv_bn_eval" in out and "onnxruntime" in out


def test_markdown_table() -> None:
    rows = [{"row": "r1", "dtype": "float32", "units": {"y": 0.5}, "error": None, "skip": None, "passed": True},
            {"row": "r1", "dtype": "float16", "units": {"y": 2.0}, "error": None, "skip": None, "passed": False},
            {"row": "r2", "dtype": "float32", "units": {}, "error": None, "skip": "x is not installed", "passed": False}]
    md = FC.markdown_table(rows)
    assert "| `r1` | pass 0.5 | **FAIL** 2 |" in md
    assert "| `r2` | skip (x is not installed) | - |" in md
