"""Persistent worker processes for the distributed adapters, driven over pipes with timeouts.

A distributed adapter starts its world of worker processes *once* (on its first case) and sends
them one request per case step; every wait has a deadline, so a hung collective or a dead
worker becomes an error for that case (the world is then shut down and restarted on the next
case) instead of hanging the run. :meth:`Worker.close` asks a worker to exit and kills it if it
does not.

Wire format (both directions): an 8-byte little-endian length, then a pickle. The worker side is
:func:`serve`: it keeps the real stdout for the protocol and points file descriptor 1 at stderr,
so library prints cannot corrupt the stream; it exits when stdin closes (the parent is gone).
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

__all__ = ["Worker", "WorkerError", "serve", "close_all", "pythonpath_env"]

_HEADER = struct.Struct("<Q")


class WorkerError(RuntimeError):
    """A worker timed out, died, or answered with an error."""


def pythonpath_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a worker: bn_ref importable from where this process imports it, one thread."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    pp = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=pp, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra or {})
    return env


class Worker:
    """One worker process: ``python -m MODULE ARGS...`` speaking the frame protocol on stdin/stdout."""

    def __init__(self, module: str, args: Sequence[str], env: dict[str, str], label: str) -> None:
        self.label = label
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env)
        self._buf = b""

    def log_tail(self, n: int = 1500) -> str:
        try:
            self._log.seek(0)
            text = self._log.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        return text[-n:].strip()

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=4)
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(_HEADER.pack(len(data)) + data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"{self.label}: cannot send (worker exited with {self.proc.poll()}): "
                              f"{exc}; log: {self.log_tail()}") from None

    def _read(self, n: int, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"{self.label}: no answer within the timeout (hung collective?); "
                                  f"log: {self.log_tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self.proc.poll()
                raise WorkerError(f"{self.label}: worker exited (status {self.proc.returncode}); "
                                  f"log: {self.log_tail()}")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv(self, deadline: float) -> Any:
        """The next answer, or :class:`WorkerError` past ``deadline`` (``time.monotonic()``)."""
        (n,) = _HEADER.unpack(self._read(_HEADER.size, deadline))
        return pickle.loads(self._read(n, deadline))

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit (close its stdin); kill it after ``timeout`` seconds."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._log.close()


def close_all(workers: Sequence[Worker], timeout: float = 10.0) -> None:
    """Close every worker: first all stdins (so they exit together), then wait / kill each."""
    for w in workers:
        try:
            if w.proc.poll() is None and w.proc.stdin is not None:
                w.proc.stdin.close()
        except OSError:
            pass
    for w in workers:
        w.close(timeout)


def gather(workers: Sequence[Worker], timeout: float) -> list[Any]:
    """One answer from every worker within ``timeout`` seconds; an error answer raises WorkerError."""
    deadline = time.monotonic() + timeout
    answers = [w.recv(deadline) for w in workers]
    errors = [(w.label, a["error"]) for w, a in zip(workers, answers) if "error" in a]
    if errors:
        raise WorkerError("; ".join(f"{label}: {msg}" for label, msg in errors))
    return [a["ok"] for a in answers]


def serve(handler: Callable[[Any], Any], hello: Any = "ready") -> None:
    """The worker loop: answer ``{"ok": handler(msg)}`` or ``{"error": ...}`` per message until stdin closes."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to the log, not into the protocol stream
    inp = sys.stdin.buffer

    def write(obj: Any) -> None:
        data = pickle.dumps(obj, protocol=4)
        out.write(_HEADER.pack(len(data)) + data)
        out.flush()

    write({"ok": hello})
    while True:
        head = inp.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return
        (n,) = _HEADER.unpack(head)
        msg = pickle.loads(inp.read(n))
        try:
            write({"ok": handler(msg)})
        except Exception as exc:  # noqa: BLE001 - reported to the parent as this case's error
            first = (str(exc).strip().splitlines() or [""])[0][:400]
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            write({"error": f"{type(exc).__name__}: {first}"})
