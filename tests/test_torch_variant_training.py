"""`bn-ref train --backend torch --bn-variant renorm|ghost` (issue 16): the variant reaches the LeNet's
bn-ref layers, a run resumes bit for bit (variant state is checkpointed), and lenet(variant=...) itself.

Runs are tiny (192 images of the shipped real subset, batch 64: three steps an epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bn_ref.__main__ import main
from bn_ref.apps import data
from bn_ref.apps.training import read_checkpoint
from bn_ref.variants import Variant

torch = pytest.importorskip("torch")
from bn_ref.apps.lenet_torch import lenet  # noqa: E402
from bn_ref.torch import BatchNorm  # noqa: E402

SUBSET = Path(__file__).parent / "data" / "fashion-mnist-subset"
BASE = ["--backend", "torch", "--device", "cpu", "--batch-size", "64", "--limit-train", "192", "--limit-test", "64",
        "--no-progress", "--data-dir", str(SUBSET), "--seed", "1"]
BN_KEYS = ("1", "5", "10", "13")  # the BN layers' indices in the LeNet


@pytest.fixture(autouse=True)
def _subset_checksums(monkeypatch):
    monkeypatch.setattr(data, "CHECKSUMS", json.loads((SUBSET / "md5sums.json").read_text()))


def _train(out: Path, *args: str) -> int:
    return main(["train", *BASE, "--out", str(out), *args])


@pytest.mark.parametrize("variant", ["renorm", "ghost"])
def test_variant_run_resumes_bit_for_bit(variant, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full, "--epochs", "2", "--bn-variant", variant) == 0
    assert _train(part, "--epochs", "1", "--bn-variant", variant) == 0
    assert _train(part, "--epochs", "2", "--bn-variant", variant, "--resume") == 0
    a, b = read_checkpoint(full / "checkpoint.npz").arrays, read_checkpoint(part / "checkpoint.npz").arrays
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    steps = 2 * 3
    # ghost: 64 // 4 = 16 samples a ghost batch, 4 running updates a step (spec §14.2)
    for k in BN_KEYS:
        assert int(a[f"model/{k}.num_batches_tracked"]) == steps * (4 if variant == "ghost" else 1)
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["config"]["bn_variant"] == variant and len(metrics["epochs"]) == 2


def test_variants_change_the_training(tmp_path):
    """Same seed and data: renorm and ghost give other losses than plain BN (the variant is used)."""
    losses = {}
    for variant in ("plain", "renorm", "ghost"):
        assert _train(tmp_path / variant, "--epochs", "1", "--bn-variant", variant) == 0
        losses[variant] = json.loads((tmp_path / variant / "metrics.json").read_text())["epochs"][0]["train_loss"]
    assert len(set(losses.values())) == 3, losses


def test_lenet_variant_layers_and_state():
    v = Variant(renorm=True, renorm_momentum=0.9, renorm_track="stddev")
    net = lenet(variant=v)
    bns = [m for m in net.modules() if isinstance(m, BatchNorm)]
    assert len(bns) == 4 and all(m.variant is v for m in bns)
    keys = set(net.state_dict())
    assert {f"{k}.renorm_stat" for k in BN_KEYS} <= keys and {f"{k}.renorm_mean" for k in BN_KEYS} <= keys
    plain = set(lenet().state_dict())
    assert keys - plain == {f"{k}.{n}" for k in BN_KEYS for n in ("renorm_mean", "renorm_stat")}
    assert set(lenet(variant=Variant(ghost_batch_size=4)).state_dict()) == plain
    with pytest.raises(ValueError, match="variant needs bn='ref'"):
        lenet(bn="native", variant=Variant(ghost_batch_size=4))


def test_one_sample_ghost_batch_is_refused_before_training(tmp_path, capsys):
    """192 images at batch 64 with ghost batches of 7: 64 % 7 = 1 leaves a one-sample ghost batch,
    an error under PyTorch's n = 1 rule (spec §7.1) -- refused before any file is written."""
    out = tmp_path / "run"
    assert _train(out, "--epochs", "1", "--bn-variant", "ghost", "--ghost-batch-size", "7") == 2  # a settings error
    assert "ghost batch of 1 sample" in capsys.readouterr().err
    assert not (out / "checkpoint.npz").exists()


def test_ghost_split_rule_follows_the_convention():
    from bn_ref.apps.training.config import TrainConfig

    def cfg(convention: str, g: int) -> TrainConfig:
        return TrainConfig(backend="torch", convention=convention, batch_size=16, bn_variant="ghost", ghost_batch_size=g)

    with pytest.raises(ValueError, match="ghost batch of 1 sample in a batch of 16"):
        cfg("pytorch", 5).check_ghost_split(160)
    with pytest.raises(ValueError, match="in a batch of 1 "):  # the last, shorter batch: 49 % 16 = 1
        cfg("pytorch", 4).check_ghost_split(49)
    cfg("pytorch", 4).check_ghost_split(50)      # 16 = 4 x 4, last batch 2: no one-sample ghost batch
    cfg("flax", 5).check_ghost_split(160)        # Flax allows n = 1 (spec §7.1)
