"""Meta-tests of the cross-replica part of the conformance harness (spec §11).

A simulated distributed adapter (NumPy, one process: each replica's moments computed separately
and then merged) is correct with the exact count-weighted merge, and must be *caught* when it
merges with equal weights (what Flax/Haiku do: wrong on unequal splits, right on equal ones) or
uses a replica's local n for the unbiased running variance. The real distributed rows (torch gloo
worlds of 2 and 4 processes, JAX shard_map on 4 devices, Flax's equal-weight axis_name) run on a
``-k`` selection through the command line, with a timeout on every spawned process.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import broken_adapters as ba
import numpy as np
import pytest

from bn_ref.conformance import cases as cs
from bn_ref.conformance import engine
from bn_ref.conformance.adapters import _workers
from bn_ref.conformance.cli import default_ledger_path
from bn_ref.conventions import PRESETS

ROOT = Path(__file__).resolve().parents[1]

# The cross-replica catalogue is asserted, so a parametrization cannot silently shrink.
assert len(cs.DISTRIBUTED) == 9, [s.id for s in cs.DISTRIBUTED]
assert len(cs.ALL_SPECS) == len(cs.CATALOGUE) + 9 + len(cs.VARIANTS)
BY_WORLD = {p: [s for s in cs.DISTRIBUTED if len(s.replicas) == p] for p in (2, 4)}
assert [len(BY_WORLD[2]), len(BY_WORLD[4])] == [3, 6]
EQUAL = {s.id for s in cs.DISTRIBUTED if len(set(s.replicas)) == 1}
assert EQUAL == {"replicas2-equal-float64", "replicas4-equal-float64", "replicas4-equal-float32"}
assert all(sum(s.replicas) == s.shape[0] and len(s.modes) >= 4 and s.modes[-1] == "eval" for s in cs.DISTRIBUTED)
assert any(0 in s.replicas for s in BY_WORLD[2]) and any(0 in s.replicas for s in BY_WORLD[4])


class SimDistBN:
    """A simulated data-parallel BN: per-replica (n_p, mean_p, M2_p), then a merge (§11.1).

    ``bug``: None (exact count-weighted merge), "equal_weights" (mean of the replicas' means and
    mean squares, as lax.pmean does), "local_n" (running variance corrected with replica 0's n).
    """

    def __init__(self, world: int, bug: str | None = None, convention=PRESETS["pytorch"]) -> None:
        self.world_size = world
        self.bug = bug
        self.convention = convention
        self.name = f"sim-dist[{bug or 'correct'}, world={world}] @{convention.name}"

    def run(self, case):
        x, ax, conv = case.x, case.feature_axis, case.convention
        red = tuple(i for i in range(x.ndim) if i != ax)
        bs = [1] * x.ndim
        bs[ax] = -1
        per = x[:1].size // x.shape[ax]  # values per sample and channel
        reps = case.replicas if self.world_size > 1 else (x.shape[0],)
        edges = np.concatenate([[0], np.cumsum(reps)]).astype(int)
        parts = [x[edges[p]:edges[p + 1]] for p in range(len(reps))]
        ns = np.array([p.shape[0] * per for p in parts], dtype=float)
        n = ns.sum()
        if case.training:
            with np.errstate(invalid="ignore", divide="ignore"):
                means = np.stack([p.sum(axis=red) / max(k, 1) for p, k in zip(parts, ns)])
                if self.bug == "equal_weights":
                    sq = np.stack([(p**2).sum(axis=red) / k for p, k in zip(parts, ns)])  # 0/0 = NaN when empty
                    mean = np.stack([(p.sum(axis=red) / k) for p, k in zip(parts, ns)]).mean(axis=0)
                    var = np.maximum(sq.mean(axis=0) - mean**2, 0.0)
                else:
                    mean = (ns[:, None] * means).sum(axis=0) / n  # §11.1
                    m2 = sum(((p - m.reshape(bs)) ** 2).sum(axis=red) for p, m in zip(parts, means))
                    var = (m2 + (ns[:, None] * (means - mean) ** 2).sum(axis=0)) / n
        else:
            mean, var = case.running_mean, case.running_var
        inv = 1.0 / np.sqrt(var + case.eps)
        xhat = (x - mean.reshape(bs)) * inv.reshape(bs)
        g = case.gamma if case.gamma is not None else np.ones(x.shape[ax])
        y = g.reshape(bs) * xhat + (case.beta if case.beta is not None else 0.0 * g).reshape(bs)
        rm, rv = case.running_mean.copy(), case.running_var.copy()
        if case.training:
            w_r, w_b = conv.update_weights(case.count)
            n_corr = ns[0] if self.bug == "local_n" else n
            rm = w_r * rm + w_b * mean
            rv = w_r * rv + w_b * var * conv.variance_correction(int(n_corr))
        dy = case.dy
        dbeta, dgamma = dy.sum(axis=red), (dy * xhat).sum(axis=red)
        if case.training:
            dx = (g * inv).reshape(bs) * (dy - (dbeta / n).reshape(bs) - xhat * (dgamma / n).reshape(bs))
        else:
            dx = (g * inv).reshape(bs) * dy
        return {"y": y, "running_mean": rm, "running_var": rv, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}


@pytest.mark.parametrize("world", [2, 4])
def test_simulated_correct_adapter_passes_and_only_its_cases_run(world, bad_checks):
    res = engine.run_adapter(SimDistBN(world), cs.ALL_SPECS, cs.RANDOM_SPECS)
    assert not bad_checks(res), [c.message for c in bad_checks(res)]
    # Only the cross-replica cases of its world size ran; no random search, no single-process case.
    assert {c.case for c in res.checks} == {s.id for s in BY_WORLD[world]}
    assert {c.group for c in res.checks} == {"forward", "running", "eval", "backward"}
    steps = sum(len(s.modes) for s in BY_WORLD[world])
    assert len({c.step for c in res.checks}) == steps
    assert len([c for c in res.checks if c.status == "pass"]) == steps * 6


@pytest.mark.parametrize("world", [2, 4])
def test_equal_weight_merge_is_caught_on_unequal_splits_and_passes_on_equal(world, bad_checks):
    res = engine.run_adapter(SimDistBN(world, "equal_weights"), BY_WORLD[world], ())
    bad = bad_checks(res)
    failing_cases = {c.case for c in bad}
    unequal = {s.id for s in BY_WORLD[world]} - EQUAL
    assert failing_cases == unequal, failing_cases
    assert {c.key for c in bad} >= {"y", "running_mean", "running_var", "dx", "dgamma"}
    assert all(c.status == "fail" for c in bad)
    # Equal splits: every check of those cases passes (equal weights are then right).
    eq = [c for c in res.checks if c.case in EQUAL]
    assert eq and all(c.status == "pass" for c in eq)
    # The message says how far off, at which channel.
    assert any("x tolerance" in c.message and "channel" in c.message for c in bad)


def test_local_n_in_unbiased_running_variance_is_caught(bad_checks):
    res = engine.run_adapter(SimDistBN(4, "local_n"), BY_WORLD[4], ())
    bad = bad_checks(res)
    assert bad and {c.key for c in bad} == {"running_var"}
    # With replica 0 holding n_0 != n values, c_n differs on every split, equal ones included.
    assert {c.case for c in bad} == {s.id for s in BY_WORLD[4]}


def test_ordinary_adapter_runs_cross_replica_cases_on_the_global_batch(bad_checks):
    res = engine.run_adapter(ba.NumpyBN(PRESETS["pytorch"]), cs.DISTRIBUTED, ())
    assert not bad_checks(res), [c.message for c in bad_checks(res)]
    assert {c.case for c in res.checks} == {s.id for s in cs.DISTRIBUTED}
    # ... and a single-process bug is still caught on them.
    assert bad_checks(engine.run_adapter(ba.NumpyBN(PRESETS["pytorch"], "biased_running_var"), cs.DISTRIBUTED, ()))


def test_case_carries_replicas_and_rejects_a_bad_split():
    spec = next(s for s in cs.DISTRIBUTED if s.id == "replicas4-unequal-2d-float64")
    steps = cs.instantiate(spec, PRESETS["flax"])
    assert [c.replicas for c in steps] == [(4, 0, 1, 3)] * 4 and steps[0].x.shape == (8, 3)
    assert cs.instantiate(next(s for s in cs.CATALOGUE), PRESETS["flax"])[0].replicas is None
    with pytest.raises(ValueError, match="replicas"):
        cs.CaseSpec("bad", (4, 3), replicas=(2, 1))
    with pytest.raises(ValueError, match="replicas"):
        cs.CaseSpec("bad", (4, 3), replicas=(5, -1))


def test_unavailable_adapter_is_a_skipped_row():
    class Gone(SimDistBN):
        unavailable = "needs CUDA"

    res = engine.run_adapter(Gone(2), cs.ALL_SPECS, ())
    assert res.build_skip == "needs CUDA" and res.checks == []


def test_worker_timeout_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "bnref_hang_worker.py").write_text(textwrap.dedent("""
        import time
        time.sleep(120)
    """))
    env = _workers.pythonpath_env({"PYTHONPATH": str(tmp_path)})
    w = _workers.Worker("bnref_hang_worker", [], env, label="hanging worker")
    t0 = time.monotonic()
    try:
        with pytest.raises(_workers.WorkerError, match="no answer within the timeout"):
            _workers.gather([w], 1.0)
    finally:
        w.close(timeout=1.0)
    assert w.proc.returncode is not None and time.monotonic() - t0 < 30


def test_real_distributed_rows_on_a_k_selection(tmp_path, conformance_cli):
    """torch gloo worlds of 2 and 4, JAX shard_map on 4 devices, Flax axis_name; through the CLI."""
    pytest.importorskip("torch")
    pytest.importorskip("flax")
    sel = "replicas2-unequal or replicas2-empty or replicas4-equal-float64 or replicas4-unequal-float64"
    r = conformance_cli("--adapter", "bn_ref.conformance.adapters.distributed_torch:factory",
             "--adapter", "bn_ref.conformance.adapters.distributed_jax:factory",
             "-k", sel, "-q", "--json", str(tmp_path / "r.json"), "--ledger", default_ledger_path())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "r.json").read_text())
    rows = {a["name"]: a for a in rep["adapters"]}
    assert len(rows) == 5, sorted(rows)
    ran = {}
    for name, a in rows.items():
        statuses = {g: c["status"] for g, c in a["groups"].items()}
        n_pass = sum(c["counts"].get("pass", 0) for c in a["groups"].values())
        ran[name] = n_pass
        if name.startswith("torch.nn.SyncBatchNorm"):
            import torch

            if torch.cuda.is_available():
                assert set(statuses.values()) <= {"pass", "none"}, statuses
            else:
                assert a["build_skip"] and "CUDA" in a["build_skip"], a
        elif name.startswith("flax."):
            # Equal shards conform; unequal ones are the recorded equal-weight deviation.
            assert statuses["forward"] == statuses["running"] == statuses["backward"] == "xfail", statuses
            dev = {c["case"] for c in rep["non_pass_checks"] if c["adapter"] == name}
            assert dev == {"replicas4-unequal-float64"}, dev
        else:
            assert a["groups"]["forward"]["status"] == "pass", (name, statuses)
            assert set(statuses.values()) <= {"pass", "none"}, (name, statuses)
    world2 = [n for n in ran if "world=2" in n]
    world4 = [n for n in ran if "world=4" in n]
    assert len(world2) == len(world4) == 1
    # 2 cases x 4 steps x 6 checks for each world of the selection.
    assert ran[world2[0]] == 48 and ran[world4[0]] == 48
    jax_row = next(n for n in ran if n.startswith("bn_ref.jax"))
    assert ran[jax_row] == 48


def test_jax_rows_in_a_worker_subprocess_match(bad_checks):
    """The subprocess path (XLA_FLAGS with 4 host devices) used when the harness has fewer devices."""
    pytest.importorskip("flax")
    from bn_ref.conformance.adapters import distributed_jax as dj

    spec = [s for s in cs.DISTRIBUTED if s.id == "replicas4-unequal-2d-float64"]
    a = dj.JaxShardedAdapter("bn_ref", in_process=False)
    try:
        res = engine.run_adapter(a, spec, ())
        assert a._worker is not None and a._worker.proc.poll() is None
    finally:
        a.close()
    assert not bad_checks(res), [c.message for c in bad_checks(res)]
    assert len([c for c in res.checks if c.status == "pass"]) == 4 * 6


def test_torch_world_raises_on_every_rank_and_the_run_goes_on():
    """n = 1 over the global batch (1 + 0 samples) must raise (§7.1) on every rank without a hang;
    the adapter reports it, restarts its world, and the next case passes."""
    pytest.importorskip("torch")
    from bn_ref.conformance.adapters import distributed_torch as dt

    bad = cs.CaseSpec("replicas2-global-n1", (1, 3), modes=("train",), replicas=(1, 0))
    ok = next(s for s in cs.DISTRIBUTED if s.id == "replicas2-empty-2d-float64")
    a = dt.TorchSyncAdapter(2)
    t0 = time.monotonic()
    try:
        res = engine.run_adapter(a, [bad, ok], ())
    finally:
        a.close()
    assert time.monotonic() - t0 < dt.START_TIMEOUT_S
    err = [c for c in res.checks if c.case == bad.id]
    assert [(c.group, c.status) for c in err] == [("errors", "pass")]
    assert "rank 0/2" in err[0].message and "rank 1/2" in err[0].message, err[0].message
    assert "n = 1" in err[0].message or "single" in err[0].message or "1 value" in err[0].message, err[0].message
    oks = [c for c in res.checks if c.case == ok.id]
    assert len(oks) == 4 * 6 and all(c.status == "pass" for c in oks)
    assert not a._workers  # closed
