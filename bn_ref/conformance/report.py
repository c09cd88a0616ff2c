"""Reports: the JSON document, and the console and Markdown matrices rendered from it."""

from __future__ import annotations

import dataclasses
import datetime
import platform
import sys
from typing import Any, Sequence

from ..tolerances import TOLERANCES
from .cases import ALL_SPECS
from .engine import GROUPS, AdapterResult, LedgerEntry, group_cells

__all__ = ["build_report", "render_console", "render_markdown", "unexpected", "versions"]

SCHEMA = "bn-ref-conformance/1"


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


def unexpected(results: Sequence[AdapterResult]) -> int:
    """Number of unexpected failures and errors (the exit status is non-zero when > 0)."""
    n = sum(1 for r in results if r.build_error)
    return n + sum(1 for r in results for c in r.checks if c.status in ("fail", "error"))


def build_report(
    results: Sequence[AdapterResult], ledger: Sequence[LedgerEntry], *, command: str, selection: str | None,
    wall_s: float, ledger_path: str | None,
) -> dict[str, Any]:
    adapters = []
    for r in results:
        cells = group_cells(r)
        skipped = sorted({(c.case, c.message) for c in r.checks if c.group == "case" and c.status == "skip"})
        adapters.append({
            "name": r.name,
            "convention": _conv_json(r.convention),
            "description": r.description,
            "wall_s": round(r.wall_s, 3),
            "build_error": r.build_error,
            "build_skip": r.build_skip,
            "groups": {g: cells[g] for g in GROUPS},
            "skipped_cases": [{"case": c, "reason": m} for c, m in skipped],
            "random": r.random,
            "findings": list(getattr(r, "findings", [])),
        })
    # Per-key skips (e.g. no gradients) are summarized in the group counts; case-level skips keep their reason.
    checks = [c.to_json() for r in results for c in r.checks
              if c.status in ("fail", "error", "xfail") or (c.status == "skip" and c.group == "case")]
    passes = sum(1 for r in results for c in r.checks if c.status == "pass")
    return {
        "schema": SCHEMA,
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "selection": selection,
        "wall_s": round(wall_s, 1),
        "versions": versions(),
        "tolerances": {k: dataclasses.asdict(v) for k, v in TOLERANCES.items()},
        "ledger": {
            "path": ledger_path,
            "entries": [dataclasses.asdict(e) | {"state": e.state} for e in ledger],
        },
        "cases": [{"id": s.id, "dtype": s.dtype, "shape": list(s.shape), "description": s.description,
                   "replicas": None if s.replicas is None else list(s.replicas)}
                  for s in ALL_SPECS],
        "adapters": adapters,
        "totals": {
            "pass": passes,
            **{s: sum(1 for r in results for c in r.checks if c.status == s) for s in ("fail", "error", "xfail", "skip")},
            "build_errors": sum(1 for r in results if r.build_error),
            "xpass_entries": sum(1 for e in ledger if e.state == "xpass"),
        },
        "non_pass_checks": checks,
        "unexpected": unexpected(results),
    }


def _cell(cell: dict[str, Any], *, markdown: bool = False) -> str:
    st = cell["status"]
    if st == "none":
        return "-"
    worst = cell.get("worst")
    label = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "xfail": "deviation", "skip": "skip"}[st]
    if markdown:
        label = {"FAIL": "**FAIL**", "ERROR": "**ERROR**", "deviation": "*expected deviation*"}.get(label, label)
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


def render_console(report: dict[str, Any], *, max_messages: int = 8) -> str:
    """The adapter x check-group matrix, then the unexpected failures and the deviations."""
    lines = []
    head = ["adapter"] + list(GROUPS) + ["cases skipped"]
    rows = []
    for a in report["adapters"]:
        if a["build_error"]:
            rows.append([a["name"], f"ERROR: {a['build_error']}"] + [""] * (len(head) - 2))
            continue
        if a["build_skip"]:
            rows.append([a["name"], f"skip: {a['build_skip']}"] + [""] * (len(head) - 2))
            continue
        rows.append([a["name"]] + [_cell(a["groups"][g]) for g in GROUPS] + [str(len(a["skipped_cases"]))])
    widths = [max(len(str(r[i])) for r in rows + [head]) if all(len(r) > i for r in rows) else len(head[i])
              for i in range(len(head))]
    widths = [min(w, 60) for w in widths]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append("")
    lines.append("cells: worst status, then the worst error in units of the tolerance (<= 1 conforms)")
    bad = [c for c in report["non_pass_checks"] if c["status"] in ("fail", "error")]
    if bad:
        lines.append("")
        lines.append(f"UNEXPECTED FAILURES ({len(bad)}):")
        per: dict[str, int] = {}
        for c in bad:
            per[c["adapter"]] = per.get(c["adapter"], 0) + 1
            if per[c["adapter"]] <= max_messages:
                lines.append(f"  {c['status'].upper()} {c['adapter']} | {c['step']} | {c['group']}/{c['key']}: {c['message']}")
        for name, n in per.items():
            if n > max_messages:
                lines.append(f"  ... {n - max_messages} more for {name} (see the JSON report)")
    for a in report["adapters"]:
        for r in a["random"]:
            if r["status"] in ("fail", "error") and r.get("repro"):
                lines.append("")
                lines.append(f"{a['name']}: minimal failing random case ({r['case']}): {r['message']}")
                lines.append("  reproduce with:")
                lines.extend("    " + ln for ln in r["repro"].splitlines())
    entries = report["ledger"]["entries"]
    dev = [e for e in entries if e["state"] == "deviation"]
    if dev:
        lines.append("")
        lines.append("EXPECTED DEVIATIONS (ledger):")
        for e in dev:
            lines.append(f"  {e['adapter']} | {e['case']} | {e['check']}: {e['matched']} check(s) -- {e['reason']}")
    xpass = [e for e in entries if e["state"] == "xpass"]
    if xpass:
        lines.append("")
        lines.append("XPASS (ledger entries whose deviation did not occur; update the ledger):")
        for e in xpass:
            lines.append(f"  {e['adapter']} | {e['case']} | {e['check']}")
    t = report["totals"]
    lines.append("")
    lines.append(
        f"{t['pass']} passed, {t['fail']} failed, {t['error']} errors, {t['xfail']} expected deviations, "
        f"{t['skip']} skipped, {t['xpass_entries']} xpass ledger entries; {report['wall_s']} s"
    )
    return "\n".join(lines)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    """``docs/conformance.md``: the evidence table for the conventions of ``docs/spec.md`` §9."""
    v = report["versions"]
    out = [
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
        "## Matrix",
        "",
        "| adapter | convention | " + " | ".join(GROUPS) + " | cases skipped |",
        "|---|---|" + "---|" * len(GROUPS) + "---|",
    ]
    for a in report["adapters"]:
        conv = a["convention"]
        cname = conv.get("name", "?") if isinstance(conv, dict) else str(conv)
        if a["build_error"] or a["build_skip"]:
            msg = f"**ERROR**: {a['build_error']}" if a["build_error"] else f"skip: {a['build_skip']}"
            out.append(f"| {_md_escape(a['name'])} | {cname} | {_md_escape(msg)} |" + " |" * len(GROUPS))
            continue
        cells = " | ".join(_cell(a["groups"][g], markdown=True) for g in GROUPS)
        out.append(f"| {_md_escape(a['name'])} | {cname} | {cells} | {len(a['skipped_cases'])} |")
    t = report["totals"]
    out += [
        "",
        f"Totals: {t['pass']} checks passed, {t['fail']} failed, {t['error']} errors, {t['xfail']} expected "
        f"deviations, {t['skip']} skipped; {t['xpass_entries']} ledger entries did not occur (xpass).",
        "",
        "Check groups: `forward` y in training (§2); `running` running mean and variance after each step (§3; "
        "eval must leave them unchanged); `eval` y in eval (§4); `backward` dx, dgamma, dbeta of sum(y·dy) (§5); "
        "`errors` n = 1 in training under `single_value=\"error\"` must raise (§7.1); `random` a derandomized "
        "hypothesis search over shapes, axes, locations and scales.",
        "",
        "## Findings: each framework against the preset that claims to reproduce it",
        "",
    ]
    reasons_by_adapter: dict[str, set[str]] = {}
    for c in report["non_pass_checks"]:
        if c["status"] == "xfail":
            reasons_by_adapter.setdefault(c["adapter"], set()).add(c["reason"])
    for a in report["adapters"]:
        if a["name"].startswith("bn_ref.") or a["build_error"] or a["build_skip"]:
            continue
        conv = a["convention"]
        cname = conv.get("name", "?") if isinstance(conv, dict) else str(conv)
        n_pass = sum(cell["counts"].get("pass", 0) for cell in a["groups"].values())
        bad = sum(cell["counts"].get(s, 0) for cell in a["groups"].values() for s in ("fail", "error"))
        line = f"- **{_md_escape(a['name'])}** vs preset `{cname}`: {n_pass} checks pass"
        if bad:
            line += f", **{bad} fail unexpectedly**"
        reasons = sorted(reasons_by_adapter.get(a["name"], ()))
        if reasons:
            line += "; expected deviation: " + " / ".join(_md_escape(r.rstrip(".")) for r in reasons)
        elif not bad:
            line += "; no deviation found"
        out.append(line + ".")
    own = [a for a in report["adapters"] if a["name"].startswith("bn_ref.")]
    if own:
        own_bad = sum(cell["counts"].get(s, 0) for a in own for cell in a["groups"].values()
                      for s in ("fail", "error", "xfail"))
        out.append(f"- bn-ref's own implementations ({len(own)} rows): "
                   + ("every executed check passes." if not own_bad else f"**{own_bad} checks do not pass**."))
    out += ["", "## Expected deviations", ""]
    entries = report["ledger"]["entries"]
    if entries:
        out += ["| adapter | case | check | state | checks | reason |", "|---|---|---|---|---|---|"]
        for e in entries:
            out.append(f"| {_md_escape(e['adapter'])} | {_md_escape(e['case'])} | {e['check']} | {e['state']} | "
                       f"{e['matched']} | {_md_escape(e['reason'])} |")
        dev = [c for c in report["non_pass_checks"] if c["status"] == "xfail"]
        if dev:
            out += ["", "Evidence: the worst deviating check of each adapter and case (error in units of tolerance):",
                    "", "| adapter | case | checks | worst | detail |", "|---|---|---|---|---|"]
            worst: dict[tuple[str, str], dict[str, Any]] = {}
            for c in dev:
                k = (c["adapter"], c["case"])
                u = c["units"] if isinstance(c["units"], (int, float)) else float("inf")
                w = worst.setdefault(k, {"u": -1.0, "msg": "", "n": 0})
                w["n"] += 1
                if u > w["u"]:
                    w["u"], w["msg"] = u, c["message"]
            for (ad, case), w in sorted(worst.items()):
                shown = f"{w['u']:.3g}" if w["u"] >= 0 else "-"
                out.append(f"| {_md_escape(ad)} | `{case}` | {w['n']} | {shown} | {_md_escape(w['msg'])} |")
    else:
        out.append("None recorded.")
    bad = [c for c in report["non_pass_checks"] if c["status"] in ("fail", "error")]
    out += ["", "## Unexpected failures", ""]
    if bad:
        out += ["| adapter | step | check | status | message |", "|---|---|---|---|---|"]
        for c in bad[:200]:
            out.append(f"| {_md_escape(c['adapter'])} | {c['step']} | {c['group']}/{c['key']} | {c['status']} | "
                       f"{_md_escape(c['message'])} |")
    else:
        out.append("None.")
    shrunk = [(a["name"], r) for a in report["adapters"] for r in a["random"] if r.get("repro")]
    if shrunk:
        out += ["", "## Minimal failing random cases", "",
                "Shrunk by hypothesis; each snippet rebuilds the case (assign the adapter to run it)."]
        for name, r in shrunk:
            out += ["", f"**{_md_escape(name)}**, `{r['case']}` ({r['status']}): {_md_escape(r['message'])}", "",
                    "```python", r["repro"].rstrip(), "```"]
    out += ["", "## Skipped cases", "", "Cases an adapter declined because its framework cannot express them "
            "(the reason is the adapter's):", ""]
    any_skip = False
    for a in report["adapters"]:
        reasons: dict[str, list[str]] = {}
        for s in a["skipped_cases"]:
            reasons.setdefault(s["reason"], []).append(s["case"])
        for reason, cases in reasons.items():
            any_skip = True
            out.append(f"- **{_md_escape(a['name'])}** ({len(cases)}): {_md_escape(reason)} — "
                       + ", ".join(f"`{c}`" for c in cases))
    if not any_skip:
        out.append("None.")
    out += ["", "## Cases", "", "| id | dtype | shape (N, C, ...) | what it checks |", "|---|---|---|---|"]
    for c in report["cases"]:
        if c.get("replicas") is None:
            out.append(f"| `{c['id']}` | {c['dtype']} | {tuple(c['shape'])} | {_md_escape(c['description'])} |")
    dist = [c for c in report["cases"] if c.get("replicas") is not None]
    if dist:
        out += ["", "Cross-replica cases (§11): the global batch split along axis 0 into per-replica batches. "
                "Distributed rows (world size P) run the cases with P replicas (a world of one runs them all on "
                "its only replica); every other row runs them on the global batch unchanged. The reference is the "
                "oracle on the concatenated global batch.", "",
                "| id | dtype | global shape (N, C, ...) | replicas | what it checks |", "|---|---|---|---|---|"]
        for c in dist:
            out.append(f"| `{c['id']}` | {c['dtype']} | {tuple(c['shape'])} | {tuple(c['replicas'])} | "
                       f"{_md_escape(c['description'])} |")
    out += ["", "Random cases: `random-float64` and `random-float32` draw shapes, feature axes, locations and "
            "scales with hypothesis (derandomized, no example database), and shrink a failure to a minimal case "
            "with a reproduction snippet (in the JSON report).", ""]
    out += ["## Tolerances (§8.4)", "", "| dtype | rtol | atol | unit round-off |", "|---|---|---|---|"]
    for k, tol in report["tolerances"].items():
        out.append(f"| {k} | {tol['rtol']:g} | {tol['atol']:g} | {tol['u']:.3g} |")
    out.append("")
    return "\n".join(out)


def write_text(path: str, text: str) -> None:
    import os

    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
