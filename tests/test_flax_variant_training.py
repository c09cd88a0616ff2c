"""``bn-ref train --backend flax --bn-variant renorm|ghost`` (spec §13, §14): the Flax LeNet-BN built
with ``TrainConfig.variant()``, the epoch in ``lax.scan`` equal to a step-by-step loop, tiny runs of
the CLI on the shipped real subset, and a renorm correction pair carried in ``batch_stats``,
checkpointed and resumed exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_ref.__main__ import main
from bn_ref.apps import data
from bn_ref.apps.lenet_flax import LeNet
from bn_ref.apps.training import TrainConfig, flax_backend, read_checkpoint, train
from bn_ref.variants import Variant

SUBSET = Path(__file__).parent / "data" / "fashion-mnist-subset"
SUBSET_SUMS = json.loads((SUBSET / "md5sums.json").read_text())
# 50 images in batches of 16: three full batches and a last one of 2 (one ghost batch of 2).
BASE = ["--backend", "flax", "--device", "cpu", "--batch-size", "16", "--limit-train", "50", "--limit-test", "32",
        "--no-progress", "--data-dir", str(SUBSET), "--seed", "1", "--lr", "0.1"]
LAYERS = ("bn1", "bn2", "bn3", "bn4")


@pytest.fixture(autouse=True)
def _subset_checksums(monkeypatch):
    monkeypatch.setattr(data, "CHECKSUMS", SUBSET_SUMS)


@pytest.mark.parametrize("variant", ["renorm", "ghost"])
def test_cli_trains_one_tiny_epoch(variant, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--epochs", "1", "--out", str(out), "--bn-variant", variant]) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["bn_variant"] == variant
    (epoch,) = metrics["epochs"]
    assert math.isfinite(epoch["train_loss"]) and 0.0 <= epoch["test_acc"] <= 1.0
    arrays = read_checkpoint(out / "checkpoint.npz").arrays
    stats = {k for k in arrays if k.startswith("batch_stats/")}
    # renorm with LeNet's settings keeps no pair of its own (§13.3): Flax's variables, updated.
    assert stats == {f"batch_stats/{b}/{k}" for b in LAYERS for k in ("mean", "var")}
    assert all(np.any(arrays[f"batch_stats/{b}/mean"] != 0) for b in LAYERS)


def test_ghost_epoch_in_scan_equals_step_by_step_loop():
    """The trainer's epoch (``lax.scan`` over index batches, §14 ghost batches in every BN layer) is a
    Python loop of ``model.apply`` + SGD steps with the same variant; and the variant is in the model.

    Ghost batches of 8 (not 2): with 2 samples per sub-batch some of the 120 dense features have a
    variance far below eps, and float32 round-off of different (equally valid) fusion orders is
    amplified past any useful tolerance in a few steps.
    """
    config = TrainConfig(backend="flax", device="cpu", seed=3, batch_size=16, lr=0.1, bn_variant="ghost",
                         ghost_batch_size=8, progress=False)
    trainer = flax_backend.Trainer(config)
    assert trainer.model.variant == Variant(ghost_batch_size=8) == config.variant()
    rng = np.random.default_rng(0)
    n = 40  # two full batches of 16, then the last batch of 8 (kept, as the trainer keeps it)
    xtr = rng.uniform(0, 1, (n, 28, 28)).astype(np.float32)
    ytr = rng.integers(0, 10, n).astype(np.int32)
    trainer.setup(xtr, ytr, xtr[:4], ytr[:4])
    params, stats = trainer.params, trainer.stats
    perm = rng.permutation(n)
    loss_sum, _ = trainer.train_epoch(perm, lambda done: None)

    model, tx = LeNet(convention="flax", variant=Variant(ghost_batch_size=8)), optax.sgd(0.1)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, xb, yb):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd["batch_stats"]

        (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), new_stats, opt_state, loss

    total = 0.0
    for idx in (perm[0:16], perm[16:32], perm[32:40]):
        params, stats, opt_state, loss = step(params, stats, opt_state, jnp.asarray(xtr[idx][..., None]),
                                              jnp.asarray(ytr[idx]))
        total += float(loss) * len(idx)
    np.testing.assert_allclose(loss_sum, total, rtol=1e-5)
    got = jax.tree_util.tree_leaves((trainer.params, trainer.stats))
    want = jax.tree_util.tree_leaves((params, stats))
    assert len(got) == len(want) == 26  # 5 kernels + 5 biases, 4 x (scale, bias, mean, var)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # And the variant mattered: plain BN's running update from the same state differs (§14.2).
    xb = jnp.asarray(xtr[:16][..., None])
    variables = {"params": trainer.params, "batch_stats": trainer.stats}
    _, upd_plain = LeNet(convention="flax").apply(variables, xb, train=True, mutable=["batch_stats"])
    _, upd_ghost = model.apply(variables, xb, train=True, mutable=["batch_stats"])
    assert not np.allclose(np.asarray(upd_plain["batch_stats"]["bn3"]["var"]),
                           np.asarray(upd_ghost["batch_stats"]["bn3"]["var"]), rtol=1e-4)


def test_lenet_variant_needs_bn_ref():
    with pytest.raises(ValueError, match="variant= needs bn='ref'"):
        LeNet(bn="native", variant=Variant(ghost_batch_size=4)).init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)),
                                                                     train=False)


def test_renorm_pair_of_its_own_is_carried_checkpointed_and_resumed_exactly(tmp_path, monkeypatch):
    """A renorm layer with its own correction pair (renorm_momentum 0.9, §13.3): the pair lives in
    ``batch_stats``, the scan carries it, the checkpoint saves it, and 1 + 1 resumed epochs equal 2."""
    own = Variant(renorm=True, rmax=3.0, dmax=5.0, renorm_momentum=0.9)
    monkeypatch.setattr(TrainConfig, "variant", lambda self: own)
    kw = dict(backend="flax", device="cpu", seed=2, batch_size=16, lr=0.1, bn_variant="renorm", data_dir=str(SUBSET),
              limit_train=48, limit_test=32, progress=False)
    quiet = {"log": lambda line: None}
    train(TrainConfig(epochs=2, out=str(tmp_path / "straight"), **kw), **quiet)
    train(TrainConfig(epochs=1, out=str(tmp_path / "split"), **kw), **quiet)
    one = read_checkpoint(tmp_path / "split" / "checkpoint.npz").arrays
    train(TrainConfig(epochs=2, out=str(tmp_path / "split"), resume=True, **kw), **quiet)
    a = read_checkpoint(tmp_path / "straight" / "checkpoint.npz").arrays
    b = read_checkpoint(tmp_path / "split" / "checkpoint.npz").arrays
    pair = {f"batch_stats/{n}/{k}" for n in LAYERS for k in ("renorm_mean", "renorm_stat")}
    assert pair <= set(a) and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for n in LAYERS:  # carried: moved from its start (0, 1), away from the running pair, and on in epoch 2
        assert np.any(one[f"batch_stats/{n}/renorm_mean"] != 0)
        assert not np.allclose(a[f"batch_stats/{n}/renorm_mean"], a[f"batch_stats/{n}/mean"])
        assert not np.array_equal(a[f"batch_stats/{n}/renorm_stat"], one[f"batch_stats/{n}/renorm_stat"])
