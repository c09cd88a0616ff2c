"""Reports: the JSON document, and the console and Markdown matrices rendered from it.

:func:`build_report` turns the engine's results into one JSON-ready :class:`Report` (typed
records, so a saved ``report.json`` can be rendered again); each section of the console and
Markdown output is one small function over those records.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import re
import sys
from collections import Counter
from typing import Any, Literal, Mapping, Sequence, TypedDict

from .. import SPEC_VERSION
from ..tolerances import TOLERANCES
from .cases import ALL_SPECS
from .engine import GROUPS, AdapterResult, LedgerEntry, Status, group_cells

__all__ = ["build_report", "render_console", "render_markdown", "unexpected", "versions", "repro_snippet",
           "write_text", "Report"]

SCHEMA = "bn-ref-conformance/1"

CellStatus = Literal["pass", "fail", "error", "skip", "xfail", "none"]
BAD: tuple[Status, ...] = ("fail", "error")


class Cell(TypedDict):
    """One check group of one adapter: worst status, worst error (tolerance units), counts."""

    status: CellStatus
    worst: float | None
    counts: dict[str, int]


class SkippedCase(TypedDict):
    case: str
    reason: str


class AdapterRow(TypedDict):
    name: str
    factory: str | None
    convention: dict[str, Any] | str
    description: str
    wall_s: float
    build_error: str | None
    build_skip: str | None
    groups: dict[str, Cell]
    skipped_cases: list[SkippedCase]
    random: list[dict[str, Any]]
    findings: list[str]  # declared properties such as "computes in float32" (not deviations)


class CheckRecord(TypedDict, total=False):
    """A check that did not pass (``CheckResult.to_json``), with the failure's explanation."""

    adapter: str
    case: str
    step: str
    group: str
    key: str
    status: Status
    units: float | str | None
    message: str
    reason: str
    ratio: float | None  # least-squares scale of the output against the oracle's (1 is exact)
    explained_by: str | None  # the neighbouring convention under which the step passes


class LedgerRecord(TypedDict, total=False):
    adapter: str
    case: str
    check: str
    reason: str
    matched: int
    passed: int
    state: str


class LedgerInfo(TypedDict):
    path: str | None
    entries: list[LedgerRecord]


Totals = TypedDict("Totals", {"pass": int, "fail": int, "error": int, "xfail": int, "skip": int,
                              "build_errors": int, "build_skips": int, "xpass_entries": int})


class _ReportExtras(TypedDict, total=False):
    spec_version: str  # the docs/spec.md version checked (bn_ref.SPEC_VERSION)
    fold: list[dict[str, Any]]  # the built-in run's fold rows (spec §12, bn_ref.porting.fold_checks)


class Report(_ReportExtras):
    schema: str
    generated: str
    command: str
    selection: str | None
    wall_s: float
    versions: dict[str, str]
    tolerances: dict[str, dict[str, float]]
    ledger: LedgerInfo
    cases: list[dict[str, Any]]
    adapters: list[AdapterRow]
    totals: Totals
    non_pass_checks: list[CheckRecord]
    unexpected: int


# -- building -----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions of Python and of the frameworks that are importable (without importing new ones)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    from importlib import metadata

    for dist in ("bn-ref", "numpy", "torch", "jax", "jaxlib", "flax", "keras", "onnx", "onnxruntime", "ml_dtypes",
                 "hypothesis"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        out["torch_cuda"] = str(sys.modules["torch"].cuda.is_available())
    if "jax" in sys.modules:
        out["jax_backend"] = str(sys.modules["jax"].default_backend())
    return out


def _conv_json(conv: Any) -> dict[str, Any] | str:
    try:
        return dataclasses.asdict(conv)
    except TypeError:
        return repr(conv)


OWN_PREFIXES = ("bn_ref.",)
"""Rows that are bn-ref's own (its layers and the oracle's self-check); the rest are framework rows."""


def own_unexpected(report: Mapping[str, Any] | Report) -> int:
    """Unexpected failures and errors in bn-ref's own rows (and load errors of those rows).

    The built-in matrix exits 1 on these only: a framework row that fails is a finding about that
    framework (listed, and in ``docs/findings.md``), not a failure of the run; ``--strict`` counts
    every row.
    """
    n = sum(1 for c in report.get("non_pass_checks", [])
            if c.get("status") in BAD and str(c.get("adapter", "")).startswith(OWN_PREFIXES))
    n += sum(1 for a in report.get("adapters", [])
             if a.get("build_error") and str(a.get("name", "")).startswith(OWN_PREFIXES))
    n += sum(1 for r in report.get("fold", []) or []
             if str(r.get("row", "")).startswith(OWN_PREFIXES) and (r.get("error") or not (r.get("skip") or r.get("passed"))))
    return n


def unexpected(results: Sequence[AdapterResult]) -> int:
    """Number of unexpected failures and errors, load errors included (the exit status is 1 when > 0)."""
    n = sum(1 for r in results if r.build_error)
    return n + sum(1 for r in results for c in r.checks if c.status in BAD)


def repro_snippet(factory: str | None, name: str, dtype: str, params: Mapping[str, Any]) -> str:
    """Python that rebuilds a shrunk random case and checks it on the adapter (runs as printed).

    >>> print(repro_snippet("pkg.mod:factory", "my-bn", "float64", {"shape": (6, 3)}).splitlines()[4])
    adapter = next(a for a in load('pkg.mod:factory').adapters if a.name == 'my-bn')
    """
    args = ", ".join(f"{k}={v!r}" for k, v in params.items())
    get = (f"adapter = next(a for a in load({factory!r}).adapters if a.name == {name!r})" if factory
           else f"adapter = ...  # the adapter named {name!r}")
    return (
        "from bn_ref.conformance.adapters import load\n"
        "from bn_ref.conformance.cases import make_case\n"
        "from bn_ref.conformance.engine import check_steps\n"
        "\n"
        f"{get}\n"
        f"case = make_case(convention=adapter.convention, dtype={dtype!r}, {args})\n"
        f"for r in check_steps(adapter, {name!r}, 'repro', [case]):\n"
        "    print(r.status, r.key, r.message)\n"
    )


def _adapter_row(r: AdapterResult, factory: str | None) -> AdapterRow:
    cells = group_cells(r)
    skipped = sorted({(c.case, c.message) for c in r.checks if c.group == "case" and c.status == "skip"})
    random = []
    for entry in r.random:
        entry = dict(entry)
        if "params" in entry and "case" in entry:
            entry["repro"] = repro_snippet(factory, r.name, str(entry["case"]).split("-", 1)[1], entry["params"])
        random.append(entry)
    return {
        "name": r.name,
        "factory": factory,
        "convention": _conv_json(r.convention),
        "description": r.description,
        "wall_s": round(r.wall_s, 3),
        "build_error": r.build_error,
        "build_skip": r.build_skip,
        "groups": {g: Cell(status=cells[g]["status"], worst=cells[g]["worst"], counts=dict(cells[g]["counts"]))
                   for g in GROUPS},
        "skipped_cases": [{"case": c, "reason": m} for c, m in skipped],
        "random": random,
        "findings": list(getattr(r, "findings", [])),
    }


def _totals(results: Sequence[AdapterResult], ledger: Sequence[LedgerEntry]) -> Totals:
    n = Counter(c.status for r in results for c in r.checks)
    return {"pass": n["pass"], "fail": n["fail"], "error": n["error"], "xfail": n["xfail"], "skip": n["skip"],
            "build_errors": sum(1 for r in results if r.build_error),
            "build_skips": sum(1 for r in results if r.build_skip),
            "xpass_entries": sum(1 for e in ledger if e.state == "xpass")}


def build_report(
    results: Sequence[AdapterResult], ledger: Sequence[LedgerEntry], *, command: str, selection: str | None,
    wall_s: float, ledger_path: str | None, explained: Mapping[str, Mapping[str, Any]] | None = None,
    factories: Mapping[str, str] | None = None,
) -> Report:
    """The JSON report. ``explained``: ``"adapter|step|key"`` -> ratio and explanation of a failure
    (see :mod:`.explain`); ``factories``: adapter name -> its ``module:factory`` spec."""
    explained = explained or {}
    factories = factories or {}
    # Per-key skips (e.g. no gradients) are summarized in the group counts; case-level skips keep their reason.
    checks: list[CheckRecord] = []
    for r in results:
        for c in r.checks:
            if c.status in ("fail", "error", "xfail") or (c.status == "skip" and c.group == "case"):
                rec: CheckRecord = c.to_json()  # type: ignore[assignment]
                extra = explained.get(f"{c.adapter}|{c.step}|{c.key}")
                if extra is not None:
                    rec["ratio"] = extra.get("ratio")
                    rec["explained_by"] = extra.get("explained_by")
                checks.append(rec)
    return {
        "spec_version": SPEC_VERSION,  # the docs/spec.md version the matrix checks against
        "schema": SCHEMA,
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "selection": selection,
        "wall_s": round(wall_s, 1),
        "versions": versions(),
        "tolerances": {k: dataclasses.asdict(v) for k, v in TOLERANCES.items()},
        "ledger": {
            "path": ledger_path,
            "entries": [dataclasses.asdict(e) | {"state": e.state} for e in ledger],  # type: ignore[misc]
        },
        "cases": [{"id": s.id, "dtype": s.dtype, "shape": list(s.shape), "description": s.description,
                   "replicas": None if s.replicas is None else list(s.replicas)}
                  for s in ALL_SPECS],
        "adapters": [_adapter_row(r, factories.get(r.name)) for r in results],
        "totals": _totals(results, ledger),
        "non_pass_checks": checks,
        "unexpected": unexpected(results),
    }


# -- shared pieces ------------------------------------------------------------------------------

_LABEL = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "xfail": "deviation", "skip": "skip"}
_MD_LABEL = {"FAIL": "**FAIL**", "ERROR": "**ERROR**", "deviation": "*expected deviation*"}


def _cell(cell: Cell, *, markdown: bool = False) -> str:
    """``"FAIL 35 (4 pass)"``: worst status, worst error in tolerance units, the other counts.

    >>> _cell({"status": "fail", "worst": 35.2, "counts": {"fail": 2, "pass": 4}})
    'FAIL 35 (4 pass)'
    """
    st = cell["status"]
    if st == "none":
        return "-"
    label = _LABEL[st]
    if markdown:
        label = _MD_LABEL.get(label, label)
    worst = cell.get("worst")
    if worst is not None and st in ("pass", "fail", "xfail"):
        w = worst if isinstance(worst, (int, float)) else float("inf")
        label += f" {w:.2g}"
    counts = cell.get("counts", {})
    extra = []
    if st not in ("pass", "skip") and counts.get("pass"):
        extra.append(f"{counts['pass']} pass")
    if st != "skip" and counts.get("skip"):
        extra.append(f"{counts['skip']} skip")
    if extra:
        label += f" ({', '.join(extra)})"
    return label


def _units(c: CheckRecord) -> float:
    """A check's error for sorting: errors (no number) rank above every failure."""
    u = c.get("units")
    if c.get("status") == "error" or u is None:
        return float("inf")
    return u if isinstance(u, (int, float)) else float("inf")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _totals_line(t: Totals, *, markdown: bool = False) -> str:
    """One line of totals; rows that failed to load count as errors and are named as such.

    >>> t = {"pass": 3, "fail": 0, "error": 0, "xfail": 0, "skip": 1, "build_errors": 1, "build_skips": 0,
    ...      "xpass_entries": 0}
    >>> _totals_line(t)
    '3 passed, 0 failed, 1 error (1 adapter failed to load), 0 expected deviations, 1 skipped, 0 xpass ledger entries'
    """
    errors = t["error"] + t.get("build_errors", 0)
    err = _plural(errors, "error")
    if t.get("build_errors"):
        err += f" ({_plural(t['build_errors'], 'adapter')} failed to load)"
    skipped = f"{t['skip']} skipped"
    if t.get("build_skips"):
        skipped += f" ({_plural(t['build_skips'], 'adapter')} skipped whole)"
    if markdown:
        return (f"Totals: {t['pass']} checks passed, {t['fail']} failed, {err}, {t['xfail']} expected deviations, "
                f"{skipped}; {t['xpass_entries']} ledger entries did not occur (xpass).")
    return (f"{t['pass']} passed, {t['fail']} failed, {err}, {t['xfail']} expected deviations, {skipped}, "
            f"{t['xpass_entries']} xpass ledger entries")


def _failure_groups(report: Report) -> list[tuple[tuple[str, str, str], list[CheckRecord]]]:
    """Unexpected failures and errors grouped by (adapter, check group, key), worst group first."""
    groups: dict[tuple[str, str, str], list[CheckRecord]] = {}
    for c in report["non_pass_checks"]:
        if c["status"] in BAD:
            groups.setdefault((c["adapter"], c["group"], c["key"]), []).append(c)
    for members in groups.values():
        members.sort(key=_units, reverse=True)
    return sorted(groups.items(), key=lambda kv: (-_units(kv[1][0]), -len(kv[1]), kv[0]))


_ENGINE_UNITS = re.compile(r"^\w+: error [^;]+ x tolerance; ")
"""The engine's "key: error N x tolerance; " prefix, which a failure line already shows."""


def _failure_line(c: CheckRecord) -> str:
    """``FAIL step: 35.2 x tolerance, 0.998 x oracle; behaves as if eps=0.001 -- message``."""
    if c["status"] == "error":
        return f"ERROR {c['step']}: {c['message']}"
    parts = [f"{_units(c):.3g} x tolerance"]
    if c.get("ratio") is not None:
        parts.append(f"{c['ratio']:.6g} x oracle")
    text = f"FAIL {c['step']}: " + ", ".join(parts)
    if c.get("explained_by"):
        text += f"; behaves as if {c['explained_by']}"
    return text + f" -- {_ENGINE_UNITS.sub('', c['message'], count=1)}"


def _rerun(report: Report, adapter: str, step: str) -> str | None:
    factory = next((a["factory"] for a in report["adapters"] if a["name"] == adapter), None)
    if not factory:
        return None
    import shlex

    return f"python -m bn_ref.conformance --adapter {factory} -k {shlex.quote(step)} --no-ledger"


# -- console ------------------------------------------------------------------------------------


def _console_matrix(report: Report) -> list[str]:
    head = ["adapter"] + list(GROUPS) + ["cases skipped"]
    rows: list[list[str]] = []
    for a in report["adapters"]:
        if a["build_error"]:
            rows.append([a["name"], f"ERROR: {a['build_error']}"])
        elif a["build_skip"]:
            rows.append([a["name"], f"skip: {a['build_skip']}"])
        else:
            rows.append([a["name"]] + [_cell(a["groups"][g]) for g in GROUPS] + [str(len(a["skipped_cases"]))])
    full = [r for r in rows if len(r) == len(head)]
    widths = [min(60, max([len(head[i])] + [len(r[i]) for r in full] + ([len(r[0]) for r in rows] if i == 0 else [])))
              for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return lines + ["", "cells: worst status, then the worst error in units of the tolerance (<= 1 conforms)"]


def _console_failures(report: Report, *, per_group: int = 3, max_groups: int = 25) -> list[str]:
    groups = _failure_groups(report)
    if not groups:
        return []
    n_bad = sum(len(m) for _, m in groups)
    lines = ["", f"UNEXPECTED FAILURES ({n_bad}), by adapter and check, worst first:"]
    for (adapter, group, key), members in groups[:max_groups]:
        kinds = Counter(c["status"] for c in members)
        counts = ", ".join(f"{kinds[s]} {_LABEL[s]}" for s in BAD if kinds[s])
        worst = members[0]
        head = f"  {adapter}  {group}/{key}: {counts}"
        if worst["status"] == "fail":
            head += f", worst {_units(worst):.3g} x tolerance"
        lines.append(head)
        lines += [f"    {_failure_line(c)}" for c in members[:per_group]]
        if len(members) > per_group:
            lines.append(f"    ... {len(members) - per_group} more (see the JSON report)")
        rerun = _rerun(report, adapter, worst["step"])
        if rerun:
            lines.append(f"    rerun: {rerun}")
    if len(groups) > max_groups:
        rest = sum(len(m) for _, m in groups[max_groups:])
        lines.append(f"  ... {len(groups) - max_groups} more groups ({rest} checks; see the JSON report)")
    return lines


def _console_random(report: Report) -> list[str]:
    lines = []
    for a in report["adapters"]:
        for r in a["random"]:
            if r["status"] in BAD and r.get("repro"):
                lines += ["", f"{a['name']}: minimal failing random case ({r['case']}): {r['message']}",
                          "  reproduce with:"]
                lines += ["    " + ln if ln else "" for ln in r["repro"].splitlines()]
    return lines


def _console_ledger(report: Report) -> list[str]:
    entries = report["ledger"]["entries"]
    lines = []
    dev = [e for e in entries if e["state"] == "deviation"]
    if dev:
        lines += ["", "EXPECTED DEVIATIONS (ledger):"]
        lines += [f"  {e['adapter']} | {e['case']} | {e['check']}: {e['matched']} check(s) -- {e['reason']}"
                  for e in dev]
    xpass = [e for e in entries if e["state"] == "xpass"]
    if xpass:
        lines += ["", "XPASS (ledger entries whose deviation did not occur; update the ledger):"]
        lines += [f"  {e['adapter']} | {e['case']} | {e['check']}" for e in xpass]
    return lines


def render_console(report: Report) -> str:
    """The adapter x check-group matrix, the unexpected failures grouped worst first, the ledger, totals."""
    lines = (_console_matrix(report) + _console_failures(report) + _console_random(report)
             + _console_ledger(report) + ["", f"{_totals_line(report['totals'])}; {report['wall_s']} s"])
    return "\n".join(lines)


# -- Markdown -----------------------------------------------------------------------------------


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _conv_name(a: AdapterRow) -> str:
    conv = a["convention"]
    return str(conv.get("name", "?")) if isinstance(conv, dict) else str(conv)


def _md_header(report: Report) -> list[str]:
    v = report["versions"]
    return [
        "# Conformance report",
        "",
        "<!-- Generated file: do not edit. Regenerate with the command below. -->",
        "",
        f"Generated {report['generated']} by `{report['command']}` in {report['wall_s']} s"
        + (f" (selection `-k {report['selection']}`)" if report["selection"] else "") + ".",
        "",
        "Each row is one implementation, run under the convention it claims (`docs/spec.md` §9), on every case "
        "of the catalogue below, and compared with the oracle (`bn_ref.oracle`) evaluated on the same inputs "
        "rounded to the case dtype. A cell gives the worst status of its check group, then the worst error in "
        "units of the tolerance of §8.4 (1 is the edge of conformance). *Expected deviation* means the "
        "implementation departs from its preset in a way recorded, with the reason, in the ledger "
        f"(`{report['ledger']['path'] or 'none'}`); it is never counted as a pass.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "platform") + f"; {v.get('platform', '')}.",
        "",
    ]


def _md_matrix(report: Report) -> list[str]:
    out = ["## Matrix", "",
           "| adapter | convention | " + " | ".join(GROUPS) + " | cases skipped |",
           "|---|---|" + "---|" * len(GROUPS) + "---|"]
    for a in report["adapters"]:
        if a["build_error"] or a["build_skip"]:
            msg = f"**ERROR**: {a['build_error']}" if a["build_error"] else f"skip: {a['build_skip']}"
            out.append(f"| {_md_escape(a['name'])} | {_conv_name(a)} | {_md_escape(msg)} |" + " |" * len(GROUPS))
            continue
        cells = " | ".join(_cell(a["groups"][g], markdown=True) for g in GROUPS)
        out.append(f"| {_md_escape(a['name'])} | {_conv_name(a)} | {cells} | {len(a['skipped_cases'])} |")
    return out + [
        "",
        _totals_line(report["totals"], markdown=True),
        "",
        "Check groups: `forward` y in training (§2); `running` running mean and variance after each step (§3; "
        "eval must leave them unchanged); `eval` y in eval (§4); `backward` dx, dgamma, dbeta of sum(y·dy) (§5); "
        "`errors` n = 1 in training under `single_value=\"error\"` must raise (§7.1); `random` a derandomized "
        "hypothesis search over shapes, axes, locations and scales.",
        "",
    ]


def _row_counts(a: AdapterRow) -> Counter[str]:
    total: Counter[str] = Counter()
    for cell in a["groups"].values():
        total.update(cell["counts"])
    return total


def _md_findings(report: Report) -> list[str]:
    out = ["## Findings: each framework against the preset that claims to reproduce it", ""]
    reasons_by_adapter: dict[str, set[str]] = {}
    for c in report["non_pass_checks"]:
        if c["status"] == "xfail":
            reasons_by_adapter.setdefault(c["adapter"], set()).add(c.get("reason", ""))
    for a in report["adapters"]:
        if a["name"].startswith("bn_ref.") or a["build_error"] or a["build_skip"]:
            continue
        n = _row_counts(a)
        bad = n["fail"] + n["error"]
        line = f"- **{_md_escape(a['name'])}** vs preset `{_conv_name(a)}`: {n['pass']} checks pass"
        if bad:
            line += f", **{bad} fail unexpectedly**"
        reasons = sorted(reasons_by_adapter.get(a["name"], ()))
        if reasons:
            line += "; expected deviation: " + " / ".join(_md_escape(r.rstrip(".")) for r in reasons)
        elif not bad:
            line += "; no deviation found"
        for finding in a.get("findings", []):
            line += f"; finding: {_md_escape(finding.rstrip('.'))}"
        out.append(line + ".")
    own = [a for a in report["adapters"] if a["name"].startswith("bn_ref.")]
    if own:
        own_bad = sum(_row_counts(a)[s] for a in own for s in ("fail", "error", "xfail"))
        out.append(f"- bn-ref's own implementations ({len(own)} rows): "
                   + ("every executed check passes." if not own_bad else f"**{own_bad} checks do not pass**."))
    return out


def _md_deviations(report: Report) -> list[str]:
    out = ["", "## Expected deviations", ""]
    entries = report["ledger"]["entries"]
    if not entries:
        return out + ["None recorded."]
    out += ["| adapter | case | check | state | checks | reason |", "|---|---|---|---|---|---|"]
    out += [f"| {_md_escape(e['adapter'])} | {_md_escape(e['case'])} | {e['check']} | {e['state']} | "
            f"{e['matched']} | {_md_escape(e['reason'])} |" for e in entries]
    dev = [c for c in report["non_pass_checks"] if c["status"] == "xfail"]
    if not dev:
        return out
    out += ["", "Evidence: the worst deviating check of each adapter and case (error in units of tolerance):",
            "", "| adapter | case | checks | worst | detail |", "|---|---|---|---|---|"]
    by_case: dict[tuple[str, str], list[CheckRecord]] = {}
    for c in dev:
        by_case.setdefault((c["adapter"], c["case"]), []).append(c)
    for (ad, case), members in sorted(by_case.items()):
        worst = max(members, key=_units)
        shown = f"{_units(worst):.3g}" if worst.get("units") is not None else "-"
        out.append(f"| {_md_escape(ad)} | `{case}` | {len(members)} | {shown} | {_md_escape(worst['message'])} |")
    return out


def _md_failures(report: Report, *, limit: int = 200) -> list[str]:
    out = ["", "## Unexpected failures", ""]
    groups = _failure_groups(report)
    if not groups:
        return out + ["None."]
    out += ["Grouped by adapter and check, worst first; *behaves as if* names the neighbouring convention "
            "under which the step passes.", "",
            "| adapter | step | check | status | error (x tolerance) | x oracle | behaves as if | message |",
            "|---|---|---|---|---|---|---|---|"]
    rows = [c for _, members in groups for c in members][:limit]
    for c in rows:
        units = "-" if c["status"] == "error" else f"{_units(c):.3g}"
        ratio = "-" if c.get("ratio") is None else f"{c['ratio']:.4g}"
        out.append(f"| {_md_escape(c['adapter'])} | {c['step']} | {c['group']}/{c['key']} | {c['status']} | {units} | "
                   f"{ratio} | {_md_escape(c.get('explained_by') or '-')} | {_md_escape(c['message'])} |")
    return out


def _md_random(report: Report) -> list[str]:
    shrunk = [(a["name"], r) for a in report["adapters"] for r in a["random"] if r.get("repro")]
    if not shrunk:
        return []
    out = ["", "## Minimal failing random cases", "",
           "Shrunk by hypothesis; each snippet rebuilds the case and checks it on the adapter."]
    for name, r in shrunk:
        out += ["", f"**{_md_escape(name)}**, `{r['case']}` ({r['status']}): {_md_escape(r['message'])}", "",
                "```python", r["repro"].rstrip(), "```"]
    return out


def _md_skipped(report: Report) -> list[str]:
    out = ["", "## Skipped cases", "", "Cases an adapter declined because its framework cannot express them "
           "(the reason is the adapter's):", ""]
    lines = []
    for a in report["adapters"]:
        reasons: dict[str, list[str]] = {}
        for s in a["skipped_cases"]:
            reasons.setdefault(s["reason"], []).append(s["case"])
        lines += [f"- **{_md_escape(a['name'])}** ({len(cases)}): {_md_escape(reason)} — "
                  + ", ".join(f"`{c}`" for c in cases) for reason, cases in reasons.items()]
    return out + (lines or ["None."])


def _md_cases(report: Report) -> list[str]:
    out = ["", "## Cases", "", "| id | dtype | shape (N, C, ...) | what it checks |", "|---|---|---|---|"]
    out += [f"| `{c['id']}` | {c['dtype']} | {tuple(c['shape'])} | {_md_escape(c['description'])} |"
            for c in report["cases"] if c.get("replicas") is None]
    dist = [c for c in report["cases"] if c.get("replicas") is not None]
    if dist:
        out += ["", "Cross-replica cases (§11): the global batch split along axis 0 into per-replica batches. "
                "Distributed rows (world size P) run the cases with P replicas (a world of one runs them all on "
                "its only replica); every other row runs them on the global batch unchanged. The reference is the "
                "oracle on the concatenated global batch.", "",
                "| id | dtype | global shape (N, C, ...) | replicas | what it checks |", "|---|---|---|---|---|"]
        out += [f"| `{c['id']}` | {c['dtype']} | {tuple(c['shape'])} | {tuple(c['replicas'])} | "
                f"{_md_escape(c['description'])} |" for c in dist]
    return out + ["", "Random cases: `random-float64` and `random-float32` draw shapes, feature axes, locations and "
                  "scales with hypothesis (derandomized, no example database), and shrink a failure to a minimal "
                  "case with a reproduction snippet (in the JSON report).", ""]


def _md_tolerances(report: Report) -> list[str]:
    out = ["## Tolerances (§8.4)", "",
           "Each element is judged against its own bound (spec §8.4): a per-dtype `atol`/`rtol`, the rounding to the "
           "working dtype, and a per-channel, capped conditioning term in the accumulation precision. The per-dtype "
           "constants:", "", "| dtype | rtol | atol | unit round-off |", "|---|---|---|---|"]
    out += [f"| {k} | {tol['rtol']:g} | {tol['atol']:g} | {tol['u']:.3g} |" for k, tol in report["tolerances"].items()]
    return out + [""]


_MD_SECTIONS = (_md_header, _md_matrix, _md_findings, _md_deviations, _md_failures, _md_random, _md_skipped,
                _md_cases, _md_tolerances)


def render_markdown(report: Report) -> str:
    """``docs/conformance.md``: the evidence table for the conventions of ``docs/spec.md`` §9."""
    text = "\n".join(line for section in _MD_SECTIONS for line in section(report))
    fold = report.get("fold")  # the built-in run's fold rows (spec §12)
    if fold:
        from ..porting.fold_checks import markdown_table

        text = text.rstrip("\n") + "\n\n" + markdown_table(fold)
    return text


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8), creating the parent folder the user named."""
    import os

    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)

