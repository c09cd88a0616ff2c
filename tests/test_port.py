"""Porting LeNet-BN between bn_ref.torch and bn_ref.flax: the same eval logits, the same training
step, exact round trips, and loud rejection of state that is not a LeNet-BN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from bn_ref.apps import port
from bn_ref.apps.lenet_flax import LeNet
from bn_ref.apps.lenet_torch import lenet

RTOL = 1e-4


def _batch(seed: int, n: int = 32):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n)
    return x, y


def _trained_torch(bn: str, convention: str, steps: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = lenet(bn=bn, convention=convention)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for s in range(steps):
        x, y = _batch(100 + s)
        loss = F.cross_entropy(model(torch.from_numpy(x)[:, None]), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _flax_logits(variables, bn: str, convention: str, x: np.ndarray) -> np.ndarray:
    model = LeNet(bn=bn, convention=convention)
    v = {"params": variables["params"]}
    if variables.get("batch_stats"):
        v["batch_stats"] = variables["batch_stats"]
    return np.asarray(model.apply(jax.tree_util.tree_map(jnp.asarray, v), jnp.asarray(x[..., None]), train=False))


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    assert np.max(np.abs(a - b)) <= rtol * scale, (np.max(np.abs(a - b)), scale)


@pytest.mark.parametrize("bn, convention", [("ref", "pytorch"), ("native", "pytorch"), ("ref", "d2l"), ("none", "pytorch")])
def test_torch_to_flax_same_eval_logits(bn, convention):
    model = _trained_torch(bn, convention).eval()
    x, _ = _batch(7, 64)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)[:, None]).numpy()
    variables = port.torch_to_flax(model.state_dict())
    flax_bn = "ref" if bn == "native" else bn  # torch-native BN is the pytorch convention
    _close(_flax_logits(variables, flax_bn, convention, x), expected)
    if bn != "none":
        assert int(variables["batch_stats"]["bn1"]["count"]) == 3


def test_round_trips_are_exact():
    sd = _trained_torch("ref", "pytorch").state_dict()
    back = port.flax_to_torch(port.torch_to_flax(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        assert torch.equal(back[k], sd[k]), k


def _flax_trained(convention: str, steps: int = 3):
    model = LeNet(bn="ref", convention=convention)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)), train=False)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.5)
    opt = tx.init(params)
    for s in range(steps):
        x, y = _batch(200 + s)

        def loss_fn(p, stats=stats, x=x, y=y):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, jnp.asarray(x[..., None]), train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean(), upd["batch_stats"]

        (_, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, upd)
    return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("convention", ["flax", "pytorch"])
def test_flax_to_torch_same_eval_logits(convention):
    variables = jax.device_get(_flax_trained(convention))
    x, _ = _batch(9, 64)
    expected = _flax_logits(variables, "ref", convention, x)
    model = lenet(bn="ref", convention=convention)
    model.load_state_dict(port.flax_to_torch(variables), strict=True)
    model.eval()
    with torch.no_grad():
        _close(model(torch.from_numpy(x)[:, None]).numpy(), expected)


@pytest.mark.parametrize("convention", ["pytorch", "flax"])
def test_one_training_step_agrees(convention):
    torch_model = _trained_torch("ref", convention, steps=1)
    variables = port.torch_to_flax(torch_model.state_dict())
    x, y = _batch(11, 48)
    # PyTorch step
    opt = torch.optim.SGD(torch_model.parameters(), lr=0.5)
    torch_model.train()
    loss = F.cross_entropy(torch_model(torch.from_numpy(x)[:, None]), torch.from_numpy(y))
    opt.zero_grad()
    loss.backward()
    opt.step()
    expected = port.torch_to_flax(torch_model.state_dict())
    # Flax step from the ported weights
    model = LeNet(bn="ref", convention=convention)
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    stats = jax.tree_util.tree_map(jnp.asarray, variables["batch_stats"])

    def loss_fn(p):
        logits, upd = model.apply({"params": p, "batch_stats": stats}, jnp.asarray(x[..., None]), train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean(), upd["batch_stats"]

    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    new_params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)
    got = jax.device_get({"params": new_params, "batch_stats": new_stats})
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    flat_g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    assert len(flat_e) == len(flat_g) == 18 + 12  # 9 layers x 2 params, 4 BN x (mean, var, count)
    for path, value in flat_e:
        got_v = flat_g[path]
        if np.asarray(value).dtype.kind == "i":
            assert int(got_v) == int(value), path
        else:
            _close(got_v, value, rtol=1e-4)


def test_rejects_foreign_state():
    sd = _trained_torch("ref", "pytorch", steps=0).state_dict()
    sd["16.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="16.weight"):
        port.torch_to_flax(sd)
    sd.pop("16.weight")
    sd.pop("4.weight")
    with pytest.raises(ValueError, match="4.weight"):
        port.torch_to_flax(sd)
    with pytest.raises(ValueError, match="conv1"):
        port.flax_to_torch({"params": {}, "batch_stats": {}})


def test_port_cli_torch_to_flax_and_back(tmp_path):
    import subprocess
    import sys

    model = _trained_torch("ref", "pytorch").eval()
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    flax_out, torch_out = tmp_path / "flax.npz", tmp_path / "back.pt"
    for args in (["--from", "torch", str(ckpt), "--to", "flax", str(flax_out)],
                 ["--from", "flax", str(flax_out), "--to", "torch", str(torch_out)]):
        res = subprocess.run([sys.executable, "-m", "bn_ref", "port", *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    x, _ = _batch(5, 16)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)[:, None]).numpy()
    with np.load(flax_out, allow_pickle=False) as z:  # params/<layer>/<leaf>, batch_stats/<layer>/<leaf>
        variables: dict = {}
        for name in z.files:
            node = variables
            *parents, leaf = name.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = z[name]
    assert set(variables) == {"params", "batch_stats"} and len(z.files) == 18 + 12
    _close(_flax_logits(variables, "ref", "pytorch", x), expected)
    back = torch.load(torch_out, weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    res = subprocess.run([sys.executable, "-m", "bn_ref", "port", "--from", "jax", str(ckpt), "--to", "flax", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
