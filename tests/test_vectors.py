"""Protected golden vectors (issue 11, item 8): ``check-vectors`` must reject every edit of a vector
set -- metadata, tolerances, kappa, the case list, the spec version, any array -- with exit 1 and a
message naming the case and the field, even when the editor re-seals every SHA-256, the case-list
digest and the manifest digest (the strongest editor without a secret: only the catalogue of the
installed bn-ref and the oracle are out of reach). The untouched export must pass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from bn_ref import SPEC_VERSION
from bn_ref.conformance import vectors
from bn_ref.conformance.cli import run as cli_run

ROOT = Path(__file__).resolve().parents[1]

SEL = "sequence-rank2-float64 or single-value-rank2-float64 or dtype-bfloat16"
SEQ = "pytorch/sequence-rank2-float64"
T = f"{SEQ}/step2-train"  # the usual victim: a training step in the middle of a sequence (count 2)
N1 = "pytorch/single-value-rank2-float64"  # n = 1 in training: PyTorch must raise
BF = "pytorch/dtype-bfloat16/step1-train"
N_STEPS = 7 + 1 + 3


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vec") / "pristine"
    m = vectors.export_vectors(d, k=SEL, conventions=("pytorch",))
    assert len(m["cases"]) == N_STEPS
    return d


# -- the editor's tools -------------------------------------------------------------------------


def _load(d: Path) -> dict[str, Any]:
    return json.loads((d / "manifest.json").read_text())


def _case(m: dict[str, Any], cid: str) -> dict[str, Any]:
    return next(e for e in m["cases"] if e["id"] == cid)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _reseal(d: Path, m: dict[str, Any]) -> dict[str, Any]:
    """What an editor can always do: recompute every file hash, the case-list and manifest digests."""
    refs = sorted({rel for e in m["cases"] for part in ("inputs", "expected") for rel in e.get(part, {}).values()})
    m["files"] = {rel: _sha(d / rel) for rel in refs if (d / rel).is_file()}
    m["case_ids_sha256"] = hashlib.sha256(vectors.canonical_json([e["id"] for e in m["cases"]])).hexdigest()
    m["manifest_sha256"] = vectors.manifest_digest(m)
    return m


def _write(d: Path, m: dict[str, Any]) -> None:
    (d / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")


def _tamper_array(d: Path, rel: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    np.save(d / rel, fn(np.load(d / rel)), allow_pickle=False)


def _set(cid: str, path: str, value: Any) -> Callable[[Path, dict[str, Any]], None]:
    def edit(d: Path, m: dict[str, Any]) -> None:
        obj = _case(m, cid) if cid != "manifest" else m
        *parents, leaf = path.split(".")
        for p in parents:
            obj = obj[p]
        obj[leaf] = value(obj[leaf]) if callable(value) else value
    return edit


def _duplicate(d: Path, m: dict[str, Any]) -> None:
    i = next(i for i, e in enumerate(m["cases"]) if e["id"] == T)
    m["cases"].insert(i + 1, json.loads(json.dumps(m["cases"][i])))


def _add(d: Path, m: dict[str, Any]) -> None:
    """A new step 'step7-train' appended to the sequence, with its own (copied) files."""
    src = _case(m, f"{SEQ}/step5-train")
    new = json.loads(json.dumps(src))
    new["id"], new["step"] = f"{SEQ}/step7-train", 7
    for part in ("inputs", "expected"):
        for name, rel in src[part].items():
            nrel = rel.replace("step5-train", "step7-train")
            shutil.copyfile(d / rel, d / nrel)
            new[part][name] = nrel
    m["cases"].insert(m["cases"].index(_case(m, f"{SEQ}/step6-eval")) + 1, new)


def _remove(d: Path, m: dict[str, Any]) -> None:
    e = _case(m, T)
    for part in ("inputs", "expected"):
        for rel in e[part].values():
            (d / rel).unlink()
    m["cases"].remove(e)


def _swap(d: Path, m: dict[str, Any]) -> None:
    i = next(i for i, e in enumerate(m["cases"]) if e["id"] == T)
    m["cases"][i], m["cases"][i + 1] = m["cases"][i + 1], m["cases"][i]


def _drop(part: str, names: tuple[str, ...], cid: str = T) -> Callable[[Path, dict[str, Any]], None]:
    def edit(d: Path, m: dict[str, Any]) -> None:
        e = _case(m, cid)
        for name in names:
            (d / e[part].pop(name)).unlink()
    return edit


def _reassign(d: Path, m: dict[str, Any]) -> None:
    """Point the step's x at the previous step's x file (both files stay listed and intact)."""
    _case(m, T)["inputs"]["x"] = _case(m, f"{SEQ}/step1-train")["inputs"]["x"]


def _arr(cid: str, part: str, name: str, fn: Callable[[np.ndarray], np.ndarray]):
    def edit(d: Path, m: dict[str, Any]) -> None:
        _tamper_array(d, _case(m, cid)[part][name], fn)
    return edit


def _one(delta: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], np.ndarray]:
    """Change one finite element (the middle one of those) by ``delta(a)``."""
    def fn(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        finite = np.flatnonzero(np.isfinite(a))
        a.flat[finite[finite.size // 2]] += delta(a[np.isfinite(a)])
        return a
    return fn


def _flip_byte(d: Path, m: dict[str, Any]) -> None:
    p = d / _case(m, T)["inputs"]["dy"]
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x10
    p.write_bytes(bytes(raw))


def _relabel(d: Path, m: dict[str, Any]) -> None:
    """Store the array as float32 (the values are unchanged where representable)."""
    rel = _case(m, BF)["inputs"]["x"]
    np.save(d / rel, np.load(d / rel).astype(np.float32), allow_pickle=False)


# Each edit: (function, reseal afterwards?, the case it must name, the field it must name).
EDITS: dict[str, tuple[Callable[[Path, dict[str, Any]], None], bool, str, str]] = {
    "eps": (_set(T, "eps", 1e-3), True, T, "eps"),
    "convention.eps": (_set(T, "convention.eps", 1e-3), True, T, "convention.eps"),
    "momentum": (_set(T, "momentum", 0.01), True, T, "momentum"),
    "momentum-null": (_set(T, "momentum", None), True, T, "momentum"),
    "convention.momentum": (_set(T, "convention.momentum", 0.9), True, T, "convention.momentum"),
    "momentum_on": (_set(T, "convention.momentum_on", "running"), True, T, "convention.momentum_on"),
    "running_var": (_set(T, "convention.running_var", "biased"), True, T, "convention.running_var"),
    "single_value": (_set(N1, "convention.single_value", "zero"), True, N1, "convention.single_value"),
    "count": (_set(T, "count", 3), True, T, "count"),
    "count-type": (_set(T, "count", 2.0), True, T, "count"),
    "dtype": (_set(T, "dtype", "float32"), True, T, "dtype"),
    "dtype-bf16": (_set(BF, "dtype", "float16"), True, BF, "dtype"),
    "shape": (_set(T, "shape", [3, 6]), True, T, "shape"),
    "feature_axis": (_set(T, "feature_axis", 0), True, T, "feature_axis"),
    "convention.feature_axis": (_set(T, "convention.feature_axis", -1), True, T, "convention.feature_axis"),
    "training": (_set(T, "training", False), True, T, "training"),
    "expect_error": (_set(N1, "expect_error", False), True, N1, "expect_error"),
    "step": (_set(T, "step", 3), True, T, "step"),
    "description": (_set(T, "description", "anything"), True, T, "description"),
    "unknown-field": (_set(T, "eps_override", 1e-3), True, T, "eps_override"),
    "kappa": (_set(T, "kappa", lambda k: 2 * k), True, T, "kappa"),
    "kappa-tiny": (_set(BF, "kappa", lambda k: k * (1 + 1e-6)), True, BF, "kappa"),
    "kappa-on-error-case": (_set(N1, "kappa", 1.0), True, N1, "kappa"),
    "tolerance.rtol": (_set(BF, "tolerance.rtol", 0.5), True, BF, "tolerance.rtol"),
    "tolerance.atol": (_set(T, "tolerance.atol", 1e-3), True, T, "tolerance.atol"),
    "tolerance.u": (_set(BF, "tolerance.u", 2.0**-4), True, BF, "tolerance.u"),
    "tolerance.c_cond": (_set(T, "tolerance.c_cond", 1e6), True, T, "tolerance.c_cond"),
    "manifest-tolerances": (_set("manifest", "tolerances.bfloat16.rtol", 0.5), True, "manifest",
                            "tolerances.bfloat16.rtol"),
    "manifest-c_cond": (_set("manifest", "c_cond", 1e3), True, "manifest", "c_cond"),
    "spec_version": (_set("manifest", "spec_version", "2025.01"), True, "manifest", "spec_version"),
    "format": (_set("manifest", "format", "bn-ref-vectors/1"), True, "manifest", "format"),
    "duplicated-case": (_duplicate, True, T, "id"),
    "added-case": (_add, True, f"{SEQ}/step7-train", "id"),
    "removed-case": (_remove, True, T, "id"),
    "swapped-steps": (_swap, True, f"{SEQ}/step3-train", "id"),
    "case-list-digest": (lambda d, m: m["cases"].remove(_case(m, T)), False, "manifest", "case_ids_sha256"),
    "dropped-affine": (_drop("inputs", ("gamma", "beta")), True, T, "inputs.gamma"),
    "dropped-output": (_drop("expected", ("dbeta",)), True, T, "expected.dbeta"),
    "reassigned-file": (_reassign, True, T, "inputs.x"),
    "input-x": (_arr(T, "inputs", "x", _one(lambda a: 1e-3)), True, T, "inputs.x"),
    "input-x-1ulp": (_arr(BF, "inputs", "x", lambda a: np.nextafter(a, np.inf)), True, BF, "inputs.x"),
    "input-running_mean": (_arr(T, "inputs", "running_mean", _one(lambda a: 1e-9)), True, T,
                           "inputs.running_mean"),
    "expected-y": (_arr(T, "expected", "y", _one(lambda a: 1e-11 * np.abs(a).max())), True, T, "expected.y"),
    "expected-running_var": (_arr(T, "expected", "running_var", lambda a: a * (1 + 1e-6)), True, T,
                             "expected.running_var"),
    "expected-dx-reshaped": (_arr(T, "expected", "dx", lambda a: a.reshape(-1)), True, T, "expected.dx"),
    "array-dtype": (_relabel, True, BF, "inputs.x"),
    "byte-flip-unsealed": (_flip_byte, False, T, "inputs.dy"),
    "manifest-unsealed": (_set(T, "eps", 1e-3), False, "manifest", "manifest_sha256"),
}
assert len(EDITS) == 48, len(EDITS)


@pytest.mark.parametrize("kind", list(EDITS))
def test_every_edit_is_rejected_naming_case_and_field(kind, pristine, tmp_path, capsys):
    edit, reseal, case, field = EDITS[kind]
    d = tmp_path / "v"
    shutil.copytree(pristine, d)
    m = _load(d)
    edit(d, m)
    if reseal:
        _reseal(d, m)
    _write(d, m)
    capsys.readouterr()
    assert vectors.main(["check-vectors", str(d)]) == 1
    err = capsys.readouterr().err
    assert f"FAIL {case}: {field}: " in err, err


def test_duplicate_json_key_is_rejected(pristine, tmp_path, capsys):
    """A JSON object with the same key twice: Python keeps the last value, other parsers the first."""
    d = tmp_path / "v"
    shutil.copytree(pristine, d)
    text = (d / "manifest.json").read_text()
    anchor = f'"id": "{T}",'
    assert text.count(anchor) == 1
    (d / "manifest.json").write_text(text.replace(anchor, anchor + ' "eps": 0.001,'))
    assert vectors.main(["check-vectors", str(d)]) == 1
    assert f"FAIL {T}: eps: " in capsys.readouterr().err


def test_untouched_export_passes_and_records_spec_version(pristine, capsys):
    assert vectors.find_problems(pristine) == []
    assert vectors.main(["check-vectors", str(pristine)]) == 0
    m = _load(pristine)
    assert m["spec_version"] == SPEC_VERSION and m["format"] == vectors.FORMAT
    assert m["selection"] == {"k": SEL, "conventions": ["pytorch"]}
    assert m["manifest_sha256"] == vectors.manifest_digest(m)
    # What check-vectors recomputes agrees with what export wrote: the count chain and kappa.
    assert [_case(m, f"{SEQ}/step{i}-{'eval' if i == 6 else 'train'}")["count"] for i in range(7)] == [0, 1, 2, 3, 4,
                                                                                                     5, 6]
    assert "kappa" not in _case(m, N1) and _case(m, N1)["expected"] == {} and _case(m, N1)["expect_error"]


def test_a_consistent_reselection_needs_the_pinned_digest(pristine, tmp_path, capsys):
    """Dropping a whole case *and* rewriting the selection re-seals into a legitimate export of another
    selection; only a pinned manifest digest tells it from the published set."""
    d = tmp_path / "v"
    shutil.copytree(pristine, d)
    m = _load(d)
    pin = m["manifest_sha256"]
    for e in [e for e in m["cases"] if e["case"] == "dtype-bfloat16"]:
        for part in ("inputs", "expected"):
            for rel in e[part].values():
                (d / rel).unlink()
        m["cases"].remove(e)
    m["selection"]["k"] = "sequence-rank2-float64 or single-value-rank2-float64"
    _write(d, _reseal(d, m))
    assert vectors.find_problems(d) == []
    assert vectors.main(["check-vectors", str(d), "--expect-digest", pin]) == 1
    assert "FAIL manifest: manifest_sha256: " in capsys.readouterr().err
    assert vectors.main(["check-vectors", str(pristine), "--expect-digest", pin]) == 0


def test_export_prints_no_warnings_and_cli_exit_codes(tmp_path):
    """Through the real command line, on cases with NaN, Inf, n = 1 and a sequence (warnings shown)."""
    d = tmp_path / "v"
    cmd = [sys.executable, "-W", "default", "-m", "bn_ref.conformance"]
    r = subprocess.run(cmd + ["export-vectors", str(d), "-k", "inf-channel or nan-channel-float32 or single-value-rank4 "
                              "or momentum-none", "--convention", "keras", "--convention", "pytorch"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len(r.stdout.splitlines()) == 1 and SPEC_VERSION in r.stdout
    r = subprocess.run(cmd + ["check-vectors", str(d)], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    m = _load(d)
    rel = _case(m, "keras/inf-channel-float64/step0-train")["expected"]["y"]
    _tamper_array(d, rel, _one(lambda a: 1.0))
    _write(d, _reseal(d, m))
    r = subprocess.run(cmd + ["check-vectors", str(d)], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert r.returncode == 1
    assert "FAIL keras/inf-channel-float64/step0-train: expected.y: differs from the oracle" in r.stderr, r.stderr
    r = subprocess.run(cmd + ["export-vectors", str(tmp_path / "w"), "-k", "((("], capture_output=True, text=True,
                       cwd=str(ROOT), timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error:"), r.stderr


def test_export_of_an_empty_selection_is_a_usage_error(tmp_path, capsys):
    assert vectors.main(["export-vectors", str(tmp_path / "v"), "-k", "no-such-case-anywhere"]) == 2
    assert "selects no case" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()
    assert vectors.main(["check-vectors", str(tmp_path / "v")]) == 1
    assert "FAIL manifest: manifest.json: cannot read" in capsys.readouterr().err


def _documented_digest() -> str:
    text = (ROOT / "docs" / "vectors.md").read_text()
    found = re.findall(r"manifest_sha256 of the committed set: `([0-9a-f]{64})`", text)
    assert len(found) == 1, found
    return found[0]


def test_committed_vectors_verify_against_the_documented_digest(capsys):
    d = ROOT / "conformance" / "vectors"
    m = _load(d)
    assert m["spec_version"] == SPEC_VERSION
    assert len(m["cases"]) == 15 and len(m["files"]) == 174
    assert vectors.main(["check-vectors", str(d), "--expect-digest", _documented_digest()]) == 0, \
        capsys.readouterr().err


def test_report_json_records_spec_version(tmp_path):
    out = tmp_path / "r.json"
    assert cli_run(["--adapter", "broken_adapters:correct", "-k", "rank2-float64", "-q", "--no-ledger",
                    "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["spec_version"] == SPEC_VERSION and next(iter(rep)) == "spec_version"


def test_findings_are_dataclasses_with_case_and_field(pristine, tmp_path):
    d = tmp_path / "v"
    shutil.copytree(pristine, d)
    m = _load(d)
    _set(T, "eps", 1e-3)(d, m)
    _write(d, _reseal(d, m))
    found = vectors.find_problems(d)
    assert [dataclasses.astuple(f)[:2] for f in found] == [(T, "eps")], found
