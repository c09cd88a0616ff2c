"""Golden vectors: the catalogue as language-neutral files (``.npy`` + ``manifest.json``).

``export-vectors DIR`` writes, for every selected case, convention and step, the inputs and the
oracle's outputs as float64 ``.npy`` files (values exactly representable in the case dtype for the
inputs) and one ``manifest.json`` describing them: the case, the convention, the tolerances of
``docs/spec.md`` §8.4 and the SHA-256 of every file. A port in any language reads the manifest,
runs its layer on the inputs in the case dtype and compares with the expected arrays using the
bound ``atol + rtol*M + C_COND*u*kappa*M``. ``check-vectors DIR`` re-verifies a directory: every
hash (tampering), every listed file present, no unlisted ``.npy`` file, and every expected array
against a fresh oracle evaluation. The format is documented in ``docs/adapters.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__, oracle
from ..conventions import PRESETS, Convention
from ..tolerances import C_COND, TOLERANCES, error_units
from .cases import instantiate, round_to_dtype, select
from .engine import _kappa

__all__ = ["FORMAT", "export_vectors", "check_vectors", "main"]

FORMAT = "bn-ref-vectors/1"
INPUTS = ("x", "gamma", "beta", "running_mean", "running_var", "dy")
OUTPUTS = ("y", "running_mean", "running_var", "dx", "dgamma", "dbeta")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected(inp: dict[str, Any], meta: dict[str, Any], conv: Convention) -> dict[str, np.ndarray | None]:
    with np.errstate(all="ignore"):
        f = oracle.forward(inp["x"], inp.get("gamma"), inp.get("beta"), inp["running_mean"], inp["running_var"],
                           training=meta["training"], convention=conv, axis=meta["feature_axis"], count=meta["count"])
        dx, dg, db = oracle.backward(inp["dy"], inp["x"], inp.get("gamma"), training=meta["training"], convention=conv,
                                     axis=meta["feature_axis"], running_mean=inp["running_mean"],
                                     running_var=inp["running_var"])
    return {"y": f.y, "running_mean": f.running_mean, "running_var": f.running_var, "dx": dx, "dgamma": dg,
            "dbeta": db if inp.get("beta") is not None else None}


def export_vectors(directory: str | os.PathLike, *, k: str | None = None,
                   conventions: Sequence[str] = tuple(PRESETS)) -> dict[str, Any]:
    """Write the vectors of the selected cases under the given presets; return the manifest."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    specs, _ = select(k)
    entries: list[dict[str, Any]] = []
    files: dict[str, str] = {}
    for cname in conventions:
        conv0 = PRESETS[cname]
        for spec in specs:
            steps = instantiate(spec, conv0)
            rm, rv, count = steps[0].running_mean, steps[0].running_var, 0
            for proto in steps:
                case = proto.with_state(rm, rv, count)
                stem = f"{cname}/{case.id.replace('/', '__')}"
                meta = {
                    "id": f"{cname}/{case.id}", "case": spec.id, "step": case.step, "description": spec.description,
                    "convention": dataclasses.asdict(case.convention), "dtype": case.dtype,
                    "training": case.training, "feature_axis": case.feature_axis, "count": case.count,
                    "eps": case.eps, "momentum": case.momentum, "expect_error": case.expect_error,
                    "inputs": {}, "expected": {},
                }
                inp = {name: getattr(case, name) for name in INPUTS}
                for name, arr in inp.items():
                    if arr is not None:
                        meta["inputs"][name] = _save(root, f"{stem}.in.{name}.npy", arr, files)
                if not case.expect_error:
                    meta["kappa"] = _kappa(case)
                    exp = _expected(inp, meta, case.convention)
                    for name, arr in exp.items():
                        if arr is not None:
                            meta["expected"][name] = _save(root, f"{stem}.out.{name}.npy", arr, files)
                    # The next step starts from these statistics as an implementation computing in
                    # the case dtype would store them: rounded to that dtype.
                    rm = round_to_dtype(exp["running_mean"], case.dtype)
                    rv = round_to_dtype(exp["running_var"], case.dtype)
                    count = count + 1 if case.training else count
                entries.append(meta)
                if case.expect_error:
                    break
    manifest = {
        "format": FORMAT,
        "generator": f"bn-ref {__version__}",
        "error_bound": "atol + rtol*M + c_cond*u*max(kappa,1)*M, M = max finite |expected|; "
                       "NaN and Inf positions must match exactly",
        "c_cond": C_COND,
        "tolerances": {kk: dataclasses.asdict(v) for kk, v in TOLERANCES.items()},
        "cases": entries,
        "files": dict(sorted(files.items())),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _save(root: Path, rel: str, arr: np.ndarray, files: dict[str, str]) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(np.asarray(arr, dtype=np.float64)), allow_pickle=False)
    files[rel] = _sha256(path)
    return rel


def check_vectors(directory: str | os.PathLike) -> list[str]:
    """Verify a vector directory; return the problems found (empty when all is well)."""
    root = Path(directory)
    problems: list[str] = []
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"cannot read {root / 'manifest.json'}: {exc}"]
    if manifest.get("format") != FORMAT:
        problems.append(f"manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
    files: dict[str, str] = manifest.get("files", {})
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
        elif _sha256(path) != digest:
            problems.append(f"{rel}: SHA-256 mismatch (file modified)")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.npy")}
    for rel in sorted(on_disk - set(files)):
        problems.append(f"{rel}: not listed in the manifest")
    if problems:
        return problems
    for meta in manifest.get("cases", []):
        try:
            conv = Convention(**meta["convention"])
            inp = {name: np.load(root / rel, allow_pickle=False) for name, rel in meta["inputs"].items()}
            for name in INPUTS:
                inp.setdefault(name, None)
            if meta["expect_error"]:
                try:
                    oracle.forward(inp["x"], inp["gamma"], inp["beta"], inp["running_mean"], inp["running_var"],
                                   training=meta["training"], convention=conv, axis=meta["feature_axis"],
                                   count=meta["count"])
                except ValueError:
                    continue
                problems.append(f"{meta['id']}: marked expect_error but the oracle does not raise")
                continue
            exp = _expected(inp, meta, conv)
            for name, rel in meta["expected"].items():
                got = np.load(root / rel, allow_pickle=False)
                units = error_units(got, exp[name], "float64")
                if not units <= 1.0:
                    problems.append(f"{meta['id']}: {name} differs from the oracle by {units:.3g} x tolerance")
            missing = [n for n, a in exp.items() if a is not None and n not in meta["expected"]]
            if missing:
                problems.append(f"{meta['id']}: expected outputs missing: {missing}")
        except Exception as exc:  # noqa: BLE001 - report, do not crash
            problems.append(f"{meta.get('id', '?')}: {type(exc).__name__}: {exc}")
    return problems


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bn_ref.conformance")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export-vectors", help="write golden vectors (.npy + manifest.json) to DIR")
    e.add_argument("dir")
    e.add_argument("-k", dest="k", default=None, help="select cases (as for the matrix run)")
    e.add_argument("--convention", action="append", choices=list(PRESETS),
                   help="presets to export (repeatable; default: all)")
    c = sub.add_parser("check-vectors", help="verify golden vectors in DIR against the oracle and their hashes")
    c.add_argument("dir")
    args = p.parse_args(list(argv))
    if args.cmd == "export-vectors":
        m = export_vectors(args.dir, k=args.k, conventions=args.convention or tuple(PRESETS))
        print(f"wrote {len(m['cases'])} case steps, {len(m['files'])} files to {args.dir}")
        return 0
    problems = check_vectors(args.dir)
    for prob in problems:
        print(f"FAIL {prob}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"{args.dir}: all vectors verified against the oracle and their SHA-256")
    return 0
