"""The application subcommands of ``bn-ref`` (wired up in ``bn_ref.__main__``): ``train``,
``port`` and ``convert-checkpoint``.

Exit status: 0 done (including "nothing to do"); 2 a bad argument, missing or corrupt data, an
unusable checkpoint, a refused resume, an output folder that does not exist -- one line on
stderr, and no file is changed; 1 a failed data-parallel worker (one line); 130 Ctrl-C (one line
naming the last saved epoch).

Data-parallel training: ``bn-ref train --backend torch --nproc N`` (N processes, DDP + bn-ref
SyncBatchNorm, gloo on CPU / NCCL on CUDA) and ``bn-ref train --backend flax --devices N`` (N JAX
devices). For ``--devices N`` on the CPU, JAX needs N host devices: when JAX is not yet imported,
``--xla_force_host_platform_device_count=N`` is added to ``XLA_FLAGS`` here (unless XLA_FLAGS
already sets a count); otherwise start Python with that flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .data import DataError
from .port import PortFileError
from .training.checkpoint import CheckpointError
from .training.config import BACKENDS, BN_KINDS, BN_VARIANTS, TrainConfig
from .training.fileio import OutputError, check_output_path
from .training.loop import ResumeError, TrainingInterrupted

__all__ = ["UsageError", "RunError", "train_main", "port_main", "convert_main", "parse_train_args"]

EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A bad argument or input: reported as one line, exit status 2."""


class RunError(Exception):
    """A run that failed after starting (e.g. a data-parallel worker): one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _run(fn: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    try:
        return fn(argv)
    except UsageError as exc:
        print(f"bn-ref: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"bn-ref: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"bn-ref: {exc.line()}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("bn-ref: interrupted (nothing was saved)", file=sys.stderr)
        return EXIT_INTERRUPTED


# -- train ----------------------------------------------------------------------------------------


def _train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bn-ref train", description="Train LeNet-BN on Fashion-MNIST (PyTorch or Flax).")
    p.add_argument("--backend", default="torch", help=f"one of {', '.join(BACKENDS)} (default torch)")
    p.add_argument("--bn", default="ref", help=f"one of {', '.join(BN_KINDS)}: bn-ref's layer, the framework's own, or none")
    p.add_argument("--convention", default=None, help="a preset name (default: the backend's framework)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or gpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder, created with its parents if missing (default runs/<backend>-<bn>)")
    p.add_argument(
        "--data-dir", default=None,
        help="the folder with the four IDX files, and the only one searched (else BN_REF_DATA, likewise; else the standard places)",
    )
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.npz (same settings required)")
    p.add_argument(
        "--allow-changed-settings", action="store_true",
        help="with --resume: accept settings that differ from the checkpoint's (metrics.json records them per epoch)",
    )
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1, help="torch: data-parallel over N processes (DDP + sync BN); --batch-size is global")
    p.add_argument("--devices", type=int, default=1, help="flax: data-parallel over N JAX devices; --batch-size is global")
    p.add_argument(
        "--bn-variant", default="plain",
        help=f"one of {', '.join(BN_VARIANTS)}: plain BN, Batch Renormalization (spec §13, rmax 3, dmax 5) or ghost batches (spec §14); needs --bn ref",
    )
    p.add_argument("--ghost-batch-size", type=int, default=None, help="with --bn-variant ghost: samples per ghost batch (default batch-size/4)")
    return p


def parse_train_args(argv: Sequence[str]) -> TrainConfig:
    """``bn-ref train`` arguments as a validated :class:`TrainConfig`; :class:`UsageError` otherwise.

    Reads the file system only to check that ``--data-dir`` exists; writes nothing.
    """
    args = _train_parser().parse_args(list(argv))
    if args.out is not None and not args.out.strip():
        raise UsageError("--out must name a folder; got an empty string")
    for flag, value in (("--out", args.out), ("--data-dir", args.data_dir)):
        if value is not None and "\x00" in value:
            raise UsageError(f"{flag} must be a path without NUL characters; got {value!r}")
    if args.allow_changed_settings and not args.resume:
        raise UsageError("--allow-changed-settings goes with --resume")
    config = TrainConfig(
        backend=args.backend,
        bn=args.bn,
        convention=args.convention,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        out=args.out or f"runs/{args.backend}-{args.bn}",
        data_dir=args.data_dir,
        resume=args.resume,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        progress=not args.no_progress and sys.stderr.isatty(),
        nproc=args.nproc,
        devices=args.devices,
        allow_changed_settings=args.allow_changed_settings,
        bn_variant=args.bn_variant,
        ghost_batch_size=args.ghost_batch_size,
    )
    try:
        config.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such folder")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    return config


def _host_devices_flag(n: int) -> None:
    """Ask JAX for ``n`` host CPU devices, when it is not imported yet and XLA_FLAGS sets no count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "jax" not in sys.modules and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def train_main(argv: Sequence[str]) -> int:
    """``bn-ref train ...``; returns the exit status (see the module docstring)."""
    return _run(_run_train, argv)


def _run_train(argv: Sequence[str]) -> int:
    config = parse_train_args(argv)
    if config.backend == "flax":
        _host_devices_flag(config.devices)
    from .training.ddp import WorkerError
    from .training.loop import train

    try:
        train(config)
    except WorkerError as exc:
        raise RunError(str(exc)) from exc
    except (ValueError, FileNotFoundError) as exc:  # DataError, CheckpointError, ResumeError, OutputError, settings
        raise UsageError(str(exc)) from exc
    return 0


# -- port -----------------------------------------------------------------------------------------


def _port_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bn-ref port", description="Convert LeNet-BN weights between PyTorch and Flax.")
    p.add_argument("--from", dest="src_backend", required=True, help="torch or flax")
    p.add_argument(
        "ckpt",
        help="a checkpoint.npz of `bn-ref train`, a .npz of arrays, or (torch) a torch.save'd state_dict; never a pickle",
    )
    p.add_argument("--to", dest="dst_backend", required=True, help="flax or torch")
    p.add_argument(
        "out",
        help="output file in an existing folder: a .npz of params/... and batch_stats/... arrays (flax) or a torch.save'd state_dict (torch)",
    )
    return p


def port_main(argv: Sequence[str]) -> int:
    """``bn-ref port --from torch CKPT --to flax OUT``; returns the exit status.

    With ``--template T`` any model is ported (:func:`bn_ref.porting.convert.main`: layers paired by
    order with shape checks or by ``--mapping``); without it, LeNet-BN checkpoints as below.
    """
    if "--template" in argv or any(a.startswith("--template=") for a in argv):
        from ..porting.convert import main as convert_main

        return convert_main(list(argv))
    return _run(_run_port, argv)


def _run_port(argv: Sequence[str]) -> int:
    from . import port

    args = _port_parser().parse_args(list(argv))
    pair = (args.src_backend, args.dst_backend)
    if pair not in (("torch", "flax"), ("flax", "torch")):
        raise UsageError(f"--from/--to must be torch→flax or flax→torch; got {args.src_backend}→{args.dst_backend}")
    out = Path(args.out)
    try:
        check_output_path(out)
        src = port.read_weights(Path(args.ckpt), args.src_backend)
        converted: Any = port.torch_to_flax(src) if pair == ("torch", "flax") else port.flax_to_torch(src)
        port.write_weights(out, args.dst_backend, converted)
    except (OutputError, PortFileError) as exc:
        raise UsageError(str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{args.ckpt}: {exc}") from None
    print(f"wrote {out} ({args.dst_backend})")
    return 0


# -- convert-checkpoint ---------------------------------------------------------------------------


def _convert_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bn-ref convert-checkpoint",
        description="Convert a bn-ref 0.1 pickle checkpoint (checkpoint.pkl) to the current format (checkpoint.npz).",
    )
    p.add_argument("old", help="the 0.1 checkpoint.pkl")
    p.add_argument("new", help="the new checkpoint file, in an existing folder (e.g. runs/x/checkpoint.npz); must not exist")
    p.add_argument(
        "--trust-pickle", action="store_true",
        help="required: unpickle OLD, which runs any code it holds -- only for a file you wrote yourself",
    )
    return p


def convert_main(argv: Sequence[str]) -> int:
    """``bn-ref convert-checkpoint --trust-pickle OLD NEW``; returns the exit status."""
    return _run(_run_convert, argv)


def _run_convert(argv: Sequence[str]) -> int:
    from .training.convert import convert_legacy

    args = _convert_parser().parse_args(list(argv))
    if not args.trust_pickle:
        raise UsageError(
            f"{args.old}: refusing to unpickle without --trust-pickle (unpickling runs any code the file holds; "
            "pass it only for a checkpoint you wrote yourself)"
        )
    new = Path(args.new)
    try:
        check_output_path(new)
        if new.exists():
            raise UsageError(f"{new}: exists; choose a new file name")
        epoch = convert_legacy(Path(args.old), new)
    except (OutputError, CheckpointError, DataError, ResumeError) as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {new} (epoch {epoch})")
    return 0
