"""Third-party adapters run isolated: one worker process per factory, every call under a time limit.

``python -m bn_ref.conformance --adapter package.module:factory`` loads a factory the harness does
not know. Its adapters may crash the interpreter (a segfault in an extension, ``os._exit``), hang,
or need a framework that is not installed; none of that may take the run with it. So the factory
is imported and called in a worker process (:func:`main`, speaking the frame protocol of
:mod:`._workers`), and the engine, in the parent, drives a stand-in per adapter
(:class:`IsolatedAdapter`) whose ``run(case)`` and ``skip(case)`` are requests to that worker:

* an exception raised by the adapter comes back as an exception of the same type name and
  message (for the ``errors`` group, raising is the expected outcome);
* a worker that dies (signal or exit status) or does not answer within ``timeout`` seconds is
  killed; that call raises :class:`AdapterCrashed`, so the case is that row's ERROR, and the next
  call starts a fresh worker. After a hang, or after :data:`MAX_CRASHES` crashes in a row, the
  adapter is abandoned: its remaining calls fail at once, saying why (a hang would otherwise cost
  the time limit again on every case);
* a factory whose import needs a module that is not installed (other than the adapter's own
  package) makes the row *skip*, naming the module; any other failure to load is an error row.

Outputs are converted to float64 NumPy arrays in the worker (see :func:`.base.numpy_out`), so the
parent never needs the adapter's framework.
"""

from __future__ import annotations

import builtins
import os
import signal
import sys
import traceback
from typing import Any

from ._workers import Worker, WorkerError, pythonpath_env, serve

__all__ = ["AdapterCrashed", "IsolatedAdapter", "IsolatedFactory", "MAX_CRASHES", "main"]

MAX_CRASHES = 3
"""Consecutive crashes after which an isolated adapter is abandoned for the rest of the run."""

MODULE = "bn_ref.conformance.adapters._isolated"


class AdapterCrashed(RuntimeError):
    """The worker running an isolated adapter died or did not answer in time."""


def _remote_exception(type_name: str, message: str) -> Exception:
    """An exception of the adapter's type name (the builtin type when it is one)."""
    cls = getattr(builtins, type_name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - an exception type with another signature
            pass
    return type(type_name, (Exception,), {"__module__": "isolated_adapter"})(message)


def _raise_at(exc: Exception, filename: str, lineno: int) -> None:
    """Raise ``exc`` from a frame that carries the adapter's own file and line (where it raised in
    the worker), so that a report's "(at file:line)" points into the adapter, not into this module."""
    code = compile("\n" * max(0, int(lineno) - 1) + "raise exc", filename or "<adapter>", "exec")
    exec(code, {"exc": exc})


def _user_sys_path() -> str:
    """The parent's import path entries outside the interpreter's own (user code, tests, cwd)."""
    prefixes = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    keep = []
    for p in sys.path:
        full = os.path.realpath(p or os.getcwd())
        if not full.startswith(prefixes) and full not in keep:
            keep.append(full)
    return os.pathsep.join(keep + [os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)


def _death(worker: Worker) -> str:
    """How the worker ended, in words."""
    code = worker.proc.poll()
    if code is None:
        return "did not answer"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class IsolatedFactory:
    """One third-party factory in its own worker process (restarted after a crash)."""

    def __init__(self, spec: str, timeout: float) -> None:
        self.spec = spec
        self.timeout = float(timeout)
        self.worker: Worker | None = None
        self.abandoned: str | None = None
        self.crashes = 0
        self.crashed_steps: dict[str, str] = {}
        """Step id -> why the worker died on it (a crash is never a correct "raise")."""

    # -- the worker's life ------------------------------------------------------------------------

    def _start(self) -> dict[str, Any]:
        env = pythonpath_env({"PYTHONPATH": _user_sys_path()})
        env.pop("OMP_NUM_THREADS", None)  # a third-party framework keeps its own threading
        env.pop("MKL_NUM_THREADS", None)
        w = Worker(MODULE, [self.spec], env, label=f"adapter worker for {self.spec}")
        self.worker = w
        try:
            hello = w.recv(self._deadline())
        except WorkerError as exc:
            hung = self._settle(w, exc)
            why = self._kill()
            msg = f"the worker loading {self.spec} {why}{self._log_hint(w)}"
            if hung:
                self.abandoned = msg
            raise AdapterCrashed(msg) from None
        return hello["ok"]

    def _deadline(self) -> float:
        import time

        return time.monotonic() + self.timeout

    @staticmethod
    def _settle(w: Worker, exc: WorkerError) -> bool:
        """True if the worker hung; else wait for the dead one's exit status (its pipe closes first)."""
        if "no answer within" in str(exc):
            return True
        try:
            w.proc.wait(timeout=5.0)
        except Exception:  # noqa: BLE001 - still alive after closing its pipe: treat as hung
            return True
        return False

    def _kill(self) -> str:
        """Kill the worker; return how it ended."""
        w, self.worker = self.worker, None
        if w is None:
            return "is gone"
        why = _death(w)
        if w.proc.poll() is None:
            w.proc.kill()
            why = f"did not answer within --timeout {self.timeout:g} s (killed)"
        w.close(timeout=2.0)
        return why

    @staticmethod
    def _log_hint(w: Worker) -> str:
        tail = [ln for ln in w.log_tail(600).splitlines() if ln.strip()]
        return f"; last output: {tail[-1].strip()[:200]}" if tail else ""

    def load(self) -> tuple[list[IsolatedAdapter], str | None, str | None]:
        """(adapters, error, skip) of the factory, built in the worker."""
        try:
            hello = self._start()
        except AdapterCrashed as exc:
            return [], str(exc), None
        if hello.get("error") or hello.get("skip"):
            self.close()
            return [], hello.get("error"), hello.get("skip")
        return [IsolatedAdapter(self, i, meta) for i, meta in enumerate(hello["adapters"])], None, None

    def call(self, op: str, index: int, case: Any) -> Any:
        """One request to the worker; raises the adapter's exception, or AdapterCrashed."""
        if self.abandoned:
            raise AdapterCrashed(f"not run: {self.abandoned}")
        if self.worker is None or self.worker.proc.poll() is not None:
            if self.worker is not None:
                self._kill()
            try:
                self._start()
            except AdapterCrashed as exc:  # restarting failed: this call's error
                self._crashed(case.id, str(exc), hung=False)
                raise
        w = self.worker
        assert w is not None
        try:
            w.send({"op": op, "index": index, "case": case})
            answer = w.recv(self._deadline())
        except WorkerError as exc:
            hung = self._settle(w, exc)
            why = self._kill()
            msg = f"the adapter's worker {why} on {case.id}{self._log_hint(w)}"
            self._crashed(case.id, msg, hung=hung)
            raise AdapterCrashed(msg) from None
        self.crashes = 0
        if "error" in answer:  # the worker loop itself failed (e.g. an unpicklable answer)
            raise AdapterCrashed(f"the adapter's worker failed: {answer['error']}")
        result = answer["ok"]
        if "raised" in result:
            type_name, message, where = result["raised"]
            _raise_at(_remote_exception(type_name, message), *where)
        return result["value"]

    def _crashed(self, step: str, msg: str, *, hung: bool) -> None:
        self.crashed_steps[step] = msg
        self.crashes += 1
        if hung:
            self.abandoned = f"the adapter hung on {step} (no answer within --timeout {self.timeout:g} s)"
        elif self.crashes >= MAX_CRASHES:
            self.abandoned = f"the adapter's worker crashed {self.crashes} times in a row (last on {step})"

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close(timeout=2.0)
            self.worker = None


class IsolatedAdapter:
    """Stand-in for one adapter living in an :class:`IsolatedFactory`'s worker."""

    def __init__(self, host: IsolatedFactory, index: int, meta: dict[str, Any]) -> None:
        self._host = host
        self._index = index
        self._meta = meta
        self._crashed_in_skip: tuple[str, str] | None = None
        self.name: str = meta["name"]
        self.convention = meta["convention"]
        self.description: str = meta["description"]
        if meta.get("world_size") is not None:
            self.world_size = meta["world_size"]
        if meta.get("unavailable"):
            self.unavailable = meta["unavailable"]
        if meta.get("has_skip"):
            self.skip = self._skip
        if meta.get("compute_dtype"):
            self.compute_dtype = meta["compute_dtype"]
        if meta.get("has_variant_skip"):  # the variants capability (docs/adapters.md)
            self.variant_skip = lambda case: self._ask("variant_skip", case)
        if meta.get("has_variant_raises"):
            self.variant_raises = lambda case: self._ask("variant_raises", case)

    def _ask(self, op: str, case: Any) -> str | None:
        """A variant_skip / variant_raises question to the worker (a crash there is the case's error)."""
        reason = self._host.call(op, self._index, case)
        return None if reason is None else str(reason)

    def _skip(self, case: Any) -> str | None:
        try:
            reason = self._host.call("skip", self._index, case)
        except AdapterCrashed as exc:  # reported by run() as this case's error (the engine does not catch skip)
            self._crashed_in_skip = (case.id, str(exc))
            return None
        return None if reason is None else str(reason)

    def run(self, case: Any) -> dict[str, Any]:
        crashed, self._crashed_in_skip = self._crashed_in_skip, None
        if crashed is not None and crashed[0] == case.id:
            raise AdapterCrashed(f"in skip(case): {crashed[1]}")
        out = self._host.call("run", self._index, case)
        assert isinstance(out, dict)
        return out

    def close(self) -> None:
        """Closing any adapter of the factory ends the worker (the harness closes them all at the end)."""
        self._host.close()


# -- the worker side ------------------------------------------------------------------------------


def _describe(adapter: Any) -> dict[str, Any]:
    return {
        "name": str(adapter.name),
        "convention": adapter.convention,
        "description": str(getattr(adapter, "description", "")),
        "world_size": getattr(adapter, "world_size", None),
        "unavailable": getattr(adapter, "unavailable", None),
        "has_skip": callable(getattr(adapter, "skip", None)),
        "has_variant_skip": callable(getattr(adapter, "variant_skip", None)),
        "has_variant_raises": callable(getattr(adapter, "variant_raises", None)),
        # A declared working dtype travels when it is a dtype name (a callable cannot cross processes).
        "compute_dtype": cd if isinstance(cd := getattr(adapter, "compute_dtype", None), str) else None,
    }


def _to_wire(value: Any) -> Any:
    from .base import numpy_out

    if value is None:
        return None
    try:
        return numpy_out(value)
    except Exception:  # noqa: BLE001 - the engine reports "not an array"
        return repr(value)


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: ``python -m bn_ref.conformance.adapters._isolated package.module:factory``."""
    from . import load

    (spec,) = sys.argv[1:] if argv is None else argv
    loaded = load(spec, third_party=True)
    adapters = loaded.adapters

    def handle(msg: dict[str, Any]) -> dict[str, Any]:
        adapter = adapters[msg["index"]]
        try:
            if msg["op"] in ("skip", "variant_skip", "variant_raises"):
                reason = getattr(adapter, msg["op"])(msg["case"])
                return {"value": None if reason is None else str(reason)}
            out = adapter.run(msg["case"])
            if not isinstance(out, dict):
                raise TypeError(f"run(case) must return a dict, got {type(out).__name__}")
            return {"value": {str(k): _to_wire(v) for k, v in out.items()}}
        except Exception as exc:  # noqa: BLE001 - the adapter's exception, sent back to the engine
            first = (str(exc).strip().splitlines() or [""])[0][:400]
            frames = traceback.extract_tb(exc.__traceback__)
            where = (frames[-1].filename, frames[-1].lineno or 1) if frames else ("<adapter>", 1)
            return {"raised": (type(exc).__name__, first, where)}

    hello = {"error": loaded.error, "skip": loaded.skip,
             "adapters": [_describe(a) for a in adapters] if not (loaded.error or loaded.skip) else []}
    serve(handle, hello)


if __name__ == "__main__":
    main()
