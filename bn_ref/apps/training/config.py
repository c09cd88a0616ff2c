"""One training run's settings: :class:`TrainConfig`, its validation, and the settings that fix the
trajectory (what ``--resume`` compares with the checkpoint; see ``docs/checkpoints.md``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from ...conventions import PRESETS

if TYPE_CHECKING:
    from ...variants import Variant

__all__ = [
    "BACKENDS",
    "BN_KINDS",
    "BN_VARIANTS",
    "STRUCTURAL_SETTINGS",
    "TrainConfig",
    "default_convention",
    "settings_differences",
    "trajectory_settings",
]

BACKENDS = ("torch", "flax")
BN_KINDS = ("ref", "native", "none")
BN_VARIANTS = ("plain", "renorm", "ghost")
"""``--bn-variant``: plain BN, Batch Renormalization (spec §13) or ghost batches (spec §14)."""
RENORM_RMAX = 3.0
RENORM_DMAX = 5.0
"""The clipping LeNet-BN trains Batch Renormalization with: the final values of the paper's schedule
(Ioffe 2017, §4), held fixed from the first step."""
DEFAULT_GHOST_DIVISOR = 4
"""``--bn-variant ghost`` without ``--ghost-batch-size`` splits each batch into this many ghost batches."""
STRUCTURAL_SETTINGS = ("backend", "bn")
"""Settings a resumed run can never change: the saved state only fits the model they build."""


def default_convention(backend: str) -> str:
    """The convention a backend uses when none is given: its framework's own."""
    return "pytorch" if backend == "torch" else "flax"


@dataclass
class TrainConfig:
    """One training run. ``limit_train``/``limit_test`` use the first images only (for quick runs).

    ``resume`` continues from ``<out>/checkpoint.npz``; it refuses a checkpoint written with
    other trajectory settings (:func:`trajectory_settings`) unless ``allow_changed_settings``.
    """

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
    allow_changed_settings: bool = False
    bn_variant: str = "plain"
    ghost_batch_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Reject bad settings with one clear message each (before anything is written)."""
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.bn not in BN_KINDS:
            raise ValueError(f"--bn must be one of {', '.join(BN_KINDS)}; got {self.bn!r}")
        if self.convention is not None and self.convention not in PRESETS:
            raise ValueError(f"--convention must be one of {', '.join(PRESETS)}; got {self.convention!r}")
        if not (_is_int(self.epochs) and self.epochs >= 1):
            raise ValueError(f"--epochs must be an integer >= 1; got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0; got {self.lr!r}")
        if not (_is_int(self.batch_size) and self.batch_size >= 2):
            raise ValueError(f"--batch-size must be an integer >= 2; got {self.batch_size!r}")
        if self.device not in ("auto", "cpu", "cuda", "gpu"):
            raise ValueError(f"--device must be one of auto, cpu, cuda, gpu; got {self.device!r}")
        if not _is_int(self.seed):
            raise ValueError(f"--seed must be an integer; got {self.seed!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2**63); got {self.seed!r}")
        for name, flag in (("nproc", "--nproc"), ("devices", "--devices")):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 1):
                raise ValueError(f"{flag} must be an integer >= 1; got {v!r}")
        if self.nproc > 1 and self.backend != "torch":
            raise ValueError(f"--nproc is for --backend torch (use --devices N with flax); got --nproc {self.nproc}")
        if self.devices > 1 and self.backend != "flax":
            raise ValueError(f"--devices is for --backend flax (use --nproc N with torch); got --devices {self.devices}")
        for name in ("limit_train", "limit_test"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 2):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 2; got {v!r}")
        if self.bn_variant not in BN_VARIANTS:
            raise ValueError(f"--bn-variant must be one of {', '.join(BN_VARIANTS)}; got {self.bn_variant!r}")
        if self.bn_variant != "plain" and self.bn != "ref":
            raise ValueError(f"--bn-variant {self.bn_variant} needs --bn ref (bn-ref's layers); got --bn {self.bn}")
        if self.bn_variant != "plain" and (self.nproc > 1 or self.devices > 1):
            raise ValueError(f"--bn-variant {self.bn_variant} runs on one process and one device; got --nproc {self.nproc} --devices {self.devices}")
        if self.ghost_batch_size is not None:
            if self.bn_variant != "ghost":
                raise ValueError(f"--ghost-batch-size goes with --bn-variant ghost; got --bn-variant {self.bn_variant}")
            if not (_is_int(self.ghost_batch_size) and 2 <= self.ghost_batch_size <= self.batch_size):
                raise ValueError(
                    f"--ghost-batch-size must be an integer in [2, --batch-size={self.batch_size}]; got {self.ghost_batch_size!r}"
                )

    def variant(self) -> Variant | None:
        """The :class:`~bn_ref.variants.Variant` the BN layers train with; None for plain BN.

        ``renorm``: ``Variant(renorm=True, rmax=3, dmax=5)`` (:data:`RENORM_RMAX`, :data:`RENORM_DMAX`);
        ``ghost``: ``Variant(ghost_batch_size=g)`` with ``g = --ghost-batch-size`` or
        ``max(2, batch_size // 4)`` (:data:`DEFAULT_GHOST_DIVISOR`).
        """
        from ...variants import Variant

        if self.bn_variant == "renorm":
            return Variant(renorm=True, rmax=RENORM_RMAX, dmax=RENORM_DMAX)
        if self.bn_variant == "ghost":
            g = self.ghost_batch_size or max(2, self.batch_size // DEFAULT_GHOST_DIVISOR)
            return Variant(ghost_batch_size=g)
        return None

    def check_ghost_split(self, n_train: int) -> None:
        """Reject a ghost split that leaves a one-sample ghost batch under a convention for which
        n = 1 is an error (spec §7.1, §14.1) -- before training starts, not in the last step.

        LeNet's fully connected BN layers reduce over the samples only, so a trailing ghost batch of
        one sample (``batch % g == 1``, or the epoch's last, shorter batch) has n = 1.
        """
        from ...conventions import get_convention

        variant = self.variant()
        if variant is None or variant.ghost_batch_size is None:
            return
        g = variant.ghost_batch_size
        convention = get_convention(self.effective_convention)
        for b in sorted({self.batch_size, n_train % self.batch_size} - {0}):
            if b % g and convention.rejects_batch(b % g, training=True):
                raise ValueError(
                    f"--ghost-batch-size {g} leaves a ghost batch of 1 sample in a batch of {b} "
                    f"({n_train} training images, --batch-size {self.batch_size}); convention "
                    f"{convention.name!r} rejects n = 1 (spec §7.1): choose another ghost batch size"
                )

    @property
    def effective_convention(self) -> str:
        return self.convention or default_convention(self.backend)

    def as_json(self) -> dict[str, Any]:
        """The settings as written to ``metrics.json`` and the checkpoint header (no ``progress``)."""
        d = asdict(self)
        d["convention"] = self.effective_convention
        d.pop("progress")
        return d


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def trajectory_settings(config: TrainConfig, data_md5: Mapping[str, str] | None) -> dict[str, Any]:
    """Every setting that changes what training computes, as JSON values.

    ``data_md5`` is the MD5 of each data file's decompressed content (the data themselves, not the
    folder they were read from). ``device`` and ``epochs`` are not included: the device changes
    only the round-off of the same computation (as ``nproc``/``devices`` do, but those are
    compared, since they change how every batch is split), and a resumed run may extend
    ``epochs``. bn-ref's training CLI has no separate eps/momentum flags: they come with the
    convention preset; ``extra`` holds any further settings and is compared as a whole.
    """
    return {
        "backend": config.backend,
        "bn": config.bn,
        "convention": config.effective_convention,
        "lr": float(config.lr),
        "batch_size": config.batch_size,
        "seed": config.seed,
        "limit_train": config.limit_train,
        "limit_test": config.limit_test,
        "nproc": config.nproc,
        "devices": config.devices,
        "bn_variant": config.bn_variant,
        "ghost_batch_size": config.ghost_batch_size,
        "extra": dict(config.extra),
        "data": dict(sorted(data_md5.items())) if data_md5 is not None else None,
    }


def settings_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["lr: 1.0 in the checkpoint, 0.5 now", ...]`` for every trajectory setting that differs.

    A setting the checkpoint did not record (None for ``data`` in a converted 0.1 checkpoint, or
    absent) is not a difference.
    """
    diffs = []
    for key in current:
        if key not in saved or (key == "data" and saved[key] is None):
            continue
        if saved[key] != current[key]:
            if key == "data":
                diffs.append("data: other file contents (MD5 of the data files differ)")
            else:
                diffs.append(f"{key}: {saved[key]!r} in the checkpoint, {current[key]!r} now")
    return diffs
