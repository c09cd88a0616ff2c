"""The bounded ledger: validation on load, bounds enforced, xpass reported."""

from __future__ import annotations

import pytest

from bn_ref.conformance import engine
from bn_ref.conformance.engine import AdapterResult, CheckResult, load_ledger


def _write(tmp_path, body: str) -> str:
    p = tmp_path / "ledger.toml"
    p.write_text(body)
    return str(p)


ENTRY = '[[deviation]]\nadapter = "a*"\ncase = "rank*"\ncheck = "y"\nreason = "why"\n'


@pytest.mark.parametrize("extra,match", [
    ("", "needs exactly one bound"),
    ("max_units = 3\nmax_rel = 0.1\n", "needs exactly one bound"),
    ("max_units = 0\n", "finite number > 0"),
    ("max_units = -1\n", "finite number > 0"),
    ("max_units = inf\n", "finite number > 0"),
    ('max_units = "3"\n', "finite number > 0"),
    ("max_units = 3\nmax_unit = 2\n", "unknown key"),
])
def test_invalid_entries_are_rejected(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        load_ledger(_write(tmp_path, ENTRY + extra))


def test_missing_fields_and_unknown_tables(tmp_path):
    with pytest.raises(ValueError, match="lacks check, reason"):
        load_ledger(_write(tmp_path, '[[deviation]]\nadapter = "a"\ncase = "*"\nmax_units = 1\n'))
    with pytest.raises(ValueError, match="unknown top-level"):
        load_ledger(_write(tmp_path, ENTRY + "max_units = 1\n[[deviations]]\nadapter = 'x'\n"))


def _result(*checks: CheckResult) -> AdapterResult:
    return AdapterResult(name="a1", convention=None, checks=list(checks))


def _check(status: str, units: float | None, rel: float | None = None, key: str = "y") -> CheckResult:
    return CheckResult("a1", "rank2-float64", "rank2-float64/step0-train", "forward", key, status,
                       units=units, rel=rel, message="m")


def test_bound_is_enforced_and_worst_recorded(tmp_path):
    (entry,) = load_ledger(_write(tmp_path, ENTRY + "max_units = 5\n"))
    res = _result(_check("fail", 4.0), _check("fail", 6.0), _check("pass", 0.5), _check("fail", float("inf")),
                  _check("error", None), _check("fail", 9.0, key="dx"))
    engine._apply_ledger(res, [entry])
    assert [c.status for c in res.checks] == ["xfail", "fail", "pass", "fail", "error", "fail"]
    assert "above the ledger bound max_units = 5" in res.checks[1].message
    assert entry.matched == 1 and entry.exceeded == 3 and entry.passed == 1
    assert entry.worst_units == 4.0 and entry.state == "exceeded"


def test_relative_bound_and_xpass(tmp_path):
    (rel,) = load_ledger(_write(tmp_path, ENTRY + "max_rel = 1e-6\n"))
    res = _result(_check("fail", 1e6, rel=5e-7), _check("fail", 1e6, rel=2e-6))
    engine._apply_ledger(res, [rel])
    assert [c.status for c in res.checks] == ["xfail", "fail"] and rel.worst_rel == 5e-7
    (never,) = load_ledger(_write(tmp_path, ENTRY + "max_units = 2\n"))
    engine._apply_ledger(_result(_check("pass", 0.3)), [never])
    assert never.state == "xpass"


def test_shipped_ledger_is_bounded():

    from bn_ref.conformance.cli import default_ledger_path

    entries = load_ledger(default_ledger_path())
    assert entries and all((e.max_units is None) != (e.max_rel is None) for e in entries)
    assert not [e for e in entries if e.adapter.startswith("keras") and "float64" in e.case and e.check == "*"]


def test_half_precision_entries_excuse_no_more_than_computing_in_t():
    """An entry excusing "computes in float16/bfloat16" is bounded by C_ELEM * u_T relative (the
    derivation in the ledger): a 1 % scale error (float16) or a sign flip (both) must still exceed it."""
    from bn_ref.conformance.cli import default_ledger_path
    from bn_ref.tolerances import C_ELEM, tolerance

    half = {"dtype-float16*": "float16", "dtype-bfloat16": "bfloat16"}
    entries = [e for e in load_ledger(default_ledger_path()) if e.case in half and e.max_rel is not None]
    assert len(entries) >= 8  # haiku, stax, tinygrad, mlx x 2 dtypes
    for e in entries:
        bound = C_ELEM * tolerance(half[e.case]).u
        assert e.max_rel <= bound * 1.01, (e.adapter, e.case, e.max_rel, bound)
        assert 2.0 > e.max_rel  # sign flip
        if half[e.case] == "float16":
            assert 0.01 > e.max_rel  # 1 % scale error


def test_no_family_entry_keeps_a_restated_bound():
    from bn_ref.conformance.cli import default_ledger_path

    assert not [e.adapter for e in load_ledger(default_ledger_path()) if "Bound restated" in e.reason]
