"""The epoch loop shared by every trainer, and :func:`train`, which sets a run up and runs it.

A trainer (``torch_backend.Trainer``, ``flax_backend.Trainer``/``ShardedTrainer``, one rank's
``torch_backend.DistributedTrainer``) provides ``device_name``, ``setup(xtr, ytr, xte, yte)``,
``train_epoch(perm, progress) -> (loss_sum, correct)``, ``evaluate() -> accuracy``, and
``get_state()``/``load_state(arrays)`` over a flat dict of NumPy arrays (the checkpoint's).

Resume rules (``docs/checkpoints.md``): the checkpoint's trajectory settings must equal the run's
(:func:`bn_ref.apps.training.config.trajectory_settings`), or the run is refused with the list of
differences -- unless ``allow_changed_settings``, and never for a changed backend or BN kind.
``metrics.json`` and the checkpoint record the settings in force from each epoch on
(``segments``). A checkpoint that already holds ``epochs`` epochs leaves nothing to do: the run
says so and changes no file.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .batches import Arrays, as_float, epoch_permutation, load_raw
from .checkpoint import (
    FILENAME,
    LEGACY_FILENAME,
    Checkpoint,
    CheckpointError,
    check_state_fits,
    convert_hint,
    read_checkpoint,
    write_checkpoint,
)
from .config import STRUCTURAL_SETTINGS, TrainConfig, settings_differences, trajectory_settings
from .fileio import atomic_write_bytes, make_out_dir
from .plots import plot_curves
from .progress import Progress

__all__ = [
    "ResumeError",
    "TrainingInterrupted",
    "check_resume_settings",
    "make_trainer",
    "open_resume",
    "read_resume_checkpoint",
    "report_nothing_to_do",
    "run_loop",
    "train",
]

Log = Callable[[str], None]


class ResumeError(ValueError):
    """``--resume`` refused: no checkpoint, or one written with other settings (one line)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``saved_epoch`` is the last epoch in the checkpoint (0: none)."""

    def __init__(self, saved_epoch: int, path: Path) -> None:
        super().__init__(saved_epoch, path)
        self.saved_epoch, self.path = saved_epoch, path

    def line(self) -> str:
        if self.saved_epoch:
            return f"interrupted; the last saved epoch is {self.saved_epoch} ({self.path}; continue with --resume)"
        return f"interrupted before any epoch was saved (nothing written to {self.path})"


def checkpoint_path(config: TrainConfig) -> Path:
    return Path(config.out) / FILENAME


def read_resume_checkpoint(config: TrainConfig) -> Checkpoint:
    """``<out>/checkpoint.npz``, read and verified (before the data are loaded).

    Raises:
        ResumeError: no checkpoint.
        CheckpointError: the file is not a usable bn-ref checkpoint (e.g. a 0.1 pickle).
    """
    path = checkpoint_path(config)
    if not path.exists():
        legacy = path.with_name(LEGACY_FILENAME)
        if legacy.is_file():
            raise CheckpointError(convert_hint(legacy))
        raise ResumeError(f"--resume: no checkpoint at {path}")
    return read_checkpoint(path)


def check_resume_settings(config: TrainConfig, ckpt: Checkpoint, settings: Mapping[str, Any], log: Log) -> None:
    """Refuse to resume ``ckpt`` with trajectory ``settings`` other than its own.

    Raises:
        ResumeError: the differences, one line (a changed backend or BN kind even with
            ``allow_changed_settings``).
    """
    saved = ckpt.header["settings"]
    diffs = settings_differences(saved, settings)
    fixed = [d for d in diffs if d.split(":", 1)[0] in STRUCTURAL_SETTINGS]
    if fixed:
        raise ResumeError(f"--resume: {ckpt.path} cannot continue with another model: {'; '.join(fixed)}")
    if diffs and not config.allow_changed_settings:
        raise ResumeError(
            f"--resume: {ckpt.path} was written with other settings: {'; '.join(diffs)} "
            "(rerun with the checkpoint's settings, or pass --allow-changed-settings to continue with the new ones)"
        )
    if diffs:
        log(f"resuming with changed settings (from epoch {ckpt.epoch + 1}): {'; '.join(diffs)}")
    if "data" in saved and saved["data"] is None:
        log(f"note: {ckpt.path} does not record which data it was trained on (converted from 0.1)")


def open_resume(config: TrainConfig, settings: Mapping[str, Any], log: Log) -> Checkpoint:
    """:func:`read_resume_checkpoint` then :func:`check_resume_settings`."""
    ckpt = read_resume_checkpoint(config)
    check_resume_settings(config, ckpt, settings, log)
    return ckpt


def report_nothing_to_do(config: TrainConfig, ckpt: Checkpoint, log: Log) -> dict[str, Any]:
    """Say that ``ckpt`` already holds every epoch asked for; its metrics, no file changed."""
    log(
        f"nothing to do: {checkpoint_path(config)} already holds {ckpt.epoch} epoch(s) and --epochs is "
        f"{config.epochs} (raise --epochs to train further)"
    )
    return {"config": ckpt.header["config"], "segments": ckpt.header["segments"], "epochs": ckpt.header["epochs"]}


def make_trainer(config: TrainConfig) -> Any:
    """The single-process trainer for ``config`` (imports only the framework it needs)."""
    if config.backend == "torch":
        from .torch_backend import Trainer

        return Trainer(config)
    from .flax_backend import ShardedTrainer, Trainer

    return ShardedTrainer(config) if config.devices > 1 else Trainer(config)


def train(config: TrainConfig, *, log: Log | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the metrics dict also written to metrics.json.

    With ``config.nproc > 1`` (torch) this launches the worker processes and waits for them
    (raising :class:`bn_ref.apps.training.ddp.WorkerError` when one fails); with
    ``config.devices > 1`` (flax) it trains data-parallel over that many JAX devices.

    Raises (all before any file is written): ``ValueError`` for bad settings, ``DataError``,
    :class:`ResumeError`, :class:`CheckpointError`; :class:`TrainingInterrupted` on Ctrl-C.
    """
    config.validate()
    log = log or (lambda line: print(line, flush=True))
    if config.backend == "torch" and config.nproc > 1:
        from .ddp import launch

        return launch(config, log)
    ckpt = read_resume_checkpoint(config) if config.resume else None
    try:
        raw, ds = load_raw(config)  # raises DataError before anything is written
        config.check_ghost_split(len(raw[0]))
        log(ds.describe())
        settings = trajectory_settings(config, ds.md5)
        if ckpt is not None:
            check_resume_settings(config, ckpt, settings, log)
        if ckpt is not None and ckpt.epoch >= config.epochs:
            return report_nothing_to_do(config, ckpt, log)
        trainer = make_trainer(config)
        return run_loop(config, trainer, as_float(raw), settings, log, resume_from=ckpt)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:  # before the first epoch of this run finished
        raise TrainingInterrupted(ckpt.epoch if ckpt is not None else 0, checkpoint_path(config)) from None


def _framework() -> dict[str, str]:
    info = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "jax", "flax", "optax"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            info[name] = str(mod.__version__)
    return info


def run_loop(
    config: TrainConfig,
    trainer: Any,
    data: Arrays,
    settings: Mapping[str, Any],
    log: Log,
    *,
    resume_from: Checkpoint | None = None,
    main: bool = True,
) -> dict[str, Any]:
    """The epoch loop; only ``main`` (rank 0) writes files. ``resume_from`` was checked by
    :func:`open_resume` (its arrays are checked against this trainer's state here)."""
    xtr, ytr, xte, yte = data
    out = Path(config.out)
    ckpt_path = out / FILENAME
    trainer.setup(xtr, ytr, xte, yte)
    history: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    start = 1
    if resume_from is not None:
        check_state_fits(trainer.get_state(), resume_from.arrays, resume_from.path)
        trainer.load_state(resume_from.arrays)
        history = [dict(e) for e in resume_from.header["epochs"]]
        segments = [dict(s) for s in resume_from.header["segments"]]
        start = resume_from.epoch + 1
        log(f"resumed from {ckpt_path} after epoch {resume_from.epoch}")
    if not segments or segments[-1]["settings"] != dict(settings):
        segments.append({"first_epoch": start, "settings": dict(settings)})
    variant = ""
    if config.bn_variant != "plain":
        v = config.variant()
        variant = f" variant={config.bn_variant}" + (f"({v.ghost_batch_size})" if v is not None and v.ghost_batch_size else "")
    desc = f"{config.backend} bn={config.bn}{variant} convention={config.effective_convention} on {trainer.device_name}"
    log(f"training LeNet ({desc}); {len(xtr)} train / {len(xte)} test images, batch {config.batch_size}, lr {config.lr}")
    saved = start - 1
    try:
        for epoch in range(start, config.epochs + 1):
            perm = epoch_permutation(config.seed, epoch, len(xtr))
            bar = Progress(len(xtr), f"epoch {epoch}/{config.epochs}", config.progress)
            t0 = time.perf_counter()
            try:
                loss_sum, correct = trainer.train_epoch(perm, bar.update)
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
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
            if epoch == start:
                make_out_dir(out)
            header = {
                "config": config.as_json(),
                "settings": dict(settings),
                "segments": segments,
                "epoch": epoch,
                "epochs": history,
                "rng": {
                    "scheme": "epoch e shuffles with numpy.random.default_rng([seed, e]); initial weights from seed",
                    "seed": config.seed,
                    "next_epoch": epoch + 1,
                },
                "framework": {"backend": config.backend, **_framework()},
            }
            write_checkpoint(ckpt_path, header, trainer.get_state())
            saved = epoch
            metrics = {"config": config.as_json(), "segments": segments, "epochs": history}
            atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
            changes = [s["first_epoch"] for s in segments[1:]]
            if not plot_curves(history, out / "curves.png", f"LeNet-BN ({desc})", changes=changes) and epoch == start:
                log("matplotlib is not installed: no curves.png (pip install 'bn-ref[train]')")
    except KeyboardInterrupt:
        raise TrainingInterrupted(saved, ckpt_path) from None
    return {"config": config.as_json(), "segments": segments, "epochs": history}
