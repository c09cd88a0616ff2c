"""The ``variants`` check group of the conformance harness (spec §13-§17).

bn-ref's own variant forms conform on every variant case; deliberately wrong implementations fail
the checks (the checks can fail); adapters without the capability are skipped with a reason; a
declared raise is verified; the §17 modes table names only existing cases.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bn_ref import variants
from bn_ref.conformance import cases as cs
from bn_ref.conformance.engine import check_steps, run_adapter
from bn_ref.conventions import PRESETS

torch = pytest.importorskip("torch")
from bn_ref.conformance.adapters.bnref_torch import FunctionalAdapter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VSPECS = {s.id: s for s in cs.VARIANTS}
assert len(cs.VARIANTS) == 17, sorted(VSPECS)
assert all(s.id.startswith("variant-") and s.variant is not None for s in cs.VARIANTS)
assert {s.id for s in cs.select("variant")[0]} == set(VSPECS)


def _run(adapter: Any, spec_id: str) -> list:
    spec = VSPECS[spec_id]
    return check_steps(adapter, adapter.name, spec.id, cs.instantiate(spec, adapter.convention))


def _bad(results: list) -> list:
    return [r for r in results if r.status in ("fail", "error")]


@pytest.mark.parametrize("preset", ["pytorch", "keras"])
def test_bnref_torch_conforms_on_every_variant_case(preset: str) -> None:
    a = FunctionalAdapter(PRESETS[preset], "function", "cpu")
    res = run_adapter(a, list(cs.VARIANTS), ())
    by_status: dict[str, int] = {}
    for r in res.checks:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    assert set(by_status) == {"pass"}, [(r.step, r.key, r.message) for r in res.checks if r.status != "pass"]
    assert {r.group for r in res.checks} == {"variants"}
    assert {r.case for r in res.checks} == set(VSPECS)
    keys = {r.key for r in res.checks}
    assert {"y", "running_mean", "running_var", "renorm_mean", "renorm_stat", "dx", "dgamma", "dbeta"} <= keys
    assert by_status["pass"] > 400
    # the precise-BN case adds its whole-sequence check
    assert any(r.step == "variant-precise-float64/precise" for r in res.checks)


def test_bnref_jax_conforms_on_a_variant_of_each_kind() -> None:
    pytest.importorskip("jax")
    from bn_ref.conformance.adapters._jax_util import devices
    from bn_ref.conformance.adapters.bnref_jax import JaxFunctionAdapter

    dname, dev = devices()[0]
    a = JaxFunctionAdapter(PRESETS["flax"], dname, dev)
    ids = ("variant-renorm-stddev-momentum-float32", "variant-ghost-mean-nondividing-float64")
    res = run_adapter(a, [VSPECS[i] for i in ids], ())
    assert res.checks and all(r.status == "pass" for r in res.checks), [
        (r.step, r.key, r.message) for r in res.checks if r.status != "pass"]


def test_clipping_active_and_inactive_cases_are_what_they_say() -> None:
    for sid, active in (("variant-renorm-clip-active-float64", True), ("variant-renorm-clip-inactive-float64", False),
                        ("variant-renorm-stddev-clip-active-float32", True),
                        ("variant-renorm-stddev-clip-inactive-float32", False)):
        c = cs.instantiate(VSPECS[sid], PRESETS["pytorch"])[0]
        v = c.variant
        res = variants.forward(c.x, c.gamma, c.beta, c.running_mean, c.running_var, training=True,
                               convention=c.convention, variant=v, count=0, renorm_mean=c.renorm_mean,
                               renorm_stat=c.renorm_stat)
        lo, hi = v.r_bounds
        clipped = bool(np.any((res.r <= lo) | (res.r >= hi)) or np.any(np.abs(res.d) >= v.dmax))
        assert clipped == active, (sid, res.r, res.d)
        assert not np.allclose(res.r, 1.0) and not np.allclose(res.d, 0.0)


# -- the checks can fail: wrong implementations ------------------------------------------------


class Wrong(FunctionalAdapter):
    """bn-ref's torch form run with a *different* Variant (or state handling) than the case names."""

    def __init__(self, change: Any, preset: str = "pytorch") -> None:
        super().__init__(PRESETS[preset], "function", "cpu")
        self.change = change

    def run(self, case: Any) -> dict[str, Any]:
        return super().run(self.change(case))


def _with(**kw: Any):
    return lambda case: dataclasses.replace(case, variant=dataclasses.replace(case.variant, **kw))


@pytest.mark.parametrize("spec_id,change,keys", [
    # renorm without clipping
    ("variant-renorm-clip-active-float64", _with(rmax=None, rmin=None, dmax=None), {"y", "dx", "dgamma"}),
    ("variant-renorm-stddev-clip-active-float32", _with(rmax=None, rmin=None, dmax=None), {"y", "dx", "dgamma"}),
    # r and d from the running pair instead of the correction pair (renorm_momentum ignored in the forward)
    ("variant-renorm-momentum-float64", lambda c: dataclasses.replace(
        c, renorm_mean=c.running_mean, renorm_stat=c.running_var), {"y", "dx", "dgamma"}),
    # renorm averaging the other statistic (variance vs stddev) in its correction pair
    ("variant-renorm-stddev-clip-inactive-float32", lambda c: dataclasses.replace(
        c, variant=dataclasses.replace(c.variant, renorm_track="variance"), renorm_stat=c.renorm_stat ** 2 - c.eps),
     {"renorm_stat"}),
    # renorm ignoring renorm_momentum
    ("variant-renorm-momentum-float64", _with(renorm_momentum=None), {"renorm_mean", "renorm_stat"}),
    # ghost batches normalizing the whole batch
    ("variant-ghost-nondividing-float64", _with(ghost_batch_size=None), {"y", "dx", "running_mean"}),
    ("variant-ghost-divides-float64", _with(ghost_batch_size=None), {"y", "dx", "running_mean"}),
    # the other running-update rule of ghost batches
    ("variant-ghost-mean-divides-float64", _with(ghost_update="sequential"), {"running_mean", "running_var"}),
    # frozen that still updates (and normalizes with) the batch statistics
    ("variant-frozen-stats-float64", _with(frozen="no"), {"y", "running_mean", "running_var", "dx"}),
    # frozen="all" that lets gradients reach gamma and beta
    ("variant-frozen-all-float64", _with(frozen="statistics"), {"dgamma", "dbeta"}),
    ("variant-frozen-all-float32", _with(frozen="statistics"), {"dgamma", "dbeta"}),
    # frozen BN computing dx through the batch statistics (training-mode backward)
    ("variant-frozen-stats-float64", lambda c: dataclasses.replace(
        c, variant=variants.Variant(track_running_stats=False), running_mean=None, running_var=None), {"y", "dx"}),
    # tracking off that keeps running statistics / uses them in eval
    ("variant-untracked-float64", lambda c: dataclasses.replace(
        c, variant=variants.Variant(), running_mean=np.zeros(3), running_var=np.ones(3)), {"running_mean", "y"}),
    # precise BN with an exponential average instead of the cumulative one
    ("variant-precise-float64", lambda c: dataclasses.replace(
        c, convention=dataclasses.replace(c.convention, momentum=0.1)), {"running_mean", "running_var"}),
])
def test_wrong_implementations_fail(spec_id: str, change: Any, keys: set[str]) -> None:
    bad = _bad(_run(Wrong(change), spec_id))
    assert bad, f"{spec_id}: a wrong implementation passed"
    failed = {r.key for r in bad}
    assert failed & keys, (failed, keys, [r.message for r in bad][:3])
    assert all(r.group == "variants" for r in bad)


def test_small_wrong_renorm_state_is_caught() -> None:
    """A realistic small error (the correction pair updated in float32 in a float64 layer) fails."""

    class F32Pair(FunctionalAdapter):
        def run(self, case: Any) -> dict[str, Any]:
            out = super().run(case)
            if out.get("renorm_mean") is not None:
                out["renorm_mean"] = out["renorm_mean"].astype(np.float32).astype(np.float64)
            return out

    bad = _bad(_run(F32Pair(PRESETS["pytorch"], "function", "cpu"), "variant-renorm-clip-active-float64"))
    assert {r.key for r in bad} == {"renorm_mean"}


# -- the capability contract --------------------------------------------------------------------


class Plain:
    """An adapter of the old contract: no variant capability."""

    name = "plain"
    convention = PRESETS["pytorch"]

    def run(self, case: Any) -> dict[str, Any]:  # pragma: no cover - must never be called on variant cases
        raise AssertionError("a variant case reached an adapter without the capability")


def test_adapters_without_the_capability_are_skipped_with_a_reason() -> None:
    res = run_adapter(Plain(), list(cs.VARIANTS), ())
    assert len(res.checks) == len(cs.VARIANTS)
    assert all(r.status == "skip" and r.message.startswith("not supported: ") for r in res.checks)


class Declines(FunctionalAdapter):
    def variant_skip(self, case: Any) -> str | None:
        return "no ghost batches" if case.variant.ghost_batch_size else None


def test_variant_skip_reason_is_reported() -> None:
    a = Declines(PRESETS["pytorch"], "function", "cpu")
    res = _run(a, "variant-ghost-divides-float64")
    assert [(r.status, r.message) for r in res] == [("skip", "not supported: no ghost batches")]
    assert all(r.status == "pass" for r in _run(a, "variant-frozen-all-float64"))


class Raises(FunctionalAdapter):
    def __init__(self, really: bool) -> None:
        super().__init__(PRESETS["pytorch"], "function", "cpu")
        self.really = really

    def variant_raises(self, case: Any) -> str | None:
        return "N must be a multiple of the ghost size" if case.variant.ghost_batch_size == 3 else None

    def run(self, case: Any) -> dict[str, Any]:
        if self.really and case.variant.ghost_batch_size == 3:
            raise ValueError("8 is not a multiple of 3")
        return super().run(case)


def test_a_declared_raise_is_verified() -> None:
    ok = _run(Raises(True), "variant-ghost-nondividing-float64")
    assert [(r.key, r.status) for r in ok] == [("raises", "pass")] and "as the adapter declares" in ok[0].message
    bad = _run(Raises(False), "variant-ghost-nondividing-float64")
    assert [(r.key, r.status) for r in bad] == [("raises", "fail")]


# -- spec §17: every cell names an existing case ---------------------------------------------------


def _modes_table() -> list[str]:
    text = (ROOT / "docs" / "spec.md").read_text()
    sec = text[text.index("## 17. The modes matrix"):text.index('<a id="changelog">')]
    return [ln for ln in sec.splitlines() if ln.startswith("| ") and not ln.startswith("| training")]


def test_every_modes_cell_is_backed_by_a_case() -> None:
    rows = _modes_table()
    assert len(rows) == len(variants.MODES) == 8
    known = {s.id for s in cs.ALL_SPECS}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 6, row
        for cell in cells[3:]:  # normalizes with, updates, gradients: each backed by a case
            ids = re.findall(r"\[case: ([^\]]+)\]", cell)
            assert ids, f"§17 cell names no case: {cell!r} in {row!r}"
            for group in ids:
                for cid in (i.strip() for i in group.split(",")):
                    assert cid in known, f"§17 names {cid!r}, which is not a catalogue case"


# -- framework rows: what they express conforms, the rest is declined with a reason ----------------


def test_torch_nn_rows_conform_on_the_variants_they_express() -> None:
    from bn_ref.conformance.adapters.frameworks_torch import TorchModuleAdapter

    res = run_adapter(TorchModuleAdapter("cpu"), list(cs.VARIANTS), ())
    ran = {r.case for r in res.checks if r.status != "skip"}
    assert ran == {"variant-frozen-stats-float64", "variant-frozen-all-float64", "variant-frozen-all-float32",
                   "variant-untracked-float64",
                   "variant-untracked-2d-float64", "variant-precise-float64"}
    assert all(r.status == "pass" for r in res.checks if r.case in ran), [
        (r.step, r.key, r.message) for r in res.checks if r.status not in ("pass", "skip")]
    skipped = [r for r in res.checks if r.status == "skip"]
    assert len(skipped) == 11 and all(r.message.startswith("not supported: torch.nn.BatchNorm*d has no")
                                      for r in skipped)


def test_flax_linen_use_running_average_in_training_is_frozen_statistics() -> None:
    pytest.importorskip("flax")
    from bn_ref.conformance.adapters._jax_util import devices
    from bn_ref.conformance.adapters.frameworks_flax import FlaxLinenAdapter

    dname, dev = devices()[0]
    res = run_adapter(FlaxLinenAdapter(False, dname, dev), list(cs.VARIANTS), ())
    ran = {r.case for r in res.checks if r.status != "skip"}
    assert ran == {"variant-frozen-stats-float64"}
    assert all(r.status == "pass" for r in res.checks if r.case in ran)
    # gradients to gamma and beta flow in the frozen training step
    keys = {(r.step, r.key) for r in res.checks if r.case in ran}
    assert ("variant-frozen-stats-float64/step0-train", "dgamma") in keys


# -- the capability crosses the worker boundary of an isolated (third-party) adapter -------------


def isolated_rows() -> list[Any]:
    """Factory run in a worker process by the test below: variant_skip and variant_raises declared."""

    class Row(Raises):
        def variant_skip(self, case: Any) -> str | None:
            return None if case.variant.ghost_batch_size else "ghost batches only"

    return [Row(True)]


def test_isolated_adapters_forward_the_variant_hooks(tmp_path: Path) -> None:
    import json

    from bn_ref.conformance.cli import run as cli_run

    out = tmp_path / "r.json"
    status = cli_run(["--adapter", "test_variant_conformance:isolated_rows", "-k", "variant-ghost or variant-frozen",
                      "--no-ledger", "-q", "--json", str(out)])
    rep = json.loads(out.read_text())
    (row,) = rep["adapters"]
    assert status == 0 and rep["totals"]["fail"] == 0 and rep["totals"]["error"] == 0
    assert row["groups"]["variants"]["status"] == "pass"
    skipped = {s["case"]: s["reason"] for s in row["skipped_cases"]}
    assert set(skipped) == {"variant-frozen-stats-float64", "variant-frozen-all-float64", "variant-frozen-all-float32"}
    assert all(r == "not supported: ghost batches only" for r in skipped.values())
