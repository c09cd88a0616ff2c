"""Settings translation (issue 15 item 3): for every preset as source and every framework row as
target, the translated constructor is built in the real framework, trained for three steps and
evaluated, and must match the oracle under the convention the translation claims; a translation is
reported exact exactly when that convention reproduces the source's numbers."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import bn_ref
from bn_ref import oracle
from bn_ref.porting import translate as T
from bn_ref.tolerances import assert_close

os.environ.setdefault("KERAS_BACKEND", "jax")

PAIRS = [(s, t) for s in bn_ref.PRESETS for t in T.ROWS]
STEPS = 3


def test_pair_count() -> None:
    assert len(PAIRS) == 6 * 8
    # a preset as target means its framework row
    for p, row in T.PRESET_ROW.items():
        assert bn_ref.translate("pytorch", p).target == row


def _data(axis: int):
    rng = np.random.default_rng(0)
    shape = (2, 3, 2, 2)  # n = 8 per channel: the estimator factor 8/7 is visible
    xs = [np.moveaxis(rng.normal(0.5, 2.0, shape), 1, axis).astype(np.float32) for _ in range(STEPS + 1)]
    gamma = (1 + 0.3 * rng.standard_normal(3)).astype(np.float32)
    beta = (0.2 * rng.standard_normal(3)).astype(np.float32)
    return xs, gamma, beta


def _run_oracle(conv, xs, gamma, beta, axis):
    rm, rv = np.zeros(3), np.ones(3)
    ys = []
    for k, x in enumerate(xs[:-1]):
        r = oracle.forward(x, gamma, beta, rm, rv, training=True, convention=conv, axis=axis, count=k)
        rm, rv = r.running_mean, r.running_var
        ys.append(r.y)
    ys.append(oracle.forward(xs[-1], gamma, beta, rm, rv, training=False, convention=conv, axis=axis).y)
    return ys, rm, rv


def _run_torch(kwargs, xs, gamma, beta):
    torch = pytest.importorskip("torch")
    m = torch.nn.BatchNorm2d(3, **kwargs)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(gamma))
        m.bias.copy_(torch.from_numpy(beta))
        m.train()
        ys = [m(torch.from_numpy(x)).numpy() for x in xs[:-1]]
        m.eval()
        ys.append(m(torch.from_numpy(xs[-1])).numpy())
    return ys, m.running_mean.numpy(), m.running_var.numpy()


def _run_linen(kwargs, xs, gamma, beta):
    pytest.importorskip("flax")
    import flax.linen as nn
    import jax.numpy as jnp

    m = nn.BatchNorm(**kwargs)
    v = {"params": {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)},
         "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
    ys = []
    for x in xs[:-1]:
        y, upd = m.apply(v, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
        v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
        ys.append(np.asarray(y))
    ys.append(np.asarray(m.apply(v, jnp.asarray(xs[-1]), use_running_average=True)))
    return ys, np.asarray(v["batch_stats"]["mean"]), np.asarray(v["batch_stats"]["var"])


def _run_nnx(kwargs, xs, gamma, beta):
    pytest.importorskip("flax")
    import jax.numpy as jnp
    from flax import nnx

    m = nnx.BatchNorm(3, **kwargs, rngs=nnx.Rngs(0))
    m.scale.set_value(jnp.asarray(gamma))
    m.bias.set_value(jnp.asarray(beta))
    m.train()
    ys = [np.asarray(m(jnp.asarray(x))) for x in xs[:-1]]
    m.eval()
    ys.append(np.asarray(m(jnp.asarray(xs[-1]))))
    return ys, np.asarray(m.mean[...]), np.asarray(m.var[...])


def _run_keras(kwargs, xs, gamma, beta):
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras imported with backend {keras.backend.backend()}")
    m = keras.layers.BatchNormalization(**kwargs)
    m.build(xs[0].shape)
    m.gamma.assign(gamma)
    m.beta.assign(beta)
    ys = [np.asarray(m(x, training=True)) for x in xs[:-1]]
    ys.append(np.asarray(m(xs[-1], training=False)))
    return ys, np.asarray(m.moving_mean), np.asarray(m.moving_variance)


def _run_onnx(kwargs, xs, gamma, beta):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    def session(training: bool):
        outs = ["Y", "running_mean", "running_var"] if training else ["Y"]
        node = helper.make_node("BatchNormalization", ["X", "scale", "B", "input_mean", "input_var"], outs,
                                training_mode=int(training), **kwargs)
        f = TensorProto.FLOAT
        ins = [helper.make_tensor_value_info(n, f, None) for n in ("X", "scale", "B", "input_mean", "input_var")]
        g = helper.make_graph([node], "bn", ins, [helper.make_tensor_value_info(n, f, None) for n in outs])
        return ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)]))

    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    ys = []
    tr = session(True)
    for x in xs[:-1]:
        y, rm, rv = tr.run(None, {"X": x, "scale": gamma, "B": beta, "input_mean": rm, "input_var": rv})
        ys.append(y)
    ys.append(session(False).run(None, {"X": xs[-1], "scale": gamma, "B": beta, "input_mean": rm, "input_var": rv})[0])
    return ys, rm, rv


def _run_d2l(kwargs, xs, gamma, beta):
    torch = pytest.importorskip("torch")
    from bn_ref.d2l_scratch import batch_norm

    g = torch.from_numpy(gamma).reshape(1, 3, 1, 1)
    b = torch.from_numpy(beta).reshape(1, 3, 1, 1)
    mm, mv = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    ys = []
    for x in xs[:-1]:
        y, mm, mv = batch_norm(torch.from_numpy(x), g, b, mm, mv, **kwargs)
        ys.append(y.detach().numpy())
    with torch.no_grad():
        ys.append(batch_norm(torch.from_numpy(xs[-1]), g, b, mm, mv, **kwargs)[0].numpy())
    return ys, mm.reshape(-1).numpy(), mv.reshape(-1).numpy()


def _run_functional(kwargs, xs, gamma, beta):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rm, rv = torch.zeros(3), torch.ones(3)
    w, b = torch.from_numpy(gamma), torch.from_numpy(beta)
    ys = [F.batch_norm(torch.from_numpy(x), rm, rv, w, b, training=True, **kwargs).numpy() for x in xs[:-1]]
    ys.append(F.batch_norm(torch.from_numpy(xs[-1]), rm, rv, w, b, training=False, **kwargs).numpy())
    return ys, rm.numpy(), rv.numpy()


RUNNERS = {"torch.nn": _run_torch, "torch.nn.functional": _run_functional, "flax.linen": _run_linen, "flax.nnx": _run_nnx, "keras": _run_keras,
           "onnx": _run_onnx, "d2l": _run_d2l}


@pytest.mark.parametrize("source,target", PAIRS)
def test_translation_runs_as_claimed(source: str, target: str) -> None:
    t = bn_ref.translate(source, target)
    src = bn_ref.PRESETS[source]
    assert t.call and str(t).count("\n") >= 2
    # momentum in the target's spelling (§3.5): the batch weight is preserved
    if target in ("torch.nn", "torch.nn.functional"):
        assert t.kwargs["momentum"] == pytest.approx(src.momentum_spelled("batch"), abs=1e-12)
    elif "momentum" in t.kwargs:
        assert t.kwargs["momentum"] == pytest.approx(src.momentum_spelled("running"), abs=1e-12)
    eps_key = "epsilon" if target in ("flax.linen", "flax.nnx", "keras", "tf.keras", "onnx") else "eps"
    assert t.kwargs[eps_key] == src.eps
    if target == "tf.keras":
        assert t.kwargs["fused"] == (src.running_var == "unbiased")
        return  # TensorFlow is not installed here: the call is checked as text only
    axis = t.convention.feature_axis
    xs, gamma, beta = _data(axis)
    ys, rm, rv = RUNNERS[target](t.kwargs, xs, gamma, beta)
    e_ys, e_rm, e_rv = _run_oracle(t.convention, xs, gamma, beta, axis)
    for k, (y, e) in enumerate(zip(ys, e_ys)):
        assert_close(y, e, "float32", kappa=oracle.condition_number(xs[k], convention=t.convention, axis=axis),
                     what=f"y step {k}")
    assert_close(rm, e_rm, "float32", what="running_mean")
    assert_close(rv, e_rv, "float32", what="running_var")
    # exact <=> the claimed convention computes the source's numbers and has its n = 1 behaviour
    s_ys, s_rm, s_rv = _run_oracle(dataclasses.replace(src, feature_axis=axis), xs, gamma, beta, axis)
    same = (np.allclose(s_rv, e_rv, rtol=1e-9) and np.allclose(s_rm, e_rm, rtol=1e-9)
            and np.allclose(s_ys[-1], e_ys[-1], rtol=1e-9) and src.single_value == t.convention.single_value)
    assert t.exact == same, (str(t), s_rv, e_rv)


def test_overrides_and_cumulative() -> None:
    t = bn_ref.translate("pytorch", "keras", momentum=0.05, eps=1e-4)
    assert t.kwargs == {"axis": 1, "momentum": 0.95, "epsilon": 1e-4}
    t = bn_ref.translate("pytorch", "torch.nn", momentum=None)
    assert t.kwargs["momentum"] is None and t.exact
    t = bn_ref.translate("pytorch", "flax.linen", momentum=None)
    assert any("cumulative" in s for s in t.inexact)
    # a framework row as source
    assert bn_ref.translate("keras", "flax.linen").kwargs == bn_ref.translate("keras", "flax").kwargs
    t = bn_ref.translate("flax.nnx", "torch.nn")
    assert t.source == bn_ref.PRESETS["flax"] and t.kwargs["momentum"] == pytest.approx(0.01)
    assert "convention='flax'" in t.exact_alternative
    with pytest.raises(ValueError, match="unknown target"):
        bn_ref.translate("pytorch", "caffe")
    with pytest.raises(ValueError, match="unknown convention"):
        bn_ref.translate("caffe", "keras")


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert T.main(["--from", "pytorch", "--to", "keras"]) == 0
    out = capsys.readouterr().out
    assert "keras.layers.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-05)" in out
    assert "NOT EXACT" in out and "biased" in out
    assert T.main(["--from", "flax", "--to", "torch.nn", "--momentum", "0.9", "--eps", "1e-3"]) == 0
    assert "torch.nn.BatchNorm2d(C, eps=0.001, momentum=0.1)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        T.main(["--from", "pytorch", "--to", "nowhere"])
