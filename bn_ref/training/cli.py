"""The ``train`` and ``port`` subcommands of ``bn-ref`` (wired up in ``bn_ref.__main__``).

Bad arguments give one line on stderr and exit status 2, and nothing is written. A failed worker
of data-parallel training (``--nproc N``) gives one line and exit status 1.

Data-parallel training: ``bn-ref train --backend torch --nproc N`` (N processes, DDP + bn-ref
SyncBatchNorm, gloo on CPU / NCCL on CUDA) and ``bn-ref train --backend flax --devices N`` (N JAX
devices). For ``--devices N`` on the CPU, JAX needs N host devices: when JAX is not yet imported,
``--xla_force_host_platform_device_count=N`` is added to ``XLA_FLAGS`` here (unless XLA_FLAGS
already sets a count); otherwise start Python with that flag.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Any, Sequence

from . import BACKENDS, BN_KINDS, TrainConfig, atomic_write_bytes

__all__ = ["train_main", "port_main", "UsageError"]


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


class RunError(Exception):
    """A run that failed after starting (e.g. a data-parallel worker): one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _one_line_errors(fn, argv: Sequence[str]) -> int:
    try:
        return fn(argv)
    except UsageError as exc:
        print(f"bn-ref: error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"bn-ref: error: {exc}", file=sys.stderr)
        return 1


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
    p.add_argument("--out", default=None, help="output folder (default runs/<backend>-<bn>)")
    p.add_argument("--data-dir", default=None, help="folder with the four IDX files (else BN_REF_DATA, then the standard places)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pkl")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1, help="torch: data-parallel over N processes (DDP + sync BN); --batch-size is global")
    p.add_argument("--devices", type=int, default=1, help="flax: data-parallel over N JAX devices; --batch-size is global")
    return p


def _host_devices_flag(n: int) -> None:
    """Ask JAX for ``n`` host CPU devices, when it is not imported yet and XLA_FLAGS sets no count."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "jax" not in sys.modules and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def train_main(argv: Sequence[str]) -> int:
    """``bn-ref train ...``; returns the exit status (2 for bad arguments or missing data)."""
    return _one_line_errors(_run_train, argv)


def _run_train(argv: Sequence[str]) -> int:
    from .. import data
    from . import train

    args = _train_parser().parse_args(list(argv))
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
    )
    from ._ddp import WorkerError

    try:
        config.validate()
        if args.data_dir is not None and not Path(args.data_dir).is_dir():
            raise UsageError(f"--data-dir {args.data_dir}: no such folder")
        if config.backend == "flax":
            _host_devices_flag(config.devices)
        train(config)
    except WorkerError as exc:
        raise RunError(str(exc)) from exc
    except (ValueError, UsageError, FileNotFoundError, data.DataError) as exc:
        raise UsageError(str(exc)) from exc
    return 0


def _port_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bn-ref port", description="Convert a LeNet-BN checkpoint between PyTorch and Flax.")
    p.add_argument("--from", dest="src_backend", required=True, help="torch or flax")
    p.add_argument("ckpt", help="a checkpoint.pkl of `bn-ref train`, a torch.save'd state_dict, or a pickled Flax variables dict")
    p.add_argument("--to", dest="dst_backend", required=True, help="flax or torch")
    p.add_argument("out", help="output file: a pickled {'params','batch_stats'} dict (flax) or a torch.save'd state_dict (torch)")
    return p


def _load_checkpoint(path: Path, backend: str) -> Any:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        obj = pickle.loads(raw)
    except Exception:
        if backend != "torch":
            raise UsageError(f"{path}: not a pickled checkpoint") from None
        import io

        import torch

        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state" in obj and "config" in obj:  # a `bn-ref train` checkpoint
        if obj["config"]["backend"] != backend:
            raise UsageError(f"{path} was written by a {obj['config']['backend']} run, not {backend}")
        state = obj["state"]
        return state["model"] if backend == "torch" else {"params": state["params"], "batch_stats": state["stats"]}
    return obj


def port_main(argv: Sequence[str]) -> int:
    """``bn-ref port --from torch CKPT --to flax OUT``; returns the exit status."""
    return _one_line_errors(_run_port, argv)


def _run_port(argv: Sequence[str]) -> int:
    from .. import port

    args = _port_parser().parse_args(list(argv))
    pair = (args.src_backend, args.dst_backend)
    if pair not in (("torch", "flax"), ("flax", "torch")):
        raise UsageError(f"--from/--to must be torch→flax or flax→torch; got {args.src_backend}→{args.dst_backend}")
    src = _load_checkpoint(Path(args.ckpt), args.src_backend)
    try:
        if pair == ("torch", "flax"):
            payload = pickle.dumps(port.torch_to_flax(src))
        else:
            import io

            import torch

            buf = io.BytesIO()
            torch.save(port.flax_to_torch(src), buf)
            payload = buf.getvalue()
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{args.ckpt}: {exc}") from exc
    atomic_write_bytes(Path(args.out), payload)
    print(f"wrote {args.out} ({args.dst_backend})")
    return 0
