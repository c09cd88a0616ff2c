"""LeNet-BN on Fashion-MNIST, in PyTorch or Flax: the book's experiment as a library call.

:func:`train` runs ``config.epochs`` epochs of SGD on the whole training set and evaluates on the
test set after each, writing to ``config.out``:

* ``metrics.json`` -- ``{"config": {...}, "epochs": [{"epoch", "train_loss", "train_acc",
  "test_acc", "images_per_s", "seconds"}, ...]}``;
* ``curves.png`` -- loss and accuracy per epoch (when matplotlib is installed);
* ``checkpoint.pkl`` -- everything needed to continue (model, optimizer, epoch, metrics), written
  atomically after every epoch; ``config.resume`` continues from it.

Determinism: the epoch-``e`` shuffle is drawn from ``numpy.random.default_rng([seed, e])`` and the
initial weights from ``seed``, so a resumed run repeats exactly what an uninterrupted run does
(bit for bit on CPU).

The whole dataset is moved to the device once; metrics are accumulated on the device and read
once per epoch (no per-step host synchronisation).

Data-parallel training (``docs/spec.md`` §11) -- the same run as single-device training, to float32
round-off, on several processes or devices:

* ``config.nproc = N`` (``backend="torch"``, CLI ``--nproc N``): :func:`train` launches N worker
  processes with torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``), gloo on CPU and NCCL on CUDA (one GPU per
  rank). Each rank builds the same model from ``seed``, converts its BN layers with
  :func:`bn_ref.torch.convert_sync_batchnorm` (exact count-weighted global statistics) and wraps it
  in ``DistributedDataParallel``; see :mod:`bn_ref.training._ddp`.
* ``config.devices = N`` (``backend="flax"``, CLI ``--devices N``): one process, a 1-D device mesh
  of N JAX devices; an epoch runs in ``jax.shard_map``, BN layers use ``axis_name`` and ``mask``;
  see :class:`bn_ref.training._flax.ShardedTrainer`.

``batch_size`` is the *global* batch in both. Each global batch (the same epoch permutation as on
one device) of B images is split into N contiguous shards of ``ceil(B / N)`` images (the last
shards shorter, possibly empty, on the last batch of an epoch). Each shard's loss is the *sum* of
its per-sample losses divided by B, so the gradients summed over shards equal the gradient of
the mean loss over the global batch (DDP averages over ranks, hence its loss is multiplied by N).
Metrics are reduced over ranks/devices once per epoch; only rank 0 logs and writes the outputs
(same formats; ``config`` records ``nproc``/``devices``).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import data as data_mod
from ..conventions import PRESETS

__all__ = ["TrainConfig", "train", "BACKENDS", "BN_KINDS", "default_convention", "atomic_write_bytes"]

BACKENDS = ("torch", "flax")
BN_KINDS = ("ref", "native", "none")


def default_convention(backend: str) -> str:
    """The convention a backend uses when none is given: its framework's own."""
    return "pytorch" if backend == "torch" else "flax"


@dataclass
class TrainConfig:
    """One training run. ``limit_train``/``limit_test`` use the first images only (for quick runs)."""

    backend: str = "torch"
    bn: str = "ref"
    convention: str | None = None
    epochs: int = 10
    lr: float = 1.0
    batch_size: int = 256
    device: str = "auto"
    seed: int = 0
    out: str = "runs/lenet"
    data_dir: str | None = None
    resume: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    progress: bool = True
    nproc: int = 1
    devices: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Reject bad settings with one clear message each (before anything is written)."""
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.bn not in BN_KINDS:
            raise ValueError(f"--bn must be one of {', '.join(BN_KINDS)}; got {self.bn!r}")
        if self.convention is not None and self.convention not in PRESETS:
            raise ValueError(f"--convention must be one of {', '.join(PRESETS)}; got {self.convention!r}")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ValueError(f"--epochs must be an integer >= 1; got {self.epochs!r}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"--lr must be a finite number > 0; got {self.lr!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 2):
            raise ValueError(f"--batch-size must be an integer >= 2; got {self.batch_size!r}")
        if self.device not in ("auto", "cpu", "cuda", "gpu"):
            raise ValueError(f"--device must be one of auto, cpu, cuda, gpu; got {self.device!r}")
        for name, flag in (("nproc", "--nproc"), ("devices", "--devices")):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{flag} must be an integer >= 1; got {v!r}")
        if self.nproc > 1 and self.backend != "torch":
            raise ValueError(f"--nproc is for --backend torch (use --devices N with flax); got --nproc {self.nproc}")
        if self.devices > 1 and self.backend != "flax":
            raise ValueError(f"--devices is for --backend flax (use --nproc N with torch); got --devices {self.devices}")
        for name in ("limit_train", "limit_test"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 2):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 2; got {v!r}")

    @property
    def effective_convention(self) -> str:
        return self.convention or default_convention(self.backend)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["convention"] = self.effective_convention
        d.pop("progress")
        return d


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.enabled, self.t0 = total, label, enabled and total > 0, time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        frac = done / self.total
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * int(25 * frac):<25}] {done}/{self.total} images {rate:,.0f}/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


def plot_curves(epochs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Loss and accuracies per epoch as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [e["epoch"] for e in epochs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [e["train_loss"] for e in epochs], "o-", label="train loss")
    ax.plot(xs, [e["train_acc"] for e in epochs], "s--", label="train acc")
    ax.plot(xs, [e["test_acc"] for e in epochs], "^-.", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _load_raw(config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (train images, train labels, test images, test labels), cut to the limits."""
    ds = data_mod.load_fashion_mnist(config.data_dir)
    xtr, ytr, xte, yte = ds.train_images, ds.train_labels, ds.test_images, ds.test_labels
    if config.limit_train:
        xtr, ytr = xtr[: config.limit_train], ytr[: config.limit_train]
    if config.limit_test:
        xte, yte = xte[: config.limit_test], yte[: config.limit_test]
    return xtr, ytr, xte, yte


def _as_float(raw: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    xtr, ytr, xte, yte = raw
    return data_mod.to_float(xtr), ytr.astype(np.int32), data_mod.to_float(xte), yte.astype(np.int32)


def _load_data(config: TrainConfig):
    return _as_float(_load_raw(config))


def shard_bounds(batch: int, nshards: int, shard: int) -> tuple[int, int]:
    """``[lo, hi)`` of shard ``shard`` of a global batch of ``batch`` samples split ``nshards`` ways.

    Contiguous shards of ``ceil(batch / nshards)`` samples; the last ones shorter or empty.
    """
    size = -(-batch // nshards)
    return min(shard * size, batch), min((shard + 1) * size, batch)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffle of epoch ``epoch`` (1-based): a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _backend(config: TrainConfig):
    if config.backend == "torch":
        from . import _torch as mod

        return mod.Trainer(config)
    from . import _flax as mod

    return mod.ShardedTrainer(config) if config.devices > 1 else mod.Trainer(config)


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the metrics dict also written to metrics.json.

    With ``config.nproc > 1`` (torch) this launches the worker processes and waits for them
    (raising :class:`bn_ref.training._ddp.WorkerError` when one fails); with
    ``config.devices > 1`` (flax) it trains data-parallel over that many JAX devices.
    """
    config.validate()
    log = log or (lambda line: print(line, flush=True))
    if config.backend == "torch" and config.nproc > 1:
        from ._ddp import launch

        return launch(config, log)
    data = _load_data(config)  # raises DataError before anything is written
    trainer = _backend(config)
    return _loop(config, trainer, data, log)


def _loop(config: TrainConfig, trainer: Any, data: tuple[np.ndarray, ...], log: Callable[[str], None], *, main: bool = True) -> dict[str, Any]:
    """The epoch loop shared by every trainer; only ``main`` (rank 0) writes files."""
    xtr, ytr, xte, yte = data
    out = Path(config.out)
    ckpt_path = out / "checkpoint.pkl"
    trainer.setup(xtr, ytr, xte, yte)
    history: list[dict[str, Any]] = []
    start = 1
    if config.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = pickle.loads(ckpt_path.read_bytes())
        if ckpt["config"]["backend"] != config.backend or ckpt["config"]["bn"] != config.bn:
            raise ValueError(f"--resume: {ckpt_path} was written by a {ckpt['config']['backend']}/{ckpt['config']['bn']} run")
        trainer.load_state(ckpt["state"])
        history = list(ckpt["epochs"])
        start = ckpt["epoch"] + 1
        log(f"resumed from {ckpt_path} after epoch {ckpt['epoch']}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
    desc = f"{config.backend} bn={config.bn} convention={config.effective_convention} on {trainer.device_name}"
    log(f"training LeNet ({desc}); {len(xtr)} train / {len(xte)} test images, batch {config.batch_size}, lr {config.lr}")
    for epoch in range(start, config.epochs + 1):
        perm = epoch_permutation(config.seed, epoch, len(xtr))
        bar = Progress(len(xtr), f"epoch {epoch}/{config.epochs}", config.progress)
        t0 = time.perf_counter()
        loss_sum, correct = trainer.train_epoch(perm, bar.update)
        seconds = time.perf_counter() - t0
        bar.close()
        test_acc = trainer.evaluate()
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / len(xtr),
            "train_acc": correct / len(xtr),
            "test_acc": test_acc,
            "images_per_s": len(xtr) / seconds,
            "seconds": seconds,
        }
        history.append(row)
        log(
            f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
            f"test acc {row['test_acc']:.4f}  {row['images_per_s']:,.0f} images/s"
        )
        if not main:
            continue
        metrics = {"config": config.as_json(), "epochs": history}
        ckpt = {"config": config.as_json(), "epoch": epoch, "epochs": history, "state": trainer.get_state()}
        atomic_write_bytes(ckpt_path, pickle.dumps(ckpt))
        atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
        if not plot_curves(history, out / "curves.png", f"LeNet ({desc})") and epoch == start:
            log("matplotlib is not installed: no curves.png (pip install 'bn-ref[train]')")
    return {"config": config.as_json(), "epochs": history}
