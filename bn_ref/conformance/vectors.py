"""Golden vectors: the catalogue as language-neutral files (``.npy`` + ``manifest.json``).

``export-vectors DIR`` writes, for every selected case, convention and step, the inputs and the
oracle's outputs as float64 ``.npy`` files (input values exactly representable in the case dtype)
and one ``manifest.json`` describing them: the spec version, the selection, each case's metadata,
its tolerance (``docs/spec.md`` §8.4) and condition number, the SHA-256 of every file, a digest of
the list of case ids and a digest of the whole manifest. The format is documented in
``docs/vectors.md``.

``check-vectors DIR`` does not trust a stored field it can recompute. From the recorded selection
(``-k`` expression and presets) and the catalogue of the *installed* bn-ref it re-derives the list
of case ids and every case's metadata (convention, eps, momentum, count, dtype, shape, feature
axis, tolerance, file names) and its inputs; it recomputes every expected array and every
``kappa`` with the oracle from the verified inputs; and it checks the file hashes, the case-list
digest and the manifest digest. Every finding names the case (``manifest`` for a manifest-level
field) and the field. What remains free to whoever edits a manifest and re-seals its hashes is
only the selection -- which re-seals into a legitimate export of another selection; pinning the
manifest digest (``--expect-digest``) closes that too. ``docs/vectors.md`` states the threat model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .. import SPEC_VERSION, __version__, oracle
from ..conventions import PRESETS
from ..tolerances import C_COND, TOLERANCES, tolerance
from .cases import Case, CaseSpec, compile_k, instantiate, round_to_dtype, select
from .engine import _kappa

__all__ = ["FORMAT", "Finding", "export_vectors", "check_vectors", "find_problems", "manifest_digest", "main"]

FORMAT = "bn-ref-vectors/2"
INPUTS = ("x", "gamma", "beta", "running_mean", "running_var", "dy")
OUTPUTS = ("y", "running_mean", "running_var", "dx", "dgamma", "dbeta")
MANIFEST = "manifest"
"""The 'case' named by findings about a manifest-level field."""

ERROR_BOUND = ("atol + rtol*M + c_cond*u*max(kappa,1)*M, M = max finite |expected|; "
               "NaN and Inf positions must match exactly")

RECOMPUTE_ULPS = 1024.0
"""An expected array (or a chained running statistic) must agree with the fresh oracle to within
``RECOMPUTE_ULPS * 2**-53 * max(kappa, 1) * M`` (M = its largest finite magnitude): room for a
different summation order on another platform, about 1e6 times tighter than the float64
tolerance a port is held to (``rtol = 1e-10``). Inputs derived from the catalogue must match bit
for bit."""

KAPPA_RTOL = 1e-9
"""Relative agreement required between a stored ``kappa`` and the recomputed one."""

_CASE_KEYS = ("id", "case", "step", "description", "convention", "dtype", "training", "feature_axis", "shape",
              "count", "eps", "momentum", "expect_error", "replicas", "tolerance", "kappa", "inputs", "expected")
_TOP_KEYS = ("format", "spec_version", "generator", "selection", "error_bound", "c_cond", "tolerances",
             "case_ids_sha256", "cases", "files", "manifest_sha256")


@dataclass(frozen=True)
class Finding:
    """One problem: the case id (or ``"manifest"``), the field (dotted path) and what is wrong."""

    case: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.field}: {self.message}"


# -- canonical serialization and digests ------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """The canonical byte form the digests are taken over: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical serialization of the manifest without its ``manifest_sha256``."""
    return hashlib.sha256(canonical_json({k: v for k, v in manifest.items() if k != "manifest_sha256"})).hexdigest()


def case_ids_digest(ids: Sequence[str]) -> str:
    """SHA-256 of the canonical serialization of the ordered list of case ids."""
    return hashlib.sha256(canonical_json(list(ids))).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


# -- the plan: what the catalogue says a selection contains ------------------------------------


@dataclass(frozen=True)
class _Step:
    """One planned case step: its preset, spec and catalogue case (step-0 running statistics)."""

    preset: str
    spec: CaseSpec
    case: Case  # count is right; running statistics are those of step 0 (placeholders later)

    @property
    def id(self) -> str:
        return f"{self.preset}/{self.case.id}"

    @property
    def stem(self) -> str:
        return f"{self.preset}/{self.case.id.replace('/', '__')}"


def _plan(k: str | None, presets: Sequence[str]) -> Iterator[_Step]:
    """The case steps an export of ``-k k`` under ``presets`` contains, in manifest order."""
    specs, _ = select(k)
    specs = [s for s in specs if s.variant is None]  # the variants group has no vector format (yet)
    for pname in presets:
        for spec in specs:
            count = 0
            for proto in instantiate(spec, PRESETS[pname]):
                yield _Step(pname, spec, dataclasses.replace(proto, count=count))
                if proto.expect_error:
                    break
                count += 1 if proto.training else 0


def _tolerance_json(dtype: str) -> dict[str, Any]:
    t = dataclasses.asdict(tolerance(dtype))
    t.pop("dtype", None)
    return {**t, "c_cond": C_COND}


def _meta(step: _Step) -> dict[str, Any]:
    """Every metadata field of a case that follows from the catalogue (no arrays, no kappa)."""
    c = step.case
    inputs = [n for n in INPUTS if getattr(c, n) is not None]
    return {
        "id": step.id, "case": step.spec.id, "step": c.step, "description": step.spec.description,
        "convention": dataclasses.asdict(c.convention), "dtype": c.dtype, "training": c.training,
        "feature_axis": c.feature_axis, "shape": list(c.x.shape), "count": c.count, "eps": c.eps,
        "momentum": c.momentum, "expect_error": c.expect_error,
        "replicas": None if c.replicas is None else list(c.replicas),
        "tolerance": _tolerance_json(c.dtype),
        "inputs": {n: f"{step.stem}.in.{n}.npy" for n in inputs},
    }


def _expected(case: Case) -> dict[str, np.ndarray]:
    """The oracle's outputs for one step (§2-§5); None outputs (dbeta when affine is off) left out."""
    with np.errstate(all="ignore"):
        f = oracle.forward(case.x, case.gamma, case.beta, case.running_mean, case.running_var,
                           training=case.training, convention=case.convention, axis=case.feature_axis,
                           count=case.count)
        dx, dg, db = oracle.backward(case.dy, case.x, case.gamma, training=case.training,
                                     convention=case.convention, axis=case.feature_axis,
                                     running_mean=case.running_mean, running_var=case.running_var)
    out = {"y": f.y, "running_mean": f.running_mean, "running_var": f.running_var, "dx": dx, "dgamma": dg,
           "dbeta": db if case.beta is not None else None}
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items() if v is not None}


def _kappa_of(case: Case) -> np.ndarray:
    """The engine's condition number of a case (§8.4); NaN/Inf data propagate silently (§7.4)."""
    with np.errstate(all="ignore"):
        return np.asarray(_kappa(case), dtype=np.float64)


def _kappa_json(case: Case) -> Any:
    k = _kappa_of(case)
    return float(k) if k.ndim == 0 else k.tolist()


# -- export ------------------------------------------------------------------------------------


def export_vectors(directory: str | os.PathLike, *, k: str | None = None,
                   conventions: Sequence[str] = tuple(PRESETS)) -> dict[str, Any]:
    """Write the vectors of the cases ``-k k`` selects under the given presets; return the manifest.

    Step k > 0 of a sequence starts from step k - 1's expected running statistics rounded to the
    case dtype (as an implementation computing in that dtype stores them) and its ``count``.
    """
    compile_k(k)
    presets = list(conventions)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"conventions: unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
    plan = list(_plan(k, presets))
    if not plan:
        raise ValueError(f"-k {k!r} selects no case (see python -m bn_ref.conformance --list)")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    files: dict[str, str] = {}
    rm = rv = None
    for step in plan:
        if step.case.step == 0:
            rm, rv = step.case.running_mean, step.case.running_var
        case = step.case.with_state(rm, rv, step.case.count)
        meta = _meta(step)
        for name, rel in meta["inputs"].items():
            _save(root, rel, getattr(case, name), files)
        meta["expected"] = {}
        if not case.expect_error:
            meta["kappa"] = _kappa_json(case)
            exp = _expected(case)
            for name in OUTPUTS:
                if name in exp:
                    meta["expected"][name] = _save(root, f"{step.stem}.out.{name}.npy", exp[name], files)
            rm = round_to_dtype(exp["running_mean"], case.dtype)
            rv = round_to_dtype(exp["running_var"], case.dtype)
        entries.append(meta)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "spec_version": SPEC_VERSION,
        "generator": f"bn-ref {__version__}",
        "selection": {"k": k, "conventions": presets},
        "error_bound": ERROR_BOUND,
        "c_cond": C_COND,
        "tolerances": {kk: dataclasses.asdict(v) for kk, v in TOLERANCES.items()},
        "case_ids_sha256": case_ids_digest([e["id"] for e in entries]),
        "cases": entries,
        "files": dict(sorted(files.items())),
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return manifest


def _save(root: Path, rel: str, arr: np.ndarray, files: dict[str, str]) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(np.asarray(arr, dtype=np.float64)), allow_pickle=False)
    files[rel] = _sha256(path)
    return rel


# -- check -------------------------------------------------------------------------------------


class _Checker:
    """Collects findings for one directory; see :func:`find_problems`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.findings: list[Finding] = []
        self.bad_files: set[str] = set()

    def add(self, case: str, field: str, message: str) -> None:
        self.findings.append(Finding(case, field, message))

    # manifest-level ----------------------------------------------------------------------

    def load(self) -> dict[str, Any] | None:
        dups: list[tuple[str, str]] = []

        def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: set[str] = set()
            owner = next((v for kk, v in pairs if kk == "id" and isinstance(v, str)), MANIFEST)
            for kk, _ in pairs:
                if kk in seen:
                    dups.append((owner, kk))
                seen.add(kk)
            return dict(pairs)

        def no_constant(name: str) -> Any:
            raise ValueError(f"non-standard JSON constant {name}")

        try:
            text = (self.root / "manifest.json").read_text(encoding="utf-8")
            manifest = json.loads(text, object_pairs_hook=hook, parse_constant=no_constant)
        except (OSError, ValueError) as exc:
            self.add(MANIFEST, "manifest.json", f"cannot read {self.root / 'manifest.json'}: {exc}")
            return None
        for owner, key in dups:
            self.add(owner, key, "key appears more than once in its JSON object (parsers disagree on which wins)")
        if not isinstance(manifest, dict):
            self.add(MANIFEST, "manifest.json", "is not a JSON object")
            return None
        return manifest

    def check_top(self, m: dict[str, Any]) -> tuple[str | None, list[str]] | None:
        """Manifest-level fields; returns the selection, or None when it cannot be used."""
        if m.get("format") != FORMAT:
            self.add(MANIFEST, "format", f"{m.get('format')!r}, this bn-ref reads {FORMAT!r}")
        if m.get("spec_version") != SPEC_VERSION:
            self.add(MANIFEST, "spec_version", f"{m.get('spec_version')!r}: vectors of another spec version; "
                     f"this bn-ref implements docs/spec.md {SPEC_VERSION} (check them with the bn-ref release "
                     f"of that version, or re-export)")
        for key in sorted(set(m) - set(_TOP_KEYS)):
            self.add(MANIFEST, key, "not a field of the format")
        for key in _TOP_KEYS:
            if key not in m:
                self.add(MANIFEST, key, "missing")
        if "manifest_sha256" in m and m["manifest_sha256"] != _safe(manifest_digest, m):
            self.add(MANIFEST, "manifest_sha256", "does not match the manifest's content (edited after export)")
        self.compare(MANIFEST, "error_bound", m.get("error_bound"), ERROR_BOUND)
        self.compare(MANIFEST, "c_cond", m.get("c_cond"), C_COND)
        self.compare(MANIFEST, "tolerances", m.get("tolerances"),
                     {kk: dataclasses.asdict(v) for kk, v in TOLERANCES.items()})
        sel = m.get("selection")
        if not isinstance(sel, dict) or set(sel) != {"k", "conventions"}:
            self.add(MANIFEST, "selection", f"{sel!r}: expected {{'k': EXPR or null, 'conventions': [PRESET, ...]}}")
            return None
        k, presets = sel["k"], sel["conventions"]
        try:
            if k is not None and not isinstance(k, str):
                raise ValueError("not a string")
            compile_k(k)
        except ValueError as exc:
            self.add(MANIFEST, "selection.k", f"{k!r}: {exc}")
            return None
        if not isinstance(presets, list) or not presets or not all(p in PRESETS for p in presets) \
                or len(set(presets)) != len(presets):
            self.add(MANIFEST, "selection.conventions",
                     f"{presets!r}: expected distinct preset names from {', '.join(PRESETS)}")
            return None
        return k, presets

    def compare(self, case: str, field: str, stored: Any, derived: Any) -> bool:
        """Record a finding per differing leaf of two JSON values; True when they agree."""
        if isinstance(derived, dict) and isinstance(stored, dict):
            ok = True
            for key in sorted(set(derived) | set(stored)):
                sub = f"{field}.{key}"
                if key not in stored:
                    self.add(case, sub, "missing")
                    ok = False
                elif key not in derived:
                    self.add(case, sub, f"{stored[key]!r}: no such field here")
                    ok = False
                else:
                    ok = self.compare(case, sub, stored[key], derived[key]) and ok
            return ok
        if not _same(stored, derived):
            self.add(case, field, f"{stored!r} in the manifest; the catalogue of bn-ref {__version__} "
                     f"(spec {SPEC_VERSION}) gives {derived!r}")
            return False
        return True

    def check_files(self, m: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """Hashes, missing and unlisted files; returns file -> (case id, field) for the messages."""
        owners: dict[str, tuple[str, str]] = {}
        for e in m.get("cases") or []:
            if not isinstance(e, dict):
                continue
            for part in ("inputs", "expected"):
                refs = e.get(part)
                if isinstance(refs, dict):
                    for name, rel in refs.items():
                        if isinstance(rel, str):
                            owners.setdefault(rel, (str(e.get("id", "?")), f"{part}.{name}"))
        files = m.get("files")
        if not isinstance(files, dict):
            self.add(MANIFEST, "files", "missing or not an object")
            files = {}
        for rel, digest in files.items():
            case, field = owners.get(rel, (MANIFEST, f"files[{rel!r}]"))
            path = self.root / rel
            if not _inside(self.root, path) or not path.is_file():
                self.add(case, field, f"{rel}: listed in the manifest but missing")
                self.bad_files.add(rel)
            elif _sha256(path) != digest:
                self.add(case, field, f"{rel}: SHA-256 mismatch (file modified)")
                self.bad_files.add(rel)
            if rel not in owners:
                self.add(MANIFEST, f"files[{rel!r}]", "listed but belongs to no case")
        for rel, (case, field) in owners.items():
            if rel not in files:
                self.add(case, field, f"{rel}: no SHA-256 in the manifest's files")
                self.bad_files.add(rel)
        on_disk = {p.relative_to(self.root).as_posix() for p in self.root.rglob("*.npy")}
        for rel in sorted(on_disk - set(files)):
            self.add(MANIFEST, "files", f"{rel}: not listed in the manifest")
        return owners

    # per case ------------------------------------------------------------------------------

    def check_cases(self, m: dict[str, Any], k: str | None, presets: list[str]) -> None:
        plan = list(_plan(k, presets))
        derived_ids = [s.id for s in plan]
        if m.get("case_ids_sha256") != case_ids_digest(derived_ids):
            self.add(MANIFEST, "case_ids_sha256", f"does not match the {len(derived_ids)} case ids the catalogue "
                     f"gives for selection k={k!r}, conventions={presets}")
        entries = m.get("cases")
        if not isinstance(entries, list):
            self.add(MANIFEST, "cases", "missing or not a list")
            return
        stored: dict[str, dict[str, Any]] = {}
        first_at: dict[str, int] = {}
        order: list[str] = []
        for i, e in enumerate(entries):
            cid = e.get("id") if isinstance(e, dict) else None
            if not isinstance(cid, str):
                self.add(MANIFEST, f"cases[{i}].id", "missing or not a string")
                continue
            if cid in stored:
                self.add(cid, "id", f"duplicated case (cases[{first_at[cid]}] and cases[{i}])")
                continue
            stored[cid], first_at[cid] = e, i
            order.append(cid)
        if m.get("case_ids_sha256") != case_ids_digest(order):
            self.add(MANIFEST, "case_ids_sha256", "does not match the manifest's own list of case ids "
                     "(a case was added, removed or reordered after export)")
        wanted = set(derived_ids)
        for cid in order:
            if cid not in wanted:
                self.add(cid, "id", f"added case: not in the catalogue for selection k={k!r}, conventions={presets}")
        for cid in derived_ids:
            if cid not in stored:
                self.add(cid, "id", "removed case: the catalogue has it for this selection, the manifest does not")
        kept = [c for c in order if c in wanted]
        if kept != [c for c in derived_ids if c in stored]:
            first = next(a for a, b in zip(kept, [c for c in derived_ids if c in stored]) if a != b)
            self.add(first, "id", "cases are out of the catalogue's order (a sequence's steps must follow each other)")
        prev: dict[str, np.ndarray] | None = None  # the previous step's stored expected arrays
        prev_ref: dict[str, np.ndarray] | None = None  # ... and the oracle's
        for step in plan:
            if step.case.step == 0:
                prev = prev_ref = None
            e = stored.get(step.id)
            if e is None:
                prev = prev_ref = None
                continue
            prev, prev_ref = self.check_case(step, e, prev, prev_ref)

    def check_case(self, step: _Step, e: dict[str, Any], prev: dict[str, np.ndarray] | None,
                   prev_ref: dict[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        cid = step.id
        meta = _meta(step)
        for key in sorted(set(e) - set(_CASE_KEYS)):
            self.add(cid, key, f"{e[key]!r} is not a field of the format")
        for key, val in meta.items():
            if key == "inputs":
                continue
            self.compare(cid, key, e.get(key, _MISSING), val)
        # Inputs: the catalogue's arrays bit for bit; running statistics of step k > 0 continue the
        # previous step's expected ones (rounded to the dtype) exactly, which must match the oracle.
        refs = e.get("inputs")
        self.compare(cid, "inputs", refs if isinstance(refs, dict) else _MISSING, meta["inputs"])
        refs = refs if isinstance(refs, dict) else {}
        case = step.case
        chain = case.step > 0
        if chain and prev_ref is not None:
            case = case.with_state(round_to_dtype(prev_ref["running_mean"], case.dtype),
                                   round_to_dtype(prev_ref["running_var"], case.dtype), case.count)
        kappa_ref = float(np.max(_kappa_of(case))) if not case.expect_error else 1.0
        loaded: dict[str, np.ndarray] = {}
        for name, rel in meta["inputs"].items():
            arr = self.array(cid, f"inputs.{name}", refs.get(name), rel)
            if arr is None:
                continue
            loaded[name] = arr
            ref = getattr(case, name)
            if name in ("running_mean", "running_var") and chain:
                if prev is not None and name in prev and not _bitwise(arr, round_to_dtype(prev[name], case.dtype)):
                    self.add(cid, f"inputs.{name}", f"does not continue the previous step's expected {name} "
                             f"rounded to {case.dtype}")
                if prev_ref is not None and not _agree(arr, ref, kappa_ref):
                    self.add(cid, f"inputs.{name}", "differs from the oracle's running statistic of the previous "
                             f"step beyond rounding ({_where_differs(arr, ref)})")
            elif not _bitwise(arr, ref):
                self.add(cid, f"inputs.{name}", f"differs from the catalogue's {name} "
                         f"({_where_differs(arr, ref)}); inputs are derived from the case id, bit for bit")
        if chain and prev_ref is None and "running_mean" in loaded and "running_var" in loaded:
            # The previous step is missing (reported): judge this one from its own running statistics.
            case = case.with_state(loaded["running_mean"], loaded["running_var"], case.count)
        if case.expect_error:
            try:
                with np.errstate(all="ignore"):
                    oracle.forward(case.x, case.gamma, case.beta, case.running_mean, case.running_var,
                                   training=case.training, convention=case.convention, axis=case.feature_axis,
                                   count=case.count)
            except ValueError:
                pass
            else:
                self.add(cid, "expect_error", "marked expect_error but the oracle does not raise")
            if "kappa" in e:
                self.add(cid, "kappa", f"{e['kappa']!r}: a case that must raise has no kappa")
            self.compare(cid, "expected", e.get("expected", _MISSING), {})
            return {}, {}
        # kappa and the expected arrays: recomputed from the verified inputs with the oracle.
        kap = _kappa_json(case)
        if "kappa" in e and not _close(e["kappa"], kap, KAPPA_RTOL):
            self.add(cid, "kappa", f"{e['kappa']!r} in the manifest; recomputed from the inputs: {kap!r}")
        elif "kappa" not in e:
            self.add(cid, "kappa", "missing")
        exp_ref = _expected(case)
        got_refs = e.get("expected") if isinstance(e.get("expected"), dict) else {}
        derived_refs = {n: f"{step.stem}.out.{n}.npy" for n in OUTPUTS if n in exp_ref}
        self.compare(cid, "expected", dict(got_refs) if got_refs else _MISSING, derived_refs)
        got: dict[str, np.ndarray] = {}
        for name, rel in derived_refs.items():
            arr = self.array(cid, f"expected.{name}", got_refs.get(name), rel)
            if arr is None:
                continue
            got[name] = arr
            if not _agree(arr, exp_ref[name], kappa_ref):
                self.add(cid, f"expected.{name}", f"differs from the oracle: {_where_differs(arr, exp_ref[name])} "
                         f"(allowed {RECOMPUTE_ULPS:g} float64 ulps x max(kappa, 1) x max|expected|)")
        return got, exp_ref

    def array(self, cid: str, field: str, rel: Any, derived_rel: str) -> np.ndarray | None:
        """Load a referenced array once its reference and hash are sound; None (and a finding) otherwise."""
        if rel != derived_rel or rel in self.bad_files:
            return None  # already reported (wrong file name, missing file or hash)
        path = self.root / rel
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - report, do not crash
            self.add(cid, field, f"{rel}: not a readable .npy file ({type(exc).__name__}: {exc})")
            return None
        if arr.dtype != np.dtype("<f8"):
            self.add(cid, field, f"{rel}: dtype {arr.dtype}, the format stores little-endian float64")
            return None
        return arr


_MISSING = "<missing>"


def _safe(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (TypeError, ValueError) as exc:
        return f"<unserializable: {exc}>"


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _same(a: Any, b: Any) -> bool:
    """JSON equality that tells 1 from 1.0 from True (a type change is an edit too)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _close(stored: Any, derived: Any, rtol: float) -> bool:
    s, d = np.asarray(stored), np.asarray(derived, dtype=np.float64)
    if s.shape != d.shape or s.dtype.kind != "f":
        return False
    return bool(np.all(np.abs(s - d) <= rtol * np.abs(d)))


def _bitwise(a: np.ndarray, b: np.ndarray | None) -> bool:
    if b is None:
        return False
    b = np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and a.tobytes() == np.ascontiguousarray(b).tobytes()


def _agree(a: np.ndarray, ref: np.ndarray | None, kappa: float) -> bool:
    """Same shape and NaN/Inf pattern; finite entries within :data:`RECOMPUTE_ULPS` of the oracle."""
    if ref is None:
        return False
    ref = np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        return False
    if not np.array_equal(np.isnan(a), np.isnan(ref)):
        return False
    inf = np.isinf(ref)
    if not np.array_equal(inf, np.isinf(a)) or not np.array_equal(a[inf], ref[inf]):
        return False
    ok = np.isfinite(ref)
    if not ok.any():
        return True
    m = float(np.max(np.abs(ref[ok])))
    allowed = RECOMPUTE_ULPS * 2.0**-53 * max(kappa, 1.0) * m
    return bool(np.max(np.abs(a[ok] - ref[ok])) <= allowed)


def _where_differs(a: np.ndarray, ref: np.ndarray | None) -> str:
    if ref is None:
        return "no reference array"
    ref = np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        return f"shape {a.shape}, expected {ref.shape}"
    with np.errstate(invalid="ignore"):
        d = np.where(np.isnan(a) & np.isnan(ref), 0.0, np.abs(a - ref))
    d = np.where(np.isnan(d), np.inf, d)
    i = np.unravel_index(int(np.argmax(d)), d.shape) if d.size else ()
    return f"largest difference {float(d[i]) if d.size else 0.0:.3g} at index {tuple(int(j) for j in i)}"


def find_problems(directory: str | os.PathLike, *, expect_digest: str | None = None) -> list[Finding]:
    """Verify a vector directory; return the findings (empty when all is well).

    ``expect_digest``: the ``manifest_sha256`` the directory must carry (a published pin).
    """
    chk = _Checker(Path(directory))
    m = chk.load()
    if m is None:
        return chk.findings
    sel = chk.check_top(m)
    chk.check_files(m)
    if sel is not None:
        try:
            chk.check_cases(m, *sel)
        except Exception as exc:  # noqa: BLE001 - a malformed manifest is a finding, not a crash
            chk.add(MANIFEST, "cases", f"cannot be verified: {type(exc).__name__}: {exc}")
    if expect_digest is not None and m.get("manifest_sha256") != expect_digest.strip().lower():
        chk.add(MANIFEST, "manifest_sha256", f"{m.get('manifest_sha256')!r}, the pinned digest is {expect_digest!r}")
    return chk.findings


def check_vectors(directory: str | os.PathLike, *, expect_digest: str | None = None) -> list[str]:
    """:func:`find_problems` as strings ``"<case>: <field>: <message>"`` (empty when all is well)."""
    return [str(f) for f in find_problems(directory, expect_digest=expect_digest)]


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bn_ref.conformance")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export-vectors", help="write golden vectors (.npy + manifest.json) to DIR")
    e.add_argument("dir")
    e.add_argument("-k", dest="k", default=None, help="select cases (as for the matrix run)")
    e.add_argument("--convention", action="append", choices=list(PRESETS),
                   help="presets to export (repeatable; default: all)")
    c = sub.add_parser("check-vectors", help="verify golden vectors in DIR: metadata and arrays re-derived from the "
                       "catalogue and the oracle, hashes, case list, spec version")
    c.add_argument("dir")
    c.add_argument("--expect-digest", metavar="SHA256", default=None,
                   help="also require this manifest_sha256 (a published pin of the vector set)")
    args = p.parse_args(list(argv))
    if args.cmd == "export-vectors":
        try:
            m = export_vectors(args.dir, k=args.k, conventions=args.convention or tuple(PRESETS))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {len(m['cases'])} case steps, {len(m['files'])} files to {args.dir} "
              f"(spec {SPEC_VERSION}, manifest_sha256 {m['manifest_sha256']})")
        return 0
    problems = find_problems(args.dir, expect_digest=args.expect_digest)
    for prob in problems:
        print(f"FAIL {prob}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"{args.dir}: all vectors verified (spec {SPEC_VERSION}): metadata and inputs re-derived from the "
          f"catalogue, outputs and kappa recomputed with the oracle, SHA-256 of every file and of the manifest")
    return 0
