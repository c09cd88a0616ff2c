"""Cross-replica BN under JAX collectives on 4 host CPU devices (``docs/spec.md`` §11).

Rows (world size 4, the cross-replica cases with 4 replicas):

* ``bn_ref.jax.batch_norm[shard_map, cpu x4]``: bn-ref's pure function with ``axis_name`` (exact,
  count-weighted merge) under ``shard_map`` over a 4-device mesh.
* ``flax.linen.BatchNorm(axis_name)[shard_map, cpu x4]``: Flax's own layer with ``axis_name``,
  which averages the per-device moments with equal weights (``lax.pmean``).

Unequal shards are padded to one shape (the largest replica, at least 1 row) and the padding is
marked: bn-ref gets ``mask=`` (N,) (padded rows contribute nothing, receive no gradient); Flax
gets its own ``mask=`` argument (broadcast over the non-batch axes), which it uses for the
per-device means only -- what it then does with the padding is what the report shows. Equal
shards are passed unpadded and without a mask. The gradients are those of the *global* loss
``sum(y * dy)`` taken outside ``shard_map`` (padding rows carry dy = 0); ``y`` and ``dx`` are
unpadded and concatenated in replica order.

JAX fixes its device count when it initializes. When this process has fewer than 4 CPU devices
(the default), each adapter runs in one persistent worker subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (and ``JAX_PLATFORMS=cpu``), driven over
a pipe with timeouts; with 4 or more (e.g. under the test suite) it runs in-process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from ...conventions import PRESETS, Convention
from ..cases import Case
from . import _workers

__all__ = ["JaxShardedAdapter", "factory", "NDEV", "START_TIMEOUT_S", "CASE_TIMEOUT_S"]

NDEV = 4
START_TIMEOUT_S = 180.0
CASE_TIMEOUT_S = 120.0  # a first call compiles
AXIS = "replica"


def _shard_map() -> Any:
    import jax

    sm = getattr(jax, "shard_map", None)
    if sm is None:  # older JAX
        from jax.experimental.shard_map import shard_map as sm
    return sm


class _Runner:
    """The in-process computation (needs JAX with >= 4 CPU devices)."""

    def __init__(self, kind: str) -> None:
        import jax
        from jax.sharding import Mesh

        cpus = jax.devices("cpu")
        if len(cpus) < NDEV:
            raise RuntimeError(f"JAX has {len(cpus)} CPU device(s); {NDEV} are needed")
        self.kind = kind
        self.mesh = Mesh(np.array(cpus[:NDEV]), (AXIS,))
        self._fns: dict[Any, Any] = {}

    def _build(self, conv: Convention, ax: int, training: bool, dtype: str, masked: bool, eps: float,
               momentum: Any) -> Any:
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        from ... import jax as bj
        from . import _jax_util as ju

        kind = self.kind
        if kind == "flax":
            from flax import linen as nn

            mod = nn.BatchNorm(use_running_average=not training, axis=ax, momentum=momentum, epsilon=eps,
                               dtype=ju.DTYPES[dtype], param_dtype=jnp.float64 if dtype == "float64" else jnp.float32,
                               axis_name=AXIS)

        def local(x, g, b, rm, rv, count, mask):
            if kind == "bn_ref":
                y, nrm, nrv, _ = bj.batch_norm(x, g, b, rm, rv, training=training, convention=conv, axis=ax,
                                               count=count, axis_name=AXIS, mask=mask if masked else None)
                return y, nrm, nrv
            fmask = mask.reshape((-1,) + (1,) * (x.ndim - 1)) if masked else None
            y, upd = mod.apply({"params": {"scale": g, "bias": b}, "batch_stats": {"mean": rm, "var": rv}}, x,
                               mask=fmask, mutable=["batch_stats"])
            return y, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

        smap = _shard_map()(local, mesh=self.mesh, in_specs=(P(AXIS), P(), P(), P(), P(), P(), P(AXIS)),
                            out_specs=(P(AXIS), P(), P()))

        def f(x, g, b, rm, rv, count, mask, dy):
            (y, nrm, nrv), vjp = jax.vjp(lambda x, g, b: smap(x, g, b, rm, rv, count, mask), x, g, b)
            dx, dg, db = vjp((dy, jnp.zeros_like(nrm), jnp.zeros_like(nrv)))
            return y, nrm, nrv, dx, dg, db

        return jax.jit(f)

    def run(self, case: Case) -> dict[str, Any]:
        from . import _jax_util as ju

        with ju.x64():  # float64 cases; the process's own setting is restored after
            return self._run(case)

    def _run(self, case: Case) -> dict[str, Any]:
        import jax.numpy as jnp

        from . import _jax_util as ju

        reps = case.replicas
        if reps is None or len(reps) != NDEV:
            raise ValueError(f"needs a case with {NDEV} replicas; got {reps}")
        if not case.affine:
            raise ValueError("the cross-replica adapters take affine cases only")
        L = max(max(reps), 1)
        masked = any(r != L for r in reps)
        n, rest = case.x.shape[0], case.x.shape[1:]
        edges = np.concatenate([[0], np.cumsum(reps)]).astype(int)
        xp = np.zeros((NDEV * L,) + rest)
        dyp = np.zeros((NDEV * L,) + rest)
        mask = np.zeros(NDEV * L, dtype=bool)
        for p in range(NDEV):
            k = reps[p]
            xp[p * L:p * L + k] = case.x[edges[p]:edges[p + 1]]
            dyp[p * L:p * L + k] = case.dy[edges[p]:edges[p + 1]]
            mask[p * L:p * L + k] = True
        key = (case.convention, case.feature_axis, case.training, case.dtype, masked, case.eps, case.momentum)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._build(case.convention, case.feature_axis, case.training, case.dtype, masked,
                                              case.eps, case.momentum)
        dt, pdt = ju.DTYPES[case.dtype], ju.param_dtype(case)
        y, nrm, nrv, dx, dg, db = fn(jnp.asarray(xp, dt), jnp.asarray(case.gamma, pdt), jnp.asarray(case.beta, pdt),
                                     jnp.asarray(case.running_mean, pdt), jnp.asarray(case.running_var, pdt),
                                     jnp.asarray(case.count, jnp.int32), jnp.asarray(mask), jnp.asarray(dyp, dt))
        rows = np.concatenate([np.arange(p * L, p * L + reps[p]) for p in range(NDEV)]).astype(int)
        assert rows.size == n
        return {"y": ju.out(y)[rows], "dx": ju.out(dx)[rows], "running_mean": ju.out(nrm),
                "running_var": ju.out(nrv), "dgamma": ju.out(dg), "dbeta": ju.out(db)}


def _host_devices() -> int:
    import jax

    try:
        return len(jax.devices("cpu"))
    except RuntimeError:
        return 0


def _xla_flags() -> str:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={NDEV}"])


class JaxShardedAdapter:
    """A JAX BN with ``axis_name`` under ``shard_map`` on 4 CPU devices (in-process or in a worker)."""

    world_size = NDEV

    def __init__(self, kind: str, *, in_process: bool | None = None) -> None:
        self.kind = kind
        if kind == "bn_ref":
            self.convention = PRESETS["flax"]
            self.name = f"bn_ref.jax.batch_norm(axis_name)[shard_map, cpu x{NDEV}] @flax"
            self.description = "bn-ref pure JAX function, count-weighted axis_name, mask for padded shards"
        elif kind == "flax":
            import flax

            self.convention = PRESETS["flax"]
            self.name = f"flax.linen.BatchNorm(axis_name)[shard_map, cpu x{NDEV}] @flax"
            self.description = f"flax {flax.__version__} linen BatchNorm with axis_name (pmean of per-device moments)"
        else:
            raise ValueError(f"kind must be 'bn_ref' or 'flax'; got {kind!r}")
        self._in_process = in_process
        self._runner: _Runner | None = None
        self._worker: _workers.Worker | None = None

    def skip(self, case: Case) -> str | None:
        if case.replicas is None:
            return "not a cross-replica case"
        if self.kind == "flax" and case.momentum is None:
            return "Flax's BatchNorm has no cumulative-average mode (momentum=None)"
        if not case.affine:
            return "affine off is not among the cross-replica cases"
        return None

    def _start(self) -> None:
        if self._runner is not None or self._worker is not None:
            return
        local = self._in_process if self._in_process is not None else _host_devices() >= NDEV
        if local:
            self._runner = _Runner(self.kind)
            return
        env = _workers.pythonpath_env({"XLA_FLAGS": _xla_flags(), "JAX_PLATFORMS": "cpu"})
        w = _workers.Worker(__name__, [self.kind], env, label=f"JAX {self.kind} worker (cpu x{NDEV})")
        self._worker = w
        try:
            _workers.gather([w], START_TIMEOUT_S)
        except Exception:
            self.close()
            raise

    def run(self, case: Case) -> dict[str, Any]:
        self._start()
        if self._runner is not None:
            return self._runner.run(case)
        assert self._worker is not None
        try:
            self._worker.send(case)
            return _workers.gather([self._worker], CASE_TIMEOUT_S)[0]
        except _workers.WorkerError as exc:
            if self._worker.proc.poll() is not None or "timeout" in str(exc):
                self.close()  # dead or hung: restarted on the next case
            raise

    def close(self) -> None:
        w, self._worker = self._worker, None
        self._runner = None
        if w is not None:
            w.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def factory() -> list[Any]:
    """bn-ref's ``batch_norm(axis_name=...)`` and Flax's ``linen.BatchNorm(axis_name=...)``, 4 CPU devices."""
    import flax  # noqa: F401 - a missing framework skips the rows
    import jax  # noqa: F401

    return [JaxShardedAdapter("bn_ref"), JaxShardedAdapter("flax")]


def _worker_main(kind: str) -> None:
    runner = _Runner(kind)
    _workers.serve(runner.run)


if __name__ == "__main__":
    _worker_main(sys.argv[1])
