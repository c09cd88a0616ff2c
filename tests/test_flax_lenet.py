"""bn_ref.apps.lenet_flax.LeNet: shapes, bn-ref BN vs Flax's own BN in the same network, and the train step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_ref import PRESETS
from bn_ref.apps.lenet_flax import LeNet, create_train_state, native_batchnorm_kwargs, train_step


@pytest.fixture()
def x64():
    """The ref-vs-native comparison runs in float64; restore the setting afterwards."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _images(n, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0, 1, (n, 28, 28, 1)).astype(dtype)), jnp.asarray(rng.integers(0, 10, n))


NAMES = {"conv1", "bn1", "conv2", "bn2", "dense1", "bn3", "dense2", "bn4", "dense3"}


@pytest.mark.parametrize("bn", ["ref", "native", "none"])
def test_shapes_and_names(bn):
    x, _ = _images(3)
    model = LeNet(bn=bn, convention="flax")
    v = jax.eval_shape(lambda key, x: model.init(key, x, train=False), jax.random.key(0), x)
    assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x).shape == (3, 10)
    names = NAMES if bn != "none" else {n for n in NAMES if not n.startswith("bn")}
    assert set(v["params"]) == names
    assert v["params"]["conv1"]["kernel"].shape == (5, 5, 1, 6)
    assert v["params"]["conv2"]["kernel"].shape == (5, 5, 6, 16)
    assert v["params"]["dense1"]["kernel"].shape == (256, 120)
    assert v["params"]["dense3"]["kernel"].shape == (84, 10)
    if bn == "ref":
        assert set(v["batch_stats"]["bn1"]) == {"mean", "var"}  # Flax's variables (no counter unless momentum=None)
        assert v["batch_stats"]["bn3"]["mean"].shape == (120,)
    with pytest.raises(ValueError, match=r"\(N, 28, 28, 1\)"):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, jnp.zeros((3, 1, 28, 28)))


# conventions Flax's BatchNorm can express, including momentum on the batch term (mapped to 1 - m)
BATCH_TERM_BIASED = dataclasses.replace(PRESETS["pytorch"], name="pytorch-biased", running_var="biased")
EXPRESSIBLE = [("flax", "flax"), ("pytorch-biased", BATCH_TERM_BIASED)]
assert len(EXPRESSIBLE) == 2


@pytest.mark.parametrize("convention", [e[1] for e in EXPRESSIBLE], ids=[e[0] for e in EXPRESSIBLE])
def test_ref_and_native_bn_give_the_same_network(convention, x64):
    """Same weights, float64: outputs, gradients and running statistics agree (3 train steps, then eval)."""
    x, labels = _images(6, seed=1, dtype=np.float64)
    ref, native = (
        LeNet(bn="ref", convention=convention, param_dtype=jnp.float64),
        LeNet(bn="native", convention=convention, param_dtype=jnp.float64),
    )
    # Weights need not come from the initialisers here: random ones shaped like init's, built
    # with NumPy (no compile), with BN scales around 1 and running statistics at 0/1.
    shapes = jax.eval_shape(lambda key, x: ref.init(key, x, train=False), jax.random.key(1), x)
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.3, 0.3, s.shape)), shapes["params"])
    for name in ("bn1", "bn2", "bn3", "bn4"):
        params[name]["scale"] = params[name]["scale"] + 1.0
    stats_ref = {
        name: {"mean": jnp.zeros(s["mean"].shape), "var": jnp.ones(s["var"].shape)}
        for name, s in shapes["batch_stats"].items()
    }
    stats_nat = {k: {"mean": s["mean"], "var": s["var"]} for k, s in stats_ref.items()}

    def make_step(model):
        @jax.jit
        def step(params, stats, x):
            def loss(params):
                logits, upd = model.apply(
                    {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
                )
                return jnp.sum(jnp.sin(logits)), (logits, upd["batch_stats"])

            (_, (logits, new)), grads = jax.value_and_grad(loss, has_aux=True)(params)
            return logits, grads, new

        return step

    step_ref, step_nat = make_step(ref), make_step(native)
    close = dict(rtol=1e-9, atol=1e-12)
    for k in range(3):
        xk = x * (1.0 + 0.3 * k)
        lr, gr, stats_ref = step_ref(params, stats_ref, xk)
        ln, gn, stats_nat = step_nat(params, stats_nat, xk)
        np.testing.assert_allclose(np.asarray(lr), np.asarray(ln), **close)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **close), gr, gn)
        for name in ("bn1", "bn2", "bn3", "bn4"):
            for key in ("mean", "var"):
                np.testing.assert_allclose(np.asarray(stats_ref[name][key]), np.asarray(stats_nat[name][key]), **close)
        assert not np.allclose(np.asarray(stats_ref["bn3"]["var"]), 1.0)  # the statistics did move
    e_ref = jax.jit(lambda v, x: ref.apply(v, x, train=False))({"params": params, "batch_stats": stats_ref}, x)
    e_nat = jax.jit(lambda v, x: native.apply(v, x, train=False))({"params": params, "batch_stats": stats_nat}, x)
    np.testing.assert_allclose(np.asarray(e_ref), np.asarray(e_nat), **close)


def test_native_rejects_conventions_flax_cannot_express():
    for name in ("pytorch", "tf_fused"):
        with pytest.raises(ValueError, match="unbiased"):
            native_batchnorm_kwargs(name)
    cma = dataclasses.replace(PRESETS["onnx"], name="onnx-cma", momentum=None)
    with pytest.raises(ValueError, match="momentum=None"):
        jax.eval_shape(
            lambda k, x: LeNet(bn="native", convention=cma).init(k, x, train=False), jax.random.key(0), _images(2)[0]
        )
    assert native_batchnorm_kwargs(BATCH_TERM_BIASED)["momentum"] == pytest.approx(0.9)
    assert native_batchnorm_kwargs("keras") == {
        "momentum": 0.99,
        "epsilon": 1e-3,
        "axis": -1,
        "use_fast_variance": False,
    }
    with pytest.raises(ValueError, match="bn must be"):
        jax.eval_shape(lambda k, x: LeNet(bn="batch").init(k, x, train=False), jax.random.key(0), _images(2)[0])


@pytest.mark.parametrize("bn", ["ref", "none"])
def test_jitted_train_step_decreases_the_loss(bn):
    x, labels = _images(16, seed=2)
    state = create_train_state(LeNet(bn=bn, convention="pytorch"), jax.random.key(0), x, learning_rate=0.5)
    first_params = state.params
    # the book's classic init: Xavier-uniform kernels (bound sqrt(6 / (fan_in + fan_out))), zero biases
    kernel = np.asarray(first_params["dense1"]["kernel"])
    assert np.abs(kernel).max() <= np.sqrt(6 / (256 + 120)) and kernel.std() > 0.5 * np.sqrt(2 / (256 + 120))
    np.testing.assert_array_equal(np.asarray(first_params["conv1"]["bias"]), 0.0)
    state, m1 = train_step(state, x, labels)
    state, m2 = train_step(state, x, labels)
    state, m3 = train_step(state, x, labels)
    assert float(m2["loss"]) < float(m1["loss"]) and float(m3["loss"]) < float(m2["loss"])
    assert int(state.step) == 3
    assert not np.allclose(np.asarray(state.params["dense3"]["kernel"]), np.asarray(first_params["dense3"]["kernel"]))
    if bn == "ref":
        assert set(state.batch_stats["bn2"]) == {"mean", "var"}
        assert state.batch_stats["bn2"]["mean"].dtype == jnp.float32
    else:
        assert state.batch_stats == {}
