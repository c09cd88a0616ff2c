"""Builds the bn-ref website: the versioned spec, the interactive matrix, the docs, the API reference.

``python -m bn_ref.site build`` (what ``nox -s docs`` runs) assembles a MkDocs source tree under
``build/site_src`` from ``docs/``, ``conformance/report.json``, ``conformance/vectors/`` and the git
history of ``docs/spec.md``, then runs ``mkdocs build`` into ``build/site``. Open
``build/site/index.html`` (it works from ``file://``: no server and no network are needed).

What is generated and from what:

- ``spec/<version>/index.html`` for every spec version: the working tree's ``docs/spec.md`` for the
  current one, the newest commit carrying each older ``**Version X**`` line for the others (read
  with ``git show``). Every numbered heading gets its ``§N`` anchor (added where an old version lacks
  it), every section that the version's changelog names gets a "changed in" note linking the
  changelog, and a version switcher keeps the ``#§N`` fragment when changing version.
  ``spec/index.html`` is the current version.
- ``matrix.html``: the conformance matrix as a filterable table from ``conformance/report.json``
  (data written to ``assets/matrix-data.js``; the page script is ``site_src/assets/matrix.js``), and
  the "conventions at a glance" tables: one per matrix row from the report (the convention each row
  was executed under and its outcome), one per framework from the spec's §9 table, which
  ``python -m bn_ref.conformance.facts`` generates from executed probes.
- ``downloads.html`` and ``downloads/bn-ref-vectors-<version>.tar.gz``: the golden vectors of a
  version with their manifest and a ``SHA256SUMS`` file, byte-reproducible (sorted members, zero
  mtimes).
- ``api/*.html``: the API reference, rendered by mkdocstrings from the docstrings.

MathJax (SVG output, one file) is copied from the ``django-static-mathjax`` wheel that the ``docs``
extra installs; nothing is loaded from the network when a page is viewed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SITE_SRC = REPO / "site_src"
STATUS_ORDER = ["fail", "error", "xfail", "skip", "pass", "none"]
"""Cell statuses, worst first (the matrix shows the worst status of a cell's checks)."""

API_MODULES = [
    ("bn_ref", "The package"),
    ("bn_ref.conventions", "Conventions"),
    ("bn_ref.oracle", "Oracle (NumPy)"),
    ("bn_ref.tolerances", "Tolerances"),
    ("bn_ref.torch", "PyTorch backend"),
    ("bn_ref.jax", "JAX backend"),
    ("bn_ref.flax", "Flax backend"),
    ("bn_ref.conformance", "Conformance harness"),
    ("bn_ref.variants", "BN variants (NumPy)"),
    ("bn_ref.porting", "Porting: convert, divergence, translate, fold"),
    ("bn_ref.apps.port", "LeNet-BN porting"),
]


# -- spec versions ---------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"\bVersion ([0-9][0-9A-Za-z.\-]*[0-9A-Za-z])")


def spec_version_of(text: str) -> str | None:
    """The version a spec text declares (its first ``Version X`` phrase), or None."""
    m = _VERSION_RE.search(text)
    return m.group(1) if m else None


@dataclass
class SpecVersion:
    """One spec version: its number, its Markdown text, and where the text came from."""

    version: str
    text: str
    source: str  # "working tree" or a commit hash
    date: str


def _git(repo: Path, *args: str) -> bytes | None:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def spec_versions(repo: Path = REPO) -> list[SpecVersion]:
    """Every spec version, newest first: the working tree's, then older ones from git history.

    An older version is the newest commit whose ``docs/spec.md`` declares it; commits whose spec
    declares no version are skipped. Without git (an unpacked sdist) only the current one is built.
    """
    text = (repo / "docs" / "spec.md").read_text(encoding="utf-8")
    current = spec_version_of(text) or "unversioned"
    out = [SpecVersion(current, text, "working tree", "")]
    log = _git(repo, "log", "--format=%H %cs", "--", "docs/spec.md")
    seen = {current}
    for line in (log or b"").decode().splitlines():
        commit, date = line.split()
        old = _git(repo, "show", f"{commit}:docs/spec.md")
        if old is None:
            continue
        old_text = old.decode("utf-8")
        v = spec_version_of(old_text)
        if v is None or v in seen:
            continue
        seen.add(v)
        out.append(SpecVersion(v, old_text, commit, date))
    return out


_HEADING_RE = re.compile(r"^(#{2,4}) (\d{1,2}(?:\.\d{1,2})*)\.? +[A-Za-z]")
"""A numbered section heading ("## 3. Running statistics", "### 3.4 Biased ..."), not "### 0.1.0 (date)"."""


def add_section_anchors(text: str) -> str:
    """Put ``<a id="§N"></a>`` before every numbered heading that lacks it (older versions)."""
    lines = text.split("\n")
    out: list[str] = []
    for ln in lines:
        m = _HEADING_RE.match(ln)
        if m:
            anchor = f'<a id="§{m.group(2)}"></a>'
            prev = [x for x in out[-3:] if x.strip()]
            if not prev or anchor not in prev[-1]:
                out += [anchor, ""]
        out.append(ln)
    return "\n".join(out)


def changed_sections(text: str, version: str) -> set[str]:
    """Section numbers (``"3.4"``) that the changelog entry of ``version`` names."""
    m = re.search(rf"^### {re.escape(version)}\b.*?$(.*?)(?=^### |\Z)", text, re.S | re.M)
    if not m:
        return set()
    return set(re.findall(r"§(\d+(?:\.\d+)*)", m.group(1)))


def mark_changes(text: str, version: str) -> str:
    """Anchor the changelog entry of each version and note, under each changed heading, the change."""
    changed = changed_sections(text, version)
    text = re.sub(r"^### (\d[0-9A-Za-z.\-]*)", lambda m: f'<a id="changelog-{m.group(1)}"></a>\n\n{m.group(0)}',
                  text, flags=re.M)
    out: list[str] = []
    for ln in text.split("\n"):
        out.append(ln)
        m = _HEADING_RE.match(ln)
        if m and m.group(2) in changed:
            out += ["", f'<p class="bn-changed">Changed in {version}: see the '
                        f'<a href="#changelog-{version}">changelog</a>.</p>', ""]
    return "\n".join(out)


_LINK_RE = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def rewrite_links(text: str, page_dir: str, pages: set[str], docs: Path = REPO / "docs",
                  self_page: str | None = None) -> str:
    """Retarget a ``docs/`` page's relative links for its place in the site.

    ``page_dir`` is the page's folder inside the site source ("" or "spec/2026.12"); ``pages`` the
    site-source paths that exist. A link to a ``docs/`` file becomes relative to ``page_dir``
    (``spec.md`` points at ``self_page`` when given, else at the current spec); a link to a file of
    the repository outside ``docs/`` becomes plain text naming the file, since the site does not carry it.
    """
    up = "../" * (page_dir.count("/") + 1 if page_dir else 0)

    def sub(m: re.Match[str]) -> str:
        bang, label, target = m.groups()
        if target.startswith(("#", "http://", "https://", "mailto:", "/")):
            return m.group(0)
        path, _, frag = target.partition("#")
        frag = f"#{frag}" if frag else ""
        resolved = os.path.normpath(os.path.join(str(docs), path))
        rel = os.path.relpath(resolved, str(docs)).replace(os.sep, "/")
        if rel == "spec.md":
            if self_page is not None:
                return f"{bang}[{label}]({frag or '#'})"
            rel = "spec/index.md"
        if rel in pages:
            return f"{bang}[{label}]({up}{rel}{frag})"
        repo_rel = os.path.relpath(resolved, str(docs.parent)).replace(os.sep, "/")
        return f"{label} (`{repo_rel}`)" if not bang else f"*{label}* (`{repo_rel}`)"

    return _LINK_RE.sub(sub, text)


def version_switcher(versions: list[SpecVersion], this: str, page_dir: str) -> str:
    """The HTML block at the top of each spec page: version select, latest, changelog, downloads.

    The changelog link goes to this version's changelog when its text has one, else to the current
    version's (which lists the errata of the older ones).
    """
    up = "../" * (page_dir.count("/") + 1)
    own = next((v for v in versions if v.version == this), versions[0])
    changelog = "#changelog" if 'id="changelog"' in own.text else f"{up}spec/{versions[0].version}/index.html#changelog"
    opts = []
    for v in versions:
        sel = " selected" if v.version == this else ""
        label = v.version + (" (current)" if v is versions[0] else "")
        opts.append(f'<option value="{up}spec/{v.version}/index.html"{sel}>{html.escape(label)}</option>')
    links = " · ".join(f'<a href="{up}spec/{v.version}/index.html">{html.escape(v.version)}</a>' for v in versions)
    cite = f"bn-ref spec {this} §N, at spec/{this}/index.html#§N"
    return (
        f'<div class="bn-versions" data-version="{html.escape(this)}">'
        f'<label>Spec version <select class="bn-version-select" aria-label="spec version">{"".join(opts)}'
        f"</select></label> <span class=\"bn-version-links\">All versions: {links}</span> · "
        f'<a href="{changelog}">changelog and errata</a> · <a href="{up}downloads.html">golden vectors</a>'
        f'<br><span class="bn-cite">Cite as “{html.escape(cite)}”; section numbers and anchors never '
        f"move between versions.</span></div>\n"
    )


_INLINE_MATH_RE = re.compile(r"(?<![$\\])\$(?!\$)([^$]+?)(?<!\\)\$(?!\$)", re.S)
_LIST_START_RE = re.compile(r"\n[ \t]*(?=[-+*] |\d+[.)] )")


def join_broken_inline_math(text: str) -> str:
    """Join an inline ``$...$`` formula whose continuation line starts like a list item.

    Markdown parses a wrapped line such as ``   - \\hat x ...)$`` inside a list as a nested list
    before the math extension sees the formula, leaving raw TeX on the page; inside TeX the line
    break is only a space. Fenced code blocks are left alone.
    """
    parts = re.split(r"(^```.*?^```[ \t]*$)", text, flags=re.S | re.M)
    for i in range(0, len(parts), 2):
        parts[i] = _INLINE_MATH_RE.sub(
            lambda m: "$" + _LIST_START_RE.sub(" ", m.group(1)) + "$" if "\n" in m.group(1) and not re.search(r"\n[ \t]*\n", m.group(1)) else m.group(0),
            parts[i])
    return "".join(parts)


def spec_page(v: SpecVersion, versions: list[SpecVersion], page_dir: str, pages: set[str]) -> str:
    """The Markdown of one spec version placed at ``page_dir``."""
    text = add_section_anchors(join_broken_inline_math(v.text))
    text = mark_changes(text, v.version)
    text = rewrite_links(text, page_dir, pages, self_page=page_dir)
    lines = text.split("\n")
    title = next((i for i, ln in enumerate(lines) if ln.startswith("# ")), 0)
    lines[title] = f"# {lines[title][2:].strip()} — version {v.version}"
    lines.insert(title + 1, "\n" + version_switcher(versions, v.version, page_dir))
    if v.source != "working tree":
        lines.insert(title + 2, f'<p class="bn-old">An earlier version (from commit <code>{v.source[:10]}</code>, '
                                f"{v.date}). The current one is {versions[0].version}.</p>\n")
    return "\n".join(lines)


# -- the conformance matrix ------------------------------------------------------------------------

def framework_of(adapter_name: str) -> str:
    """The framework a matrix row belongs to, from its adapter name."""
    n = adapter_name.lower()
    for prefix, fw in (("bn_ref.", "bn-ref"), ("torch.", "PyTorch"), ("flax.", "Flax"), ("keras", "Keras"),
                       ("onnxruntime", "onnxruntime"), ("onnx", "ONNX reference"), ("d2l", "d2l"),
                       ("tf.", "TensorFlow"), ("tensorflow", "TensorFlow")):
        if n.startswith(prefix):
            return fw
    return adapter_name.split(".")[0].split()[0]


def _conv(a: dict[str, Any]) -> dict[str, Any]:
    c = a.get("convention")
    if isinstance(c, dict):
        return c
    return {"name": str(c) if c is not None else "?"}


def worst_status(statuses: list[str]) -> str:
    """The worst of some statuses in ``STATUS_ORDER`` (unknown ones count as errors)."""
    if not statuses:
        return "none"
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    return min(statuses, key=lambda s: rank.get(s, 1))


def matrix_data(report: dict[str, Any]) -> dict[str, Any]:
    """The matrix page's data from a conformance report, tolerant of missing and extra fields.

    Returns ``{"meta", "groups", "dtypes", "rows", "checks", "reasons"}``: one row per adapter, one
    check per non-passing check of the report (``[row, case, dtype, step, group, key, status, units,
    message, reason index, repro]``); ledger reasons are stored once in ``reasons``.
    """
    cases = {c.get("id"): c for c in report.get("cases", []) if isinstance(c, dict)}
    adapters = [a for a in report.get("adapters", []) if isinstance(a, dict)]
    groups: list[str] = []
    for a in adapters:
        for g in (a.get("groups") or {}):
            if g not in groups:
                groups.append(g)
    row_of = {a.get("name"): i for i, a in enumerate(adapters)}
    reasons: list[str] = []
    reason_ix: dict[str, int] = {}
    repro: dict[tuple[str, str], str] = {}
    rows = []
    for a in adapters:
        conv = _conv(a)
        cells = {}
        for g, cell in (a.get("groups") or {}).items():
            cells[g] = {"status": cell.get("status", "none"), "worst": cell.get("worst"),
                        "counts": cell.get("counts") or {}}
        for r in a.get("random") or []:
            if r.get("repro"):
                repro[(a.get("name"), r.get("case"))] = r["repro"]
        rows.append({
            "name": a.get("name", "?"),
            "framework": a.get("framework") or framework_of(a.get("name", "?")),
            "convention": conv,
            "description": a.get("description", ""),
            "compute_dtype": a.get("compute_dtype"),
            "build_error": a.get("build_error"),
            "build_skip": a.get("build_skip"),
            "skipped_cases": a.get("skipped_cases") or [],
            "cells": cells,
        })
    checks = []
    for c in report.get("non_pass_checks", []):
        i = row_of.get(c.get("adapter"))
        if i is None:
            continue
        reason = c.get("reason") or ""
        if reason and reason not in reason_ix:
            reason_ix[reason] = len(reasons)
            reasons.append(reason)
        case = c.get("case", "")
        dtype = (cases.get(case) or {}).get("dtype") or _dtype_from_id(case)
        checks.append([i, case, dtype, c.get("step", ""), c.get("group", ""), c.get("key", ""),
                       c.get("status", "error"), c.get("units"), c.get("message", ""),
                       reason_ix.get(reason, -1), repro.get((c.get("adapter"), case), "")])
    dtypes = sorted({c.get("dtype") for c in cases.values() if c.get("dtype")} | {ch[2] for ch in checks if ch[2]},
                    key=lambda d: ["float64", "float32", "float16", "bfloat16"].index(d)
                    if d in ("float64", "float32", "float16", "bfloat16") else 9)
    meta = {k: report.get(k) for k in ("schema", "generated", "command", "wall_s", "versions", "totals",
                                       "spec_version", "tolerances")}
    meta["cases"] = [{"id": c.get("id"), "dtype": c.get("dtype"), "shape": c.get("shape"),
                      "description": c.get("description", "")} for c in cases.values()]
    meta["ledger"] = (report.get("ledger") or {}).get("entries", [])
    return {"meta": meta, "groups": groups, "dtypes": dtypes, "rows": rows, "checks": checks, "reasons": reasons}


def json_safe(v: Any) -> Any:
    """Non-finite floats as strings ("inf", "nan"), so the data is strict JSON (and valid JavaScript)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def _dtype_from_id(case: str) -> str:
    for d in ("bfloat16", "float16", "float32", "float64"):
        if d in case:
            return d
    return ""


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def momentum_text(conv: dict[str, Any]) -> str:
    """A convention's momentum as "0.1 on the batch term" (or "cumulative" for None, §3.3)."""
    if "momentum" not in conv:
        return "—"
    if conv["momentum"] is None:
        return "None (cumulative average)"
    on = conv.get("momentum_on")
    return f"{_fmt(conv['momentum'])} on the {on} term" if on else _fmt(conv["momentum"])


def glance_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """One line per matrix row: the convention it was executed under and how it fared.

    "outcome" is the worst status over the row's check groups: a row that passes under a preset
    whose ``running_var`` is "unbiased" stores the unbiased running variance, as executed.
    """
    out = []
    for a in report.get("adapters", []):
        conv = _conv(a)
        statuses = [c.get("status", "none") for c in (a.get("groups") or {}).values()]
        statuses = [s for s in statuses if s != "none"]
        outcome = "not run" if a.get("build_skip") or a.get("build_error") else worst_status(statuses)
        out.append({
            "implementation": a.get("name", "?"),
            "framework": a.get("framework") or framework_of(a.get("name", "?")),
            "preset": str(conv.get("name", "?")),
            "eps": _fmt(conv.get("eps")),
            "momentum": momentum_text(conv),
            "running var": str(conv.get("running_var", "—")),
            "feature axis": _fmt(conv.get("feature_axis")),
            "n = 1 (training)": str(conv.get("single_value", "—")),
            "compute dtype": str(a.get("compute_dtype") or "not reported"),
            "outcome": outcome,
        })
    return out


def facts_table(spec_text: str) -> tuple[list[str], list[list[str]]]:
    """The §9 table between the ``facts-table`` markers (generated by executed probes): header, rows."""
    m = re.search(r"<!-- facts-table:begin -->\n(.*?)\n<!-- facts-table:end -->", spec_text, re.S)
    if not m:
        return [], []
    lines = [ln.strip() for ln in m.group(1).strip().splitlines() if ln.strip().startswith("|")]

    def cells(ln: str) -> list[str]:
        return [c.strip() for c in ln.strip().strip("|").split(" | ")]

    header = cells(lines[0])
    rows = [cells(ln) for ln in lines[2:]]
    return header, rows


def _md_inline(s: str) -> str:
    """Escape for HTML, then turn `code` spans into <code> (the facts table uses them)."""
    s = html.escape(s)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)


def html_table(header: list[str], rows: list[list[str]], table_id: str, status_col: int | None = None) -> str:
    """A filterable table (``site_src/assets/matrix.js`` adds a select per column)."""
    out = [f'<table id="{table_id}" class="bn-filterable"><thead><tr>']
    out += [f"<th>{_md_inline(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>")
        for j, c in enumerate(r):
            cls = f' class="bn-st bn-st-{html.escape(c)}"' if j == status_col else ""
            out.append(f"<td{cls}>{_md_inline(c)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def matrix_page(report: dict[str, Any], spec_text: str) -> str:
    """The Markdown (with raw HTML) of ``matrix.md``."""
    meta = matrix_data(report)["meta"]
    g = glance_rows(report)
    cols = list(g[0]) if g else []
    rows_tbl = html_table(cols, [[r[c] for c in cols] for r in g], "bn-glance-rows", status_col=cols.index("outcome")
                          if "outcome" in cols else None)
    fh, fr = facts_table(spec_text)
    facts = html_table(fh, fr, "bn-glance-facts") if fh else "<p>The spec has no generated §9 table.</p>"
    versions = meta.get("versions") or {}
    vtext = ", ".join(f"{k} {v}" for k, v in versions.items())
    spec_v = meta.get("spec_version")
    spec_line = (f"against spec version {spec_v} " if spec_v else "")
    totals = meta.get("totals") or {}
    ttext = ", ".join(f"{v} {k}" for k, v in totals.items())
    return f"""---
hide: [navigation, toc]
---

# Conformance matrix

<p class="bn-meta">Generated from <code>conformance/report.json</code> ({html.escape(str(meta.get("generated")))}, {spec_line}by
<code>{html.escape(str(meta.get("command")))}</code>). Totals: {html.escape(ttext)}. Versions: {html.escape(vtext)}.</p>

Each row is one implementation run under the convention it claims; each cell is a check group and shows
the worst status of its checks and the worst error in units of the tolerance (spec
[§8.4](spec/index.md#§8.4); 1 is the edge of conformance). Click a cell for its failing, deviating
and skipped checks, the ledger reason, and a command that reproduces them. With a dtype chosen, a
cell shows the worst non-passing status among that dtype's checks (pass when there is none).

<div id="bn-matrix" class="bn-matrix">
<p class="bn-noscript">The interactive matrix needs JavaScript; the same data is in
<a href="conformance.html">the conformance report</a>.</p>
</div>

<a id="glance"></a>
## Conventions at a glance

### Per matrix row (executed)

The convention under which each row was executed and its worst outcome, from the report: a row whose
outcome is *pass* reproduces that preset's values on the whole catalogue. Choose "unbiased" in the
*running var* column to see which implementations store the unbiased running variance.

{rows_tbl}

### Per framework (executed probes, spec §9)

The framework defaults as probed by `python -m bn_ref.conformance.facts` (the table of spec
[§9](spec/index.md#§9), checked against the installed frameworks by `tests/test_facts.py`).

{facts}

<script src="assets/matrix-data.js"></script>
<script src="assets/matrix.js"></script>
"""


# -- golden vectors --------------------------------------------------------------------------------

def vectors_archive(files: dict[str, bytes], version: str) -> tuple[bytes, str]:
    """A reproducible ``.tar.gz`` of the golden vectors plus ``SHA256SUMS``; returns (bytes, sums text).

    ``files`` maps paths relative to ``conformance/vectors`` to their bytes. Members are sorted, owned
    by 0:0 with mtime 0, and the gzip header carries no time, so one input gives one archive.
    """
    sums = "".join(f"{hashlib.sha256(files[p]).hexdigest()}  {p}\n" for p in sorted(files))
    members = dict(files)
    members["SHA256SUMS"] = sums.encode()
    root = f"bn-ref-vectors-{version}"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(members):
            info = tarfile.TarInfo(f"{root}/{p}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(members[p]), 0, 0o644, 0, 0
            tar.addfile(info, io.BytesIO(members[p]))
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, filename="") as f:
        f.write(raw.getvalue())
    return gz.getvalue(), sums


def vector_files(repo: Path, source: str) -> dict[str, bytes]:
    """The files under ``conformance/vectors`` of the working tree or of a commit."""
    base = "conformance/vectors"
    if source == "working tree":
        d = repo / base
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} \
            if d.is_dir() else {}
    listing = _git(repo, "ls-tree", "-r", "--name-only", source, base)
    out = {}
    for name in (listing or b"").decode().splitlines():
        data = _git(repo, "show", f"{source}:{name}")
        if data is not None:
            out[name[len(base) + 1:]] = data
    return out


def downloads_page(entries: list[tuple[SpecVersion, str | None, str, int, dict[str, Any]]]) -> str:
    lines = ["# Golden vectors", "",
             "Each archive holds the inputs and oracle outputs of the conformance catalogue for one spec "
             "version (`.npy` files), their `manifest.json` (cases, conventions, tolerances and the error "
             "bound), and `SHA256SUMS` over every file. Check an unpacked archive with "
             "`sha256sum -c SHA256SUMS`, and an implementation with "
             "`python -m bn_ref.conformance check-vectors DIR` (see the [adapter contract](adapters.md)).", "",
             "| spec version | archive | sha256 of the archive | files | manifest |", "|---|---|---|---|---|"]
    for v, name, digest, n, manifest in entries:
        if name is None:
            lines.append(f"| [{v.version}](spec/{v.version}/index.md) | none: this version published no vectors "
                         "| — | — | — |")
            continue
        fmt = manifest.get("format", "?")
        gen = manifest.get("generator", "?")
        ncases = len(manifest.get("cases", []))
        lines.append(f"| [{v.version}](spec/{v.version}/index.md) | [{name}](downloads/{name}) | `{digest}` | {n} "
                     f"| {fmt}, {ncases} cases, {gen} |")
    return "\n".join(lines) + "\n"


# -- assembling and building -----------------------------------------------------------------------

def _title(md: str, fallback: str) -> str:
    m = re.search(r"^# (.+)$", md, re.M)
    return m.group(1).strip() if m else fallback


def assemble(out: Path, repo: Path = REPO, report_path: Path | None = None) -> dict[str, Any]:
    """Write the MkDocs source tree and config into ``out``; returns the config (also written)."""
    import yaml  # mkdocs' own dependency, installed by the docs extra

    docs = repo / "docs"
    src = out / "site_src"
    if src.exists():
        shutil.rmtree(src)
    (src / "assets").mkdir(parents=True)
    (src / "downloads").mkdir()
    for p in sorted((SITE_SRC / "assets").iterdir()):
        shutil.copy2(p, src / "assets" / p.name)
    if (docs / "img").is_dir():
        shutil.copytree(docs / "img", src / "img")
    _vendor_mathjax(src / "assets" / "vendor" / "mathjax")

    versions = spec_versions(repo)
    other_docs = sorted(p for p in docs.glob("*.md") if p.name != "spec.md")
    pages = {p.name for p in other_docs} | {"spec/index.md", "matrix.md", "downloads.md", "index.md"}
    pages |= {f"spec/{v.version}/index.md" for v in versions}
    pages |= {f"img/{p.name}" for p in (docs / "img").glob("*")} if (docs / "img").is_dir() else set()

    cur = versions[0]
    (src / "spec").mkdir()
    (src / "spec" / "index.md").write_text(spec_page(cur, versions, "spec", pages), encoding="utf-8")
    for v in versions:
        d = src / "spec" / v.version
        d.mkdir()
        (d / "index.md").write_text(spec_page(v, versions, f"spec/{v.version}", pages), encoding="utf-8")
    nav_docs = []
    for p in other_docs:
        text = p.read_text(encoding="utf-8")
        (src / p.name).write_text(rewrite_links(text, "", pages), encoding="utf-8")
        nav_docs.append({_title(text, p.stem): p.name})

    report_path = report_path or repo / "conformance" / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    data = matrix_data(report)
    (src / "assets" / "matrix-data.js").write_text(
        "window.BN_MATRIX = " + json.dumps(json_safe(data), separators=(",", ":"), allow_nan=False, default=str) + ";\n",
        encoding="utf-8")
    (src / "matrix.md").write_text(matrix_page(report, cur.text), encoding="utf-8")

    entries = []
    for v in versions:
        files = vector_files(repo, v.source)
        if not files:
            entries.append((v, None, "", 0, {}))
            continue
        blob, _ = vectors_archive(files, v.version)
        name = f"bn-ref-vectors-{v.version}.tar.gz"
        (src / "downloads" / name).write_bytes(blob)
        manifest = json.loads(files["manifest.json"]) if "manifest.json" in files else {}
        entries.append((v, name, hashlib.sha256(blob).hexdigest(), len(files) + 1, manifest))
    (src / "downloads.md").write_text(downloads_page(entries), encoding="utf-8")

    api_nav = []
    (src / "api").mkdir()
    for mod, title in API_MODULES:
        (src / "api" / f"{mod}.md").write_text(f"# {title}: `{mod}`\n\n::: {mod}\n", encoding="utf-8")
        api_nav.append({title: f"api/{mod}.md"})

    (src / "index.md").write_text(index_page(versions, other_docs, report), encoding="utf-8")

    config = yaml.safe_load((SITE_SRC / "mkdocs.yml").read_text(encoding="utf-8"))
    config["docs_dir"] = str(src)
    config["site_dir"] = str(out / "site")
    config["nav"] = [
        {"Home": "index.md"},
        {"Specification": [{f"Current ({cur.version})": "spec/index.md"}] + [
            {f"Version {v.version}": f"spec/{v.version}/index.md"}
                                               for v in versions]},
        {"Conformance matrix": "matrix.md"},
        *nav_docs,
        {"Golden vectors": "downloads.md"},
        {"API reference": api_nav},
    ]
    config["plugins"][[i for i, p in enumerate(config["plugins"]) if isinstance(p, dict)
                       and "mkdocstrings" in p][0]]["mkdocstrings"]["handlers"]["python"]["paths"] = [str(repo)]
    (out / "mkdocs.yml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return config


def index_page(versions: list[SpecVersion], other_docs: list[Path], report: dict[str, Any]) -> str:
    cur = versions[0]
    docs_lines = "\n".join(f"- [{_title(p.read_text(encoding='utf-8'), p.stem)}]({p.name})" for p in other_docs)
    totals = report.get("totals") or {}
    return f"""# bn-ref

The reference for Batch Normalization across frameworks: a specification with every formula, a NumPy
oracle that executes it, PyTorch and JAX/Flax layers, and a conformance harness that runs each
framework's own Batch Normalization against the oracle.

- **[The specification, version {cur.version}](spec/{cur.version}/index.md)** (the current version
  is also at [spec/](spec/index.md); earlier versions: {", ".join(f"[{v.version}](spec/{v.version}/index.md)"
  for v in versions[1:]) or "none"}). Cite a section as "bn-ref spec {cur.version} §3.4", linked as
  `spec/{cur.version}/index.html#§3.4`.
- **[The conformance matrix](matrix.md)**: {len(report.get("adapters", []))} implementations,
  {totals.get("pass", 0)} passing checks, filterable, with the reason and a reproduction of every
  deviation; and the [conventions at a glance](matrix.md#glance).
- **[Golden vectors](downloads.md)** per spec version, with manifest and checksums.
{docs_lines}
- [API reference](api/bn_ref.md), generated from the docstrings.

This site is built by `nox -s docs` (or `python -m bn_ref.site build`) into `build/site/`; it needs
no network to view and can be opened from the file system.
"""


def _vendor_mathjax(dest: Path) -> None:
    """Copy MathJax's single-file TeX→SVG build and its license from the installed wheel."""
    try:
        import mathjax  # django-static-mathjax: MathJax 3 as package data
    except ImportError as e:  # pragma: no cover - the docs extra installs it
        raise SystemExit("MathJax is not installed: pip install -e '.[docs]' (django-static-mathjax)") from e
    root = Path(mathjax.__file__).parent / "static" / "mathjax"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "es5" / "tex-svg-full.js", dest / "tex-svg-full.js")
    shutil.copy2(root / "LICENSE", dest / "LICENSE")


def build(out: Path, repo: Path = REPO) -> Path:
    """Assemble and run ``mkdocs build``; returns the site folder."""
    assemble(out, repo)
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "-f", str(out / "mkdocs.yml")], check=True)
    return out / "site"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_ref.site", description="Build the bn-ref website.")
    parser.add_argument("command", choices=["build", "assemble"], help="build: assemble and run mkdocs; "
                        "assemble: only write the MkDocs source tree")
    parser.add_argument("--out", type=Path, default=REPO / "build", help="output folder (default build/)")
    args = parser.parse_args(argv)
    if args.command == "assemble":
        assemble(args.out)
        print(args.out / "site_src")
    else:
        print(build(args.out) / "index.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
