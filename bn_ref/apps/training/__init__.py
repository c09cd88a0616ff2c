"""LeNet-BN on Fashion-MNIST, in PyTorch or Flax: the book's experiment as a library call.

:func:`train` runs ``config.epochs`` epochs of SGD on the whole training set and evaluates on the
test set after each, writing to ``config.out``:

* ``metrics.json`` -- ``{"config": {...}, "epochs": [{"epoch", "train_loss", "train_acc",
  "test_acc", "images_per_s", "seconds"}, ...]}``;
* ``curves.png`` -- loss and accuracy per epoch (when matplotlib is installed);
* ``checkpoint.npz`` -- everything needed to continue (model, optimizer, epoch, settings, RNG
  state, metrics) in a framework-neutral format that reading never unpickles
  (:mod:`~bn_ref.apps.training.checkpoint`, ``docs/checkpoints.md``), written atomically after
  every epoch; ``config.resume`` continues from it when the settings match
  (:mod:`~bn_ref.apps.training.loop`).

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
  in ``DistributedDataParallel``; see :mod:`bn_ref.apps.training.ddp`.
* ``config.devices = N`` (``backend="flax"``, CLI ``--devices N``): one process, a 1-D device mesh
  of N JAX devices; an epoch runs in ``jax.shard_map``, BN layers use ``axis_name`` and ``mask``;
  see :class:`bn_ref.apps.training.flax_backend.ShardedTrainer`.

``batch_size`` is the *global* batch in both. Each global batch (the same epoch permutation as on
one device) of B images is split into N contiguous shards of ``ceil(B / N)`` images (the last
shards shorter, possibly empty, on the last batch of an epoch). Each shard's loss is the *sum* of
its per-sample losses divided by B, so the gradients summed over shards equal the gradient of
the mean loss over the global batch (DDP averages over ranks, hence its loss is multiplied by N).
Metrics are reduced over ranks/devices once per epoch; only rank 0 logs and writes the outputs
(same formats; ``config`` records ``nproc``/``devices``).

Modules, by concern: :mod:`.config` (settings, validation, the trajectory settings resume
compares), :mod:`.loop` (the epoch loop and :func:`train`), :mod:`.checkpoint` and :mod:`.fileio`
(the checkpoint format, atomic writes, the output-folder rule), :mod:`.batches` (data loading
for a run, the epoch shuffle, shard arithmetic), :mod:`.progress`, :mod:`.plots`, the trainers
:mod:`.torch_backend` and :mod:`.flax_backend`, the launcher :mod:`.ddp`. This package's
``__init__`` only re-exports; no submodule imports from it.
"""

from __future__ import annotations

from .batches import epoch_permutation, shard_bounds
from .checkpoint import Checkpoint, CheckpointError, read_checkpoint, write_checkpoint
from .config import BACKENDS, BN_KINDS, TrainConfig, default_convention, settings_differences, trajectory_settings
from .fileio import OutputError, atomic_write_bytes
from .loop import ResumeError, TrainingInterrupted, train
from .plots import plot_curves

__all__ = [
    "BACKENDS",
    "BN_KINDS",
    "Checkpoint",
    "CheckpointError",
    "OutputError",
    "ResumeError",
    "TrainConfig",
    "TrainingInterrupted",
    "atomic_write_bytes",
    "default_convention",
    "epoch_permutation",
    "plot_curves",
    "read_checkpoint",
    "settings_differences",
    "shard_bounds",
    "train",
    "trajectory_settings",
    "write_checkpoint",
]
