"""Data-parallel LeNet-BN training equals single-device training (issue 7, spec §11).

One epoch on real Fashion-MNIST (the shipped subset, or the Debian data when installed) with a
global batch of 64 and 261 training images, so the last batch has 5 images: split 3 + 2 over two
torch processes and 2 + 2 + 1 + 0 (an empty device) over four JAX devices. The final parameters
and running statistics must equal those of single-device training to float32 round-off, and the
epoch's metrics must agree (accuracies to one image).

Tolerance: per tensor, ``max|a - b| <= ATOL + RTOL * max|a|`` with RTOL = 5 x the float32 rtol of
``bn_ref.tolerances`` and ATOL = 1e-5. Five SGD steps at lr 1.0 carry the reordering round-off of
the sharded sums (a few ulps per step) through the network, which the single-op float32 bound
does not allow for; the conv/dense biases in front of a BN layer have a zero true gradient, so
they hold only round-off (~1e-7) and are covered by ATOL. Each run must also move its parameters
far (> 100 x the bound) from the initial ones, so agreement is not vacuous.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bn_ref.apps import data
from bn_ref.apps.training import TrainConfig, read_checkpoint, shard_bounds, train
from bn_ref.tolerances import tolerance

SUBSET = Path(__file__).parent / "data" / "fashion-mnist-subset"
FULL = data.find_data_dir() is not None and data.find_data_dir() == data.DEBIAN_DIR
RTOL = 5 * tolerance("float32").rtol
ATOL = 1e-5
LIMIT_TRAIN, BATCH = 261, 64  # 4 full batches + a last batch of 5


@pytest.fixture(autouse=True)
def _subset_checksums(monkeypatch):
    if not FULL:  # the shipped subset has its own checksums
        monkeypatch.setattr(data, "CHECKSUMS", json.loads((SUBSET / "md5sums.json").read_text()))


def _config(out: Path, backend: str, **kw) -> TrainConfig:
    base = dict(
        backend=backend,
        bn="ref",
        epochs=1,
        lr=1.0,
        batch_size=BATCH,
        device="cpu",
        seed=3,
        out=str(out),
        data_dir=None if FULL else str(SUBSET),
        limit_train=LIMIT_TRAIN,
        limit_test=200,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _state(out: Path, backend: str) -> dict[str, np.ndarray]:
    """Model state by the names the init dicts below use (torch state_dict keys; Flax ``params/...``)."""
    arrays = read_checkpoint(out / "checkpoint.npz").arrays
    if backend == "torch":
        return {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    return {k: v for k, v in arrays.items() if k.startswith(("params/", "batch_stats/"))}


def _assert_same_training(single: dict, parallel: dict, init: dict, n_stats: int) -> None:
    assert single.keys() == parallel.keys() and single.keys() >= init.keys()
    stats = [k for k in single if "running" in k or k.startswith("batch_stats/")]
    assert len(stats) == n_stats, stats
    moved = 0.0
    for key in single:
        a, b = single[key].astype(np.float64), parallel[key].astype(np.float64)
        assert a.shape == b.shape, key
        if not np.issubdtype(single[key].dtype, np.floating):  # step counters
            np.testing.assert_array_equal(a, b, err_msg=key)
            continue
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), key
        bound = ATOL + RTOL * np.max(np.abs(a))
        err = np.max(np.abs(a - b))
        assert err <= bound, f"{key}: max |single - parallel| = {err:.3g} > {bound:.3g}"
        if key in init:
            moved = max(moved, float(np.max(np.abs(a - init[key].astype(np.float64)))))
    assert moved > 100 * (ATOL + RTOL), f"training barely moved the parameters ({moved:.3g})"


def _same_metrics(m1: dict, m2: dict) -> None:
    # accuracies: at most one image may flip (a logit tie within round-off); here none does
    (e1,), (e2,) = m1["epochs"], m2["epochs"]
    assert abs(e1["train_acc"] - e2["train_acc"]) * LIMIT_TRAIN <= 1 + 1e-9
    assert abs(e1["test_acc"] - e2["test_acc"]) * m1["config"]["limit_test"] <= 1 + 1e-9
    assert abs(e1["train_loss"] - e2["train_loss"]) <= RTOL * abs(e1["train_loss"])


def test_shard_bounds_cover_the_batch_contiguously():
    for batch, n in [(64, 2), (5, 2), (5, 4), (2, 4), (7, 3)]:
        bounds = [shard_bounds(batch, n, r) for r in range(n)]
        assert bounds[0][0] == 0 and bounds[-1][1] == batch
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(n - 1))
    assert [shard_bounds(5, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]


def test_torch_nproc2_equals_single_device(tmp_path, capfd):
    import torch

    from bn_ref.apps.lenet_torch import lenet

    m1 = train(_config(tmp_path / "single", "torch"), log=lambda line: None)
    m2 = train(_config(tmp_path / "ddp", "torch", nproc=2), log=lambda line: None)
    printed = capfd.readouterr().out  # rank 0 prints; the other rank is silent
    assert printed.count("on 2 processes (gloo), cpu") == 1 and printed.count("epoch   1") == 1, printed
    assert m2["config"]["nproc"] == 2 and m1["config"]["nproc"] == 1
    on_disk = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(m2))
    assert not list((tmp_path / "ddp").glob("worker-*.log"))
    torch.manual_seed(3)
    init = {k: v.numpy() for k, v in lenet(bn="ref", convention="pytorch").state_dict().items() if v.is_floating_point()}
    _assert_same_training(_state(tmp_path / "single", "torch"), _state(tmp_path / "ddp", "torch"), init, n_stats=8)
    _same_metrics(m1, m2)


def test_flax_devices4_equals_single_device(tmp_path):
    import jax
    import jax.numpy as jnp

    from bn_ref.apps.lenet_flax import LeNet
    from bn_ref.apps.training.flax_backend import tree_arrays

    assert len(jax.devices("cpu")) >= 4, "tests/conftest.py should give JAX 4 host CPU devices"
    m1 = train(_config(tmp_path / "single", "flax"), log=lambda line: None)
    lines: list[str] = []
    m2 = train(_config(tmp_path / "sharded", "flax", devices=4), log=lines.append)
    assert any("on 4 x cpu" in line for line in lines), lines
    assert m2["config"]["devices"] == 4
    variables = LeNet(bn="ref", convention="flax").init(jax.random.PRNGKey(3), jnp.zeros((2, 28, 28, 1)), train=False)
    init = tree_arrays("params", variables["params"])
    _assert_same_training(_state(tmp_path / "single", "flax"), _state(tmp_path / "sharded", "flax"), init,
                          n_stats=8)  # 4 BN x (mean, var): no counter for a constant momentum
    _same_metrics(m1, m2)


def test_flax_native_rejects_uneven_shards(tmp_path):
    from bn_ref.apps.training.flax_backend import ShardedTrainer

    trainer = ShardedTrainer(_config(tmp_path / "x", "flax", bn="native", devices=4))
    x = np.zeros((LIMIT_TRAIN, 28, 28), np.float32)
    y = np.zeros((LIMIT_TRAIN,), np.int32)
    with pytest.raises(ValueError, match="equal weights"):
        trainer.setup(x, y, x[:10], y[:10])
    assert not (tmp_path / "x").exists()


def test_too_few_devices_names_xla_flags():
    from bn_ref.apps.training.flax_backend import data_mesh

    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=4096"):
        data_mesh(4096, "cpu")


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"backend": "flax", "nproc": 2}, "--nproc"),
        ({"backend": "torch", "devices": 2}, "--devices"),
        ({"backend": "torch", "nproc": 0}, "--nproc"),
        ({"backend": "flax", "devices": 0}, "--devices"),
    ],
)
def test_bad_parallel_settings_rejected(tmp_path, kw, needle):
    config = _config(tmp_path / "out", **kw)
    with pytest.raises(ValueError, match=needle):
        train(config)
    assert not (tmp_path / "out").exists()


def test_torch_worker_failure_is_one_line_and_stops_the_others(tmp_path):
    """Rank 1 raises in the epoch's metrics all-reduce while rank 0 waits in it: the launcher
    stops rank 0 at once (not after the collective timeout), prints one line, exits 1."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os
            if os.environ.get("RANK") == "1":
                from bn_ref.apps.training import torch_backend

                def evaluate(self):
                    raise RuntimeError("injected failure on rank 1")

                torch_backend.DistributedTrainer.evaluate = evaluate
            """
        )
    )
    script = (
        "import sys, json, pathlib, bn_ref.apps.data as d;"
        f"full = {FULL!r};"
        "d.CHECKSUMS = d.CHECKSUMS if full else json.loads(pathlib.Path(sys.argv[1], 'md5sums.json').read_text());"
        "from bn_ref.__main__ import main; sys.exit(main(sys.argv[2:]))"
    )
    out = tmp_path / "out"
    args = ["train", "--backend", "torch", "--nproc", "2", "--epochs", "1", "--batch-size", "64", "--device", "cpu",
            "--limit-train", "128", "--limit-test", "50", "--out", str(out), "--no-progress"]
    if not FULL:
        args += ["--data-dir", str(SUBSET)]
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "BN_REF_DIST_TIMEOUT": "600"}
    res = subprocess.run([sys.executable, "-c", script, str(SUBSET), *args], capture_output=True, text=True,
                         timeout=120, env=env, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "rank 1 of 2 failed" in lines[0] and "injected failure on rank 1" in lines[0], lines[0]
    assert "injected failure on rank 1" in (out / "worker-1.log").read_text()
