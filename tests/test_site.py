"""The website generator (bn_ref/site.py): versions, anchors, changelog notes, matrix data, archives.

These need neither MkDocs nor a browser (they run in ``nox -s tests``); the built site is checked by
tests/test_site_browser.py (``nox -s docs``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

import bn_ref
from bn_ref import site

REPO = Path(__file__).resolve().parent.parent
SPEC = (REPO / "docs" / "spec.md").read_text(encoding="utf-8")
REPORT = json.loads((REPO / "conformance" / "report.json").read_text(encoding="utf-8"))
HEADINGS = re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? +[A-Z]", SPEC, re.M)


def test_spec_version_is_the_package_one():
    assert site.spec_version_of(SPEC) == bn_ref.SPEC_VERSION
    assert site.spec_version_of("**Status.** Version 0.1.0 of the specification, matching") == "0.1.0"
    assert site.spec_version_of("no version here") is None


def test_spec_versions_current_first_and_distinct():
    vs = site.spec_versions(REPO)
    assert vs[0].version == bn_ref.SPEC_VERSION and vs[0].source == "working tree"
    assert vs[0].text == SPEC
    assert len({v.version for v in vs}) == len(vs)
    for v in vs[1:]:  # older versions come from git history; each text declares its own version
        assert site.spec_version_of(v.text) == v.version
        assert re.fullmatch(r"[0-9a-f]{40}", v.source)


def test_section_anchors_added_once():
    assert len(HEADINGS) >= 40
    stripped = re.sub(r'<a id="§[^"]*"></a>\n', "", SPEC)
    assert '<a id="§3.4"></a>' not in stripped
    for text in (SPEC, stripped):
        out = site.add_section_anchors(text)
        for num in HEADINGS:
            assert out.count(f'<a id="§{num}"></a>') == 1, num
            # the anchor comes right before its heading
            assert re.search(rf'<a id="§{re.escape(num)}"></a>\n+#{{2,4}} {re.escape(num)}\.? ', out), num


def test_changelog_notes_under_changed_sections_only():
    entry = SPEC[SPEC.index(f"### {bn_ref.SPEC_VERSION}"):]
    entry = entry[:entry.index("\n### ", 5)]
    named = set(re.findall(r"§(\d+(?:\.\d+)*)", entry))
    changed = site.changed_sections(SPEC, bn_ref.SPEC_VERSION)
    assert changed == named and {"8.1", "7.3", "11.2"} <= changed
    out = site.mark_changes(site.add_section_anchors(SPEC), bn_ref.SPEC_VERSION)
    note = f'Changed in {bn_ref.SPEC_VERSION}: see the <a href="#changelog-{bn_ref.SPEC_VERSION}">changelog</a>'
    noted = {n for n in HEADINGS if re.search(rf"^#{{2,4}} {re.escape(n)}\.? .*\n\n<p class=\"bn-changed\">{re.escape(note)}",
                                             out, re.M)}
    assert noted == changed & set(HEADINGS)
    assert f'<a id="changelog-{bn_ref.SPEC_VERSION}"></a>' in out


def test_join_broken_inline_math():
    src = "5. $dx = s\\,(dy - a\n   - \\hat x)$, which\n   - a real item $b$\n\n- item $c$ and $d\n  + e$\n"
    want = "5. $dx = s\\,(dy - a - \\hat x)$, which\n   - a real item $b$\n\n- item $c$ and $d + e$\n"
    assert site.join_broken_inline_math(src) == want
    fenced = "```sh\necho $A\n- x $B\n```\n"
    assert site.join_broken_inline_math(fenced) == fenced
    out = site.join_broken_inline_math(SPEC)  # the spec itself: nothing to join, nothing changed in content
    assert "dy/n - \\hat x\\,\\hat x^\\top dy/n)$" in out
    assert out.replace(" ", "").replace("\n", "") == SPEC.replace(" ", "").replace("\n", "")


def test_rewrite_links():
    pages = {"spec/index.md", "adapters.md", "img/a.png", "spec/2026.12/index.md"}
    text = ("[a](adapters.md#x) [s](spec.md#§3.4) ![i](img/a.png) [l](../conformance/ledger.toml) "
            "[h](#§1) [w](https://example.org)")
    top = site.rewrite_links(text, "", pages)
    assert top == ("[a](adapters.md#x) [s](spec/index.md#§3.4) ![i](img/a.png) l (`conformance/ledger.toml`) "
                   "[h](#§1) [w](https://example.org)")
    deep = site.rewrite_links(text, "spec/2026.12", pages, self_page="spec/2026.12")
    assert deep.startswith("[a](../../adapters.md#x) [s](#§3.4) ![i](../../img/a.png) l (`conformance/ledger.toml`)")


def test_matrix_data_agrees_with_the_report_counts():
    d = site.matrix_data(REPORT)
    assert [r["name"] for r in d["rows"]] == [a["name"] for a in REPORT["adapters"]]
    assert len(d["checks"]) == len(REPORT["non_pass_checks"])
    for status in ("xfail", "skip", "fail", "error"):
        n = sum(1 for c in d["checks"] if c[6] == status and c[4] != "case")
        want = sum(cell["counts"].get(status, 0) for a in REPORT["adapters"] for cell in a["groups"].values())
        if status in ("xfail", "fail", "error"):
            assert n == want == REPORT["totals"][status], status
    for i, a in enumerate(REPORT["adapters"]):  # per cell, the listed deviations are the counted ones
        for g, cell in a["groups"].items():
            listed = sum(1 for c in d["checks"] if c[0] == i and c[4] == g and c[6] == "xfail")
            assert listed == cell["counts"].get("xfail", 0), (a["name"], g)
    by_key = {(c["adapter"], c["step"], c["group"], c["key"]): c for c in REPORT["non_pass_checks"]}
    for c in d["checks"]:
        orig = by_key[(d["rows"][c[0]]["name"], c[3], c[4], c[5])]
        assert (d["reasons"][c[9]] if c[9] >= 0 else "") == orig["reason"]
        # random pseudo-cases ("random-float64") are not in the catalogue: their dtype is in the id
        want = next((k["dtype"] for k in REPORT["cases"] if k["id"] == orig["case"]), orig["case"].rsplit("-", 1)[-1])
        assert c[2] == want
    assert d["dtypes"][:2] == ["float64", "float32"] and set(d["dtypes"]) == {c["dtype"] for c in REPORT["cases"]}


def test_matrix_data_tolerates_missing_and_new_fields():
    assert site.matrix_data({})["rows"] == []
    rep = {"spec_version": "2099.1", "adapters": [
        {"name": "x.BN", "convention": "pytorch", "compute_dtype": "float32",
         "groups": {"defaults": {"status": "fail", "worst": float("inf"), "counts": {"fail": 1}}}},
        {"name": "bn_ref.y"}],
        "non_pass_checks": [{"adapter": "x.BN", "case": "c-float16", "group": "defaults", "status": "fail",
                             "units": float("nan")}, {"adapter": "unknown", "case": "c"}]}
    d = site.matrix_data(rep)
    assert d["groups"] == ["defaults"] and d["meta"]["spec_version"] == "2099.1"
    assert d["rows"][0]["convention"] == {"name": "pytorch"} and d["rows"][0]["compute_dtype"] == "float32"
    assert d["rows"][1]["framework"] == "bn-ref" and len(d["checks"]) == 1 and d["checks"][0][2] == "float16"
    text = json.dumps(site.json_safe(d), allow_nan=False)
    assert '"inf"' in text and '"nan"' in text
    assert site.glance_rows(rep)[0]["outcome"] == "fail"


def test_glance_rows_match_the_presets_and_outcomes():
    rows = site.glance_rows(REPORT)
    assert len(rows) == len(REPORT["adapters"])
    for r, a in zip(rows, REPORT["adapters"]):
        preset = bn_ref.PRESETS.get(a["convention"]["name"])
        if preset is not None:
            assert r["running var"] == preset.running_var
            assert float(r["eps"]) == preset.eps
        statuses = {c["status"] for c in a["groups"].values()} - {"none"}
        if a["build_skip"]:
            assert r["outcome"] == "not run"
        elif statuses == {"pass"}:
            assert r["outcome"] == "pass"
        else:
            assert r["outcome"] in statuses and r["outcome"] != "pass"
    unbiased = {r["implementation"] for r in rows if r["running var"] == "unbiased"}
    assert "torch.nn.BatchNorm*d[cpu] @pytorch" in unbiased
    assert not any(n.startswith(("flax.", "keras.", "onnx")) for n in unbiased)
    assert site.momentum_text({"momentum": None}) == "None (cumulative average)"
    assert site.momentum_text({"momentum": 0.1, "momentum_on": "batch"}) == "0.1 on the batch term"


def test_facts_table_is_the_generated_section_9_table():
    header, rows = site.facts_table(SPEC)
    block = SPEC[SPEC.index("<!-- facts-table:begin -->"):SPEC.index("<!-- facts-table:end -->")]
    assert len(rows) == block.count("\n|") - 2 > 3
    assert header[:4] == ["framework (version)", "eps", "momentum", "running var"]
    assert all(len(r) == len(header) for r in rows)
    assert [r[3] for r in rows if r[0].startswith("PyTorch")] == ["unbiased"]
    assert site.facts_table("no table") == ([], [])


def test_vectors_archive_is_reproducible_and_checksummed():
    files = site.vector_files(REPO, "working tree")
    assert "manifest.json" in files and len(files) > 10
    blob, sums = site.vectors_archive(files, "9.9")
    assert site.vectors_archive(files, "9.9")[0] == blob
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        names = tar.getnames()
        assert names == sorted(names) and all(n.startswith("bn-ref-vectors-9.9/") for n in names)
        got = {n.split("/", 1)[1]: tar.extractfile(n).read() for n in names}
    assert set(got) == set(files) | {"SHA256SUMS"} and got["SHA256SUMS"].decode() == sums
    for line in sums.splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256(got[name]).hexdigest() == digest
    assert len(sums.splitlines()) == len(files)


@pytest.mark.parametrize("name,fw", [("bn_ref.torch.BatchNorm[function, cpu] @pytorch", "bn-ref"),
                                     ("torch.nn.BatchNorm*d[cpu] @pytorch", "PyTorch"),
                                     ("onnxruntime BatchNormalization-15[cpu] @onnx", "onnxruntime"),
                                     ("onnx.reference BatchNormalization-15 @onnx", "ONNX reference"),
                                     ("keras.layers.BatchNormalization[jax] @keras", "Keras")])
def test_framework_of(name, fw):
    assert site.framework_of(name) == fw
