"""Merge per-family conformance reports (JSON) into one report and one Markdown matrix.

Each family (:mod:`bn_ref.conformance.families`) runs the harness in its own process and writes
a report of the usual schema. :func:`merge_reports` joins them: the rows in family order (each row
tagged with its family), the non-passing checks, the totals added, every ledger entry's counts
added across families (its state recomputed: an entry seen deviating in any family is a
deviation; one exercised and passing everywhere is xpass; else unexercised), versions per family.
The Markdown is rendered by :func:`bn_ref.conformance.report.render_markdown` (the only coupling to
the report module, in :func:`render`), followed by a per-family table of harness time and install
size.

    python -m bn_ref.conformance.merge DIR --json conformance/report.json --markdown docs/conformance.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Sequence, cast

__all__ = ["merge_reports", "family_table", "render", "load_dir", "main"]

_STATE_ORDER = ("unexercised", "xpass", "deviation")  # later wins; a state this module does not know wins too
_TOTAL_KEYS = ("pass", "fail", "error", "xfail", "skip", "build_errors")


def _state(entry: dict[str, Any]) -> str:
    if "matched" in entry and "passed" in entry:
        if entry["matched"]:
            return "deviation"
        return "xpass" if entry["passed"] else "unexercised"
    return str(entry.get("state", "unexercised"))


def _merge_ledger(reports: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    merged: dict[tuple, dict[str, Any]] = {}
    path = None
    for _fam, rep in reports:
        led = rep.get("ledger") or {}
        path = path or led.get("path")
        for e in led.get("entries", []):
            key = (e.get("adapter"), e.get("case"), e.get("check"))
            cur = merged.get(key)
            if cur is None:
                merged[key] = copy.deepcopy(e)
                continue
            for k in ("matched", "passed"):
                if k in e:
                    cur[k] = cur.get(k, 0) + e[k]
            states = [cur.get("state", "unexercised"), e.get("state", "unexercised")]
            rank = [(_STATE_ORDER.index(s) if s in _STATE_ORDER else len(_STATE_ORDER)) for s in states]
            cur["state"] = states[rank.index(max(rank))]
    for e in merged.values():
        if "matched" in e and "passed" in e and e.get("state") in _STATE_ORDER:
            e["state"] = _state(e)
    return {"path": path, "entries": list(merged.values())}


MATRIX_META = "_matrix.meta.json"  # the same name as families.MATRIX_META (not imported: no cycle)


def merge_reports(reports: Sequence[tuple[str, dict[str, Any]]], *,
                  meta: dict[str, dict[str, Any]] | None = None, command: str = "") -> dict[str, Any]:
    """One report from ``(family, report)`` pairs, in the given order.

    The first report with cases and tolerances provides them (every family runs the same
    catalogue). ``meta`` maps a family to its run facts (harness seconds, install size).
    """
    if not reports:
        raise ValueError("merge_reports: no family reports to merge")
    base = next((r for _, r in reports if r.get("cases")), reports[0][1])
    adapters: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    totals = dict.fromkeys(_TOTAL_KEYS, 0)
    versions: dict[str, Any] = {}
    for fam, rep in reports:
        for a in rep.get("adapters", []):
            adapters.append(dict(a, family=fam))
        checks.extend(dict(c, family=fam) for c in rep.get("non_pass_checks", []))
        for k in _TOTAL_KEYS:
            totals[k] += int(rep.get("totals", {}).get(k, 0))
        for k, v in rep.get("versions", {}).items():
            if versions.get(k, v) != v:  # the same package at another version in another family's venv
                versions[f"{k} [{fam}]"] = v
            else:
                versions.setdefault(k, v)
    ledger = _merge_ledger(reports)
    totals["xpass_entries"] = sum(1 for e in ledger["entries"] if e.get("state") == "xpass")
    out = {k: copy.deepcopy(v) for k, v in base.items()}
    out.update({
        "command": command or "nox -s conformance (families: " + ", ".join(f for f, _ in reports) + ")",
        "wall_s": round(sum(float(r.get("wall_s") or 0) for _, r in reports), 1),
        "versions": versions,
        "ledger": ledger,
        "adapters": adapters,
        "totals": totals,
        "non_pass_checks": checks,
        "unexpected": sum(int(r.get("unexpected", 0)) for _, r in reports),
        "families": [{"family": f, **((meta or {}).get(f, {}))} for f, _ in reports],
    })
    return out


def family_table(merged: dict[str, Any]) -> str:
    """Markdown: per family, its rows, status, harness seconds and install size."""
    lines = ["## Framework families", "",
             "Each family runs in its own virtual environment and process (`bn_ref/conformance/families.py`); "
             "`nox -s conformance` runs them all and merges the reports, `nox -s conformance -- --only NAME` "
             "runs one. Harness time is the family's process (wall seconds), environments already built; CPU s "
             "is its user + system time (children included), which a loaded machine does not inflate; JAX's "
             "persistent compilation cache lives beside the venvs (a cold run compiles every JAX program and "
             "fills it). Install size is the family's venv on disk.", "",
             "| family | rows | checks passed | harness s | CPU s | load avg (1 min, start / end) | install MB | notes |",
             "|---|---|---|---|---|---|---|---|"]
    tot_h = tot_c = 0.0
    for fam in merged.get("families", []):
        name = fam["family"]
        rows = [a for a in merged["adapters"] if a.get("family") == name]
        passed = sum(c.get("counts", {}).get("pass", 0) for a in rows for c in a.get("groups", {}).values())
        note = fam.get("reason") or ("shares the venv of " + fam["env"].rsplit("family-", 1)[-1]
                                     if fam.get("env", "").rsplit("family-", 1)[-1] not in (name, "core")
                                     and "family-" in fam.get("env", "") else "")
        size = fam.get("install_mb", "-") if fam.get("env") != "core" else "(core env)"
        tot_h += float(fam.get("harness_s") or 0)
        tot_c += float(fam.get("cpu_s") or 0)
        load = "-"
        if fam.get("load_avg_start") and fam.get("load_avg_end"):
            load = f"{fam['load_avg_start'][0]} / {fam['load_avg_end'][0]}"
        lines.append(f"| {name} | {len(rows)} | {passed} | {fam.get('harness_s', '-')} | {fam.get('cpu_s', '-')} | "
                     f"{load} | {size} | {str(note).replace('|', '/')} |")
    lines += ["", f"Sum over the families: {round(tot_h, 1)} s of harness time, {round(tot_c, 1)} CPU seconds."]
    run = merged.get("matrix")
    if run:
        lines.append(f"The whole run: {run.get('wall_s')} s wall with `--jobs {run.get('jobs')}` on "
                     f"{run.get('cpu_count')} CPUs, load average {run.get('load_avg_start')} at the start and "
                     f"{run.get('load_avg_end')} at the end (1, 5, 15 min; other processes share the machine: "
                     "wall time is CPU time stretched by the load, CPU seconds are not).")
    return "\n".join(lines) + "\n"


def render(merged: dict[str, Any]) -> str:
    """``docs/conformance.md`` for a merged report."""
    from . import report as _report  # the single call site into the report module

    return _report.render_markdown(cast("_report.Report", merged)).rstrip("\n") + "\n\n" + family_table(merged)


def load_dir(directory: Path, order: Sequence[str] | None = None) -> tuple[list[tuple[str, dict]], dict[str, dict]]:
    """``(family, report)`` pairs and family metadata from ``DIR/<family>.json`` and ``.meta.json``."""
    if order is None:
        from .families import FAMILIES

        order = [f.name for f in FAMILIES]
    found = {p.stem: p for p in directory.glob("*.json") if not p.name.endswith(".meta.json")}
    names = [n for n in order if n in found] + sorted(n for n in found if n not in order)
    reports = [(n, json.loads(found[n].read_text())) for n in names]
    meta = {}
    for n in names:
        mp = directory / f"{n}.meta.json"
        if mp.is_file():
            meta[n] = json.loads(mp.read_text())
    return reports, meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bn_ref.conformance.merge", description=__doc__.splitlines()[0])
    p.add_argument("dir", help="directory of family reports (NAME.json, NAME.meta.json)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--families", default=None, help="comma-separated families to merge (default: all found)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 on any unexpected result (default: only on bn-ref's own rows; framework rows' "
                        "failures are findings)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    reports, meta = load_dir(Path(args.dir))
    if args.families:
        keep = set(args.families.split(","))
        reports = [(f, r) for f, r in reports if f in keep]
    if not reports:
        print(f"error: no family reports in {args.dir}", file=sys.stderr)
        return 2
    merged = merge_reports(reports, meta=meta)
    run_meta = Path(args.dir) / MATRIX_META
    if run_meta.is_file() and not args.families:
        merged["matrix"] = json.loads(run_meta.read_text())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(merged, indent=1, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render(merged))
    t = merged["totals"]
    print(f"merged {len(reports)} families, {len(merged['adapters'])} rows: {t['pass']} passed, {t['fail']} failed, "
          f"{t['error']} errors, {t['xfail']} expected deviations, {t['skip']} skipped, "
          f"{t['build_errors']} build errors, {t['xpass_entries']} xpass ledger entries")
    if args.strict:
        return 1 if merged["unexpected"] else 0
    from .report import own_unexpected

    own = own_unexpected(merged)
    if merged["unexpected"] and not own:
        print(f"{merged['unexpected']} unexpected result(s), all in framework rows: findings about those frameworks "
              "(docs/findings.md), not failures of bn-ref; exit status 0 (--strict counts them)")
    return 1 if own else 0


if __name__ == "__main__":
    sys.exit(main())
