"""Command line of the conformance harness (``python -m bn_ref.conformance``, ``bn-ref conformance``).

    python -m bn_ref.conformance [--json PATH] [--markdown PATH] [-k EXPR] [--adapter MOD:FACTORY ...]
                                 [--list] [--ledger PATH | --no-ledger] [--max-examples N] [--strict]
    python -m bn_ref.conformance export-vectors DIR [-k EXPR]
    python -m bn_ref.conformance check-vectors DIR [--expect-digest SHA256]

The default ledger is the one shipped in the package (``bn_ref/conformance/ledger.toml``). The JSON
report records ``spec_version``, the version of ``docs/spec.md`` the matrix checks against.

Exit status: 0 when every check passed or is a recorded expected deviation; 1 on any unexpected
failure or error (and, with ``--strict``, on ledger entries whose deviation did not occur);
2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib.resources as resources
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .. import SPEC_VERSION
from . import report as _report
from .adapters import BUILTIN, load
from .cases import ALL_SPECS, compile_k, select
from .engine import AdapterResult, load_ledger, log, run_adapter

__all__ = ["main", "run", "default_ledger_path", "LEDGER_RESOURCE"]

LEDGER_RESOURCE = "ledger.toml"
"""The expected-deviation ledger, a resource of the ``bn_ref.conformance`` package."""


def default_ledger_path() -> str | None:
    """The ledger shipped inside the package (``bn_ref/conformance/ledger.toml``), or None if absent.

    Found with :mod:`importlib.resources`, so a wheel install reads the same ledger as the checkout.
    """
    ref = resources.files("bn_ref.conformance").joinpath(LEDGER_RESOURCE)
    if not ref.is_file():
        return None
    path = Path(str(ref))
    # Installed packages are plain directories; a zipped one is extracted to a lasting copy.
    return str(path) if path.is_file() else _extract(ref)


def _extract(ref: Any) -> str:
    import tempfile

    fd, name = tempfile.mkstemp(prefix="bn-ref-ledger-", suffix=".toml")
    with os.fdopen(fd, "wb") as f:
        f.write(ref.read_bytes())
    return name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bn_ref.conformance",
        description="Check Batch Normalization implementations against the bn-ref oracle. "
        "Subcommands: export-vectors DIR, check-vectors DIR (see --help of each).",
    )
    p.add_argument("--json", metavar="PATH", help="write the JSON report here")
    p.add_argument("--markdown", metavar="PATH", help="write the Markdown report (docs/conformance.md) here")
    p.add_argument("-k", dest="k", metavar="EXPR", default=None,
                   help="select cases: substrings of case ids combined with and/or/not (like pytest -k)")
    p.add_argument("--adapter", action="append", default=[], metavar="MODULE:FACTORY",
                   help="run only these adapters (repeatable); the factory returns an adapter or a list")
    p.add_argument("--list", action="store_true", help="list the selected case ids and exit")
    p.add_argument("--list-adapters", action="store_true", help="build and list the adapters, then exit")
    p.add_argument("--ledger", metavar="PATH", default=None, help="expected-deviation ledger (TOML)")
    p.add_argument("--no-ledger", action="store_true", help="ignore the ledger: every deviation is a failure")
    p.add_argument("--max-examples", type=int, default=12, metavar="N",
                   help="hypothesis examples per random pseudo-case and adapter (default 12)")
    p.add_argument("--strict", action="store_true", help="also fail when a ledger deviation no longer occurs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def run(argv: Sequence[str]) -> int:
    """Run the matrix; return the exit status."""
    args = _parser().parse_args(list(argv))
    try:
        compile_k(args.k)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    specs, randoms = select(args.k)
    if args.list:
        for s in specs:
            rep = f" [replicas {s.replicas}]" if s.replicas is not None else ""
            print(f"{s.id:40s} {s.description}{rep}")
        for r in randoms:
            print(f"{r:40s} hypothesis search ({r.split('-', 1)[1]})")
        print(f"{len(specs) + len(randoms)} of {len(ALL_SPECS) + 2} cases selected", file=sys.stderr)
        return 0
    if not specs and not randoms:
        print(f"error: -k {args.k!r} selects no case (see --list)", file=sys.stderr)
        return 2
    progress = (lambda m: None) if args.quiet else log
    ledger_path = None if args.no_ledger else (args.ledger or default_ledger_path())
    if args.ledger and not os.path.isfile(args.ledger):
        print(f"error: --ledger {args.ledger!r}: no such file", file=sys.stderr)
        return 2
    try:
        ledger = load_ledger(ledger_path)
    except Exception as exc:  # noqa: BLE001
        print(f"error: cannot read the ledger {ledger_path}: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    factories = args.adapter or list(BUILTIN)
    results: list[AdapterResult] = []
    progress(f"bn-ref conformance: {len(specs)} cases + {len(randoms)} random searches; "
             f"ledger {ledger_path or '(none)'}")
    for fspec in factories:
        loaded = load(fspec)
        if loaded.error or loaded.skip:
            r = AdapterResult(name=fspec, convention="?", build_error=loaded.error, build_skip=loaded.skip)
            results.append(r)
            progress(f"  {fspec}: {'ERROR ' + loaded.error if loaded.error else 'skipped: ' + str(loaded.skip)}")
            continue
        if args.list_adapters:
            for a in loaded.adapters:
                print(f"{a.name}  [{getattr(a.convention, 'name', a.convention)}]")
            continue
        for i, adapter in enumerate(loaded.adapters):
            progress(f"[{fspec.split(':')[0].rsplit('.', 1)[-1]} {i + 1}/{len(loaded.adapters)}] {adapter.name}")
            try:
                results.append(run_adapter(adapter, specs, randoms, ledger=ledger, progress=progress,
                                           max_examples=args.max_examples))
            except Exception as exc:  # noqa: BLE001 - the run goes on
                results.append(AdapterResult(name=str(getattr(adapter, "name", fspec)), convention=adapter.convention,
                                             build_error=f"{type(exc).__name__}: {exc}"))
            finally:
                _close(adapter)
    if args.list_adapters:
        return 0
    wall = time.perf_counter() - t0
    command = "python -m bn_ref.conformance " + shlex.join(list(argv))
    rep = _report.build_report(results, ledger, command=command.strip(), selection=args.k, wall_s=wall,
                               ledger_path=_display_path(ledger_path))
    rep = {"spec_version": SPEC_VERSION, **rep}  # the docs/spec.md version the matrix checks against
    print(_report.render_console(rep))
    if args.json:
        _report.write_text(args.json, json.dumps(rep, indent=1, default=str) + "\n")
        progress(f"wrote {args.json}")
    if args.markdown:
        _report.write_text(args.markdown, _report.render_markdown(rep))
        progress(f"wrote {args.markdown}")
    status = 1 if rep["unexpected"] else 0
    if args.strict and rep["totals"]["xpass_entries"]:
        status = 1
    return status


def _close(adapter: object) -> None:
    """Release what an adapter holds (the distributed ones keep worker processes), if it says how."""
    close = getattr(adapter, "close", None)
    if callable(close):
        try:
            close()
        except Exception as exc:  # noqa: BLE001 - shutting down must not end the run
            log(f"  warning: closing {getattr(adapter, 'name', adapter)} failed: {exc}")


def _display_path(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the matrix run, or the ``export-vectors`` / ``check-vectors`` subcommands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("export-vectors", "check-vectors"):
        from . import vectors

        return vectors.main(argv)
    return run(argv)
