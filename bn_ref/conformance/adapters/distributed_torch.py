"""Cross-replica BN on real ``torch.distributed`` worlds (``docs/spec.md`` §11).

Rows:

* ``bn_ref.torch.SyncBatchNorm[gloo, world=2]`` and ``[gloo, world=4]`` @pytorch: bn-ref's
  exact, count-weighted synchronized layer, on a gloo world of 2 and of 4 CPU processes.
* ``torch.nn.SyncBatchNorm[...]`` @pytorch: PyTorch's own layer. It supports only CUDA-like
  devices; on a machine without CUDA the row is *skipped* with the error PyTorch really raises
  in a gloo world on CPU (probed once, in a one-process world). With CUDA it runs on one GPU in
  an NCCL world of size 1 (where it must equal plain BN), on every cross-replica case's global batch.

Each adapter starts its world once (persistent worker processes, file:// rendezvous, gloo/NCCL
collective timeout 30 s) on its first case and reuses it for all cases; every wait has a
deadline, so a hang is an error for that case, and ``close()`` shuts the world down (the CLI
calls it after the row). Rank ``p`` receives the case and takes its rows
``sum(replicas[:p]) : sum(replicas[:p+1])``; the parent concatenates ``y`` and ``dx`` in rank
order, sums ``dgamma``/``dbeta`` over ranks (each rank returns its own share, which data-parallel
training all-reduces) and checks that every rank holds the same running statistics.

The worker side runs as ``python -m bn_ref.conformance.adapters.distributed_torch RANK WORLD
BACKEND DEVICE STORE``.
"""

from __future__ import annotations

import datetime
import shutil
import sys
import tempfile
from typing import Any

import numpy as np

from ...conventions import PRESETS
from ..cases import Case
from . import _workers

__all__ = ["TorchSyncAdapter", "factory", "COLLECTIVE_TIMEOUT_S", "START_TIMEOUT_S", "CASE_TIMEOUT_S"]

COLLECTIVE_TIMEOUT_S = 30
"""``init_process_group(timeout=...)``: a collective that waits longer raises on the ranks."""
START_TIMEOUT_S = 180.0
"""Wall clock for a world to start (spawn, import torch, rendezvous) on a loaded 2-core machine."""
CASE_TIMEOUT_S = 90.0
"""Wall clock for one case step on every rank."""


def rows_of(replicas: tuple[int, ...] | None, n: int, world: int) -> list[tuple[int, int]]:
    """(start, stop) rows of each rank: the case's split, or the whole batch on a world of one."""
    if world == 1 or replicas is None:
        return [(0, n)] * world
    if len(replicas) != world:
        raise ValueError(f"the case has {len(replicas)} replicas; this world has {world} ranks")
    edges = np.concatenate([[0], np.cumsum(replicas)]).astype(int)
    return [(int(edges[p]), int(edges[p + 1])) for p in range(world)]


class TorchSyncAdapter:
    """A synchronized BN layer on a persistent world of ``world`` worker processes."""

    def __init__(self, world: int, *, layer: str = "bn_ref", device: str = "cpu", backend: str | None = None) -> None:
        self.world_size = world
        self.layer = layer
        self.device = device
        self.backend = backend or ("nccl" if device == "cuda" else "gloo")
        self.convention = PRESETS["pytorch"]
        cls = "bn_ref.torch.SyncBatchNorm" if layer == "bn_ref" else "torch.nn.SyncBatchNorm"
        where = self.backend if device == "cpu" else f"{self.backend}, {device}"
        self.name = f"{cls}[{where}, world={world}] @pytorch"
        self.description = (f"{cls} on a {self.backend} world of {world} process(es); "
                            "checked against the oracle on the concatenated global batch")
        self._workers: list[_workers.Worker] = []
        self._tmp: str | None = None

    # -- the world ------------------------------------------------------------------------------

    def _start(self) -> list[_workers.Worker]:
        if self._workers:
            return self._workers
        self._tmp = tempfile.mkdtemp(prefix="bnref-dist-")
        store = f"{self._tmp}/store"
        env = _workers.pythonpath_env()
        ws = [_workers.Worker(__name__, [str(r), str(self.world_size), self.backend, self.device, store], env,
                              label=f"rank {r}/{self.world_size}") for r in range(self.world_size)]
        self._workers = ws
        try:
            _workers.gather(ws, START_TIMEOUT_S)  # each says "ready" after the rendezvous
        except Exception:
            self.close()
            raise
        return ws

    def close(self) -> None:
        """Shut the world down (idempotent)."""
        ws, self._workers = self._workers, []
        if ws:
            _workers.close_all(ws)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self) -> None:  # a safety net; the CLI and the tests call close()
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # -- the contract ---------------------------------------------------------------------------

    def skip(self, case: Case) -> str | None:
        if self.layer == "torch" and case.feature_axis != 1:
            return "torch.nn.SyncBatchNorm keeps the features on axis 1 only"
        if case.replicas is None:
            return "not a cross-replica case"
        return None

    def run(self, case: Case) -> dict[str, Any]:
        ws = self._start()
        try:
            for w in ws:
                w.send({"op": "case", "layer": self.layer, "case": case})
            outs = _workers.gather(ws, CASE_TIMEOUT_S)
        except _workers.WorkerError:
            self.close()  # a broken world is restarted on the next case
            raise
        rms, rvs = [o["running_mean"] for o in outs], [o["running_var"] for o in outs]
        for p in range(1, len(outs)):
            if not (np.array_equal(rms[p], rms[0], equal_nan=True) and np.array_equal(rvs[p], rvs[0], equal_nan=True)):
                raise RuntimeError(f"ranks 0 and {p} hold different running statistics after the step "
                                   f"({rms[0]} / {rvs[0]} vs {rms[p]} / {rvs[p]})")
        if self.world_size == 1:
            out = dict(outs[0])
        else:
            out = {"y": np.concatenate([o["y"] for o in outs], axis=0),
                   "running_mean": rms[0], "running_var": rvs[0]}
            if all(o.get("dx") is not None for o in outs):
                out["dx"] = np.concatenate([o["dx"] for o in outs], axis=0)
            for k in ("dgamma", "dbeta"):
                parts = [o.get(k) for o in outs]
                if all(p is not None for p in parts):
                    out[k] = np.sum(parts, axis=0)  # each rank's share; DDP all-reduces them
        return out


def _probe_reason() -> str | None:
    """Run torch.nn.SyncBatchNorm in training on CPU in a one-process gloo world; its error, or None."""
    probe = TorchSyncAdapter(1, layer="torch", device="cpu", backend="gloo")
    try:
        ws = probe._start()
        ws[0].send({"op": "probe"})
        msg = _workers.gather(ws, CASE_TIMEOUT_S)[0]
    finally:
        probe.close()
    if msg is None:
        return None
    return f"torch.nn.SyncBatchNorm supports only CUDA-like devices and this machine has no CUDA ({msg})"


class TorchNNSyncAdapter(TorchSyncAdapter):
    """PyTorch's own ``torch.nn.SyncBatchNorm``: world size 1 on CUDA; a skipped row on CPU."""

    def __init__(self) -> None:
        import torch

        cuda = torch.cuda.is_available()
        super().__init__(1, layer="torch", device="cuda" if cuda else "cpu")
        self._reason: str | None = None
        self._probed = cuda

    @property
    def unavailable(self) -> str | None:
        """Why the row cannot run here (probed once on CPU), or None."""
        if not self._probed:
            self._probed = True
            try:
                self._reason = _probe_reason()
            except Exception as exc:  # noqa: BLE001
                self._reason = f"torch.nn.SyncBatchNorm could not be probed on CPU ({type(exc).__name__}: {exc})"
        return self._reason


def factory() -> list[Any]:
    """bn-ref's SyncBatchNorm on gloo worlds of 2 and 4 processes; torch.nn.SyncBatchNorm (CUDA only)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ModuleNotFoundError("torch.distributed is not available in this torch build", name="torch")
    return [TorchSyncAdapter(2), TorchSyncAdapter(4), TorchNNSyncAdapter()]


# -- the worker side ------------------------------------------------------------------------------


def _worker(rank: int, world: int, backend: str, device: str, store: str) -> None:
    import torch
    import torch.distributed as dist

    from ... import torch as bt
    from . import _torch_util as tu
    from .base import numpy_out

    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    modules: dict[Any, Any] = {}

    def module(layer: str, case: Case) -> Any:
        c = case.x.shape[case.feature_axis]
        key = (layer, c, case.dtype, case.affine, case.convention)
        m = modules.get(key)
        if m is None:
            dt = tu.DTYPES[case.dtype]
            if layer == "bn_ref":
                m = bt.SyncBatchNorm(c, convention=case.convention, affine=case.affine, feature_axis=case.feature_axis,
                                     device=device, dtype=dt)
            else:
                m = torch.nn.SyncBatchNorm(c, eps=case.eps, momentum=case.momentum, affine=case.affine,
                                           device=device, dtype=dt)
            modules[key] = m
        return m

    def handle(msg: dict[str, Any]) -> Any:
        if msg["op"] == "probe":
            m = torch.nn.SyncBatchNorm(3).train()
            try:
                m(torch.randn(4, 3))
            except Exception as exc:  # noqa: BLE001 - the answer is the message
                return f"{type(exc).__name__}: {exc}"
            return None
        case: Case = msg["case"]
        lo, hi = rows_of(case.replicas, case.x.shape[0], world)[rank]
        m = module(msg["layer"], case)
        with torch.no_grad():
            m.running_mean.copy_(tu.tensor(case.running_mean, case, device))
            m.running_var.copy_(tu.tensor(case.running_var, case, device))
            m.num_batches_tracked.fill_(case.count)
            if case.affine:
                m.weight.copy_(tu.tensor(case.gamma, case, device))
                m.bias.copy_(tu.tensor(case.beta, case, device))
        m.zero_grad(set_to_none=True)
        m.train(case.training)
        x = tu.tensor(case.x[lo:hi], case, device).requires_grad_(True)
        y = m(x)
        out: dict[str, Any] = {"y": numpy_out(y)}
        if case.dy is not None:
            y.backward(tu.tensor(case.dy[lo:hi], case, device))
            out["dx"] = numpy_out(x.grad) if x.grad is not None else np.zeros(x.shape)
            if case.affine:
                out["dgamma"] = numpy_out(m.weight.grad) if m.weight.grad is not None else np.zeros(m.weight.shape)
                out["dbeta"] = numpy_out(m.bias.grad) if m.bias.grad is not None else np.zeros(m.bias.shape)
        out["running_mean"], out["running_var"] = numpy_out(m.running_mean), numpy_out(m.running_var)
        return out

    try:
        _workers.serve(handle)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _r, _w, _b, _d, _s = sys.argv[1:6]
    _worker(int(_r), int(_w), _b, _d, _s)
