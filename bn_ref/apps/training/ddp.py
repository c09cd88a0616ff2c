"""Data-parallel PyTorch training: the launcher (``bn-ref train --backend torch --nproc N``) and
the worker processes it starts.

:func:`launch` (called by :func:`bn_ref.apps.training.train` when ``config.nproc > 1``):

1. loads and verifies the data once (a ``DataError`` is raised before anything starts), checks a
   ``--resume`` checkpoint against the run's settings (same errors as on one process), and saves
   the uint8 arrays and the run's spec (JSON) to a private temporary folder that the workers read;
2. starts N processes ``python -m bn_ref.apps.training.ddp SPEC`` with torchrun's environment:
   ``RANK``, ``LOCAL_RANK`` (0..N-1), ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` (N),
   ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` (a free port), and ``OMP_NUM_THREADS`` (the CPU
   count divided by N, unless already set);
3. waits for them; when one fails, it stops the others at once and raises :class:`WorkerError`
   with one line naming the rank, its exit status and its error (the traceback is kept in
   ``<out>/worker-<rank>.log``).

Each worker (:func:`worker_main`) joins the process group (``init_method="env://"``; gloo on
CPU, NCCL with GPU ``LOCAL_RANK`` on CUDA) with a timeout (``BN_REF_DIST_TIMEOUT`` seconds,
default 300), so a collective that hangs fails instead of waiting for ever, and runs the shared
epoch loop with :class:`bn_ref.apps.training.torch_backend.DistributedTrainer`; only rank 0 prints
and writes ``metrics.json``, ``curves.png`` and ``checkpoint.npz``.

Ctrl-C in the launcher stops the workers and raises
:class:`bn_ref.apps.training.loop.TrainingInterrupted` with the last epoch rank 0 saved.

The device: ``--device cpu`` uses gloo; ``cuda``/``gpu`` needs N visible GPUs (one per rank);
``auto`` takes the GPUs when there are at least N of them, else the CPU.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .batches import as_float, load_raw
from .checkpoint import FILENAME, CheckpointError, read_checkpoint
from .config import TrainConfig, trajectory_settings
from .fileio import make_out_dir
from .loop import (
    TrainingInterrupted,
    check_resume_settings,
    open_resume,
    read_resume_checkpoint,
    report_nothing_to_do,
    run_loop,
)

__all__ = ["WorkerError", "launch", "worker_main", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0


class WorkerError(RuntimeError):
    """A worker process of data-parallel training failed (the message is one line)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_device(config: Any) -> None:
    """``--device cuda``/``gpu`` with fewer than ``nproc`` GPUs: ValueError (before launching)."""
    if config.device in ("cuda", "gpu"):
        import torch

        have = torch.cuda.device_count()
        if have < config.nproc:
            raise ValueError(f"--device {config.device} --nproc {config.nproc}: needs one GPU per process; PyTorch sees {have}")


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def launch(config: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Run ``config`` on ``config.nproc`` worker processes; returns rank 0's metrics dict.

    Raises:
        DataError: the data are missing or corrupt (nothing is started or written).
        ValueError: too few GPUs for ``--device cuda``.
        WorkerError: a worker failed; the others are stopped.
    """
    _check_device(config)
    ckpt = read_resume_checkpoint(config) if config.resume else None
    raw, ds = load_raw(config)
    log(ds.describe())
    settings = trajectory_settings(config, ds.md5)
    start = 1
    if ckpt is not None:
        check_resume_settings(config, ckpt, settings, log)
        if ckpt.epoch >= config.epochs:
            return report_nothing_to_do(config, ckpt, log)
        start = ckpt.epoch + 1
    out = Path(config.out)
    tmp = Path(tempfile.mkdtemp(prefix="bn-ref-ddp-"))
    procs: list[subprocess.Popen] = []
    stderr_files: list[Any] = []
    t_start = time.time()
    try:
        np.savez(tmp / "data.npz", xtr=raw[0], ytr=raw[1], xte=raw[2], yte=raw[3])
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({"config": asdict(config), "data": str(tmp / "data.npz"), "settings": settings}))
        n = config.nproc
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            WORLD_SIZE=str(n),
            LOCAL_WORLD_SIZE=str(n),
            BN_REF_WORKER_ERRDIR=str(tmp),
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        for rank in range(n):
            # A worker's stderr goes to a file, not the console: when one worker fails and the others
            # are killed mid-collective, the C++ runtime's last words ("terminate called ...") would
            # otherwise interleave with the one-line error; they are kept in the worker's log.
            stderr_files.append(open(tmp / f"worker-{rank}.stderr", "w"))  # noqa: SIM115 - closed in finally
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bn_ref.apps.training.ddp", str(spec)],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdin=subprocess.DEVNULL,
                    stderr=stderr_files[-1],
                )
            )
        failed: tuple[int, int] | None = None
        try:
            while failed is None:
                codes = [p.poll() for p in procs]
                bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    failed = bad[0]
                elif all(c == 0 for c in codes):
                    break
                else:
                    time.sleep(0.1)
        except KeyboardInterrupt:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            raise TrainingInterrupted(_saved_epoch(out / FILENAME, t_start, start - 1), out / FILENAME) from None
        if failed is not None:
            rank, code = failed
            for p in procs:  # the others would wait in a collective until the timeout
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            for f in stderr_files:
                f.close()
            err, stderr_path = tmp / f"worker-{rank}.log", tmp / f"worker-{rank}.stderr"
            what = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            detail = _last_line(err) or _last_line(stderr_path)
            stderr_text = stderr_path.read_text(errors="replace") if stderr_path.is_file() else ""
            where = ""
            if err.is_file() or stderr_text.strip():
                make_out_dir(out)
                text = err.read_text(errors="replace") if err.is_file() else ""
                if stderr_text.strip():
                    text += "\n--- the worker's stderr ---\n" + stderr_text
                (out / err.name).write_text(text)
                where = f" (traceback in {out / err.name})"
            raise WorkerError(f"data-parallel worker rank {rank} of {n} failed ({what})" + (f": {detail}" if detail else "") + where)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in stderr_files:
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads((out / "metrics.json").read_text())


def _saved_epoch(path: Path, since: float, before: int) -> int:
    """The epoch in rank 0's checkpoint if it wrote one since ``since``; else ``before``."""
    try:
        if path.stat().st_mtime >= since:
            return read_checkpoint(path).epoch
    except (OSError, CheckpointError):
        pass
    return before


def _init_process_group(config: Any) -> tuple[int, int, Any]:
    import torch
    import torch.distributed as dist

    from .torch_backend import resolve_device

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(config.device)
    if config.device == "auto" and device.type == "cuda" and torch.cuda.device_count() < world:
        device = torch.device("cpu")  # too few GPUs for one per rank: gloo on the CPU
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get("BN_REF_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=timeout,
    )
    return rank, world, device


def worker_main(spec_path: str) -> int:
    """One worker process: join the group, train, leave. Returns the exit status."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        import torch.distributed as dist

        from .torch_backend import DistributedTrainer

        spec = json.loads(Path(spec_path).read_text())
        config = TrainConfig(**spec["config"])
        with np.load(spec["data"], allow_pickle=False) as z:
            data = as_float((z["xtr"], z["ytr"], z["xte"], z["yte"]))
        resume_from = open_resume(config, spec["settings"], lambda line: None) if config.resume else None
        rank, world, device = _init_process_group(config)
        try:
            main = rank == 0
            if not main:
                config.progress = False
            trainer = DistributedTrainer(config, rank, world, device)
            log = (lambda line: print(line, flush=True)) if main else (lambda line: None)
            run_loop(config, trainer, data, spec["settings"], log, resume_from=resume_from, main=main)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return 0
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher through the log file
        errdir = os.environ.get("BN_REF_WORKER_ERRDIR")
        text = traceback.format_exc() + f"\n{type(exc).__name__}: {exc}\n"
        if errdir:
            (Path(errdir) / f"worker-{rank}.log").write_text(text)
        else:
            sys.stderr.write(text)
        return 1


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
