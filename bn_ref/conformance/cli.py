"""Command line of the conformance harness (``python -m bn_ref.conformance``, ``bn-ref conformance``).

    python -m bn_ref.conformance [--json PATH] [--markdown PATH] [-k EXPR] [--adapter MOD:FACTORY ...]
                                 [--timeout S] [--in-process] [--list] [--ledger PATH | --no-ledger]
                                 [--max-examples N] [--strict]
    python -m bn_ref.conformance export-vectors DIR [-k EXPR]
    python -m bn_ref.conformance check-vectors DIR [--expect-digest SHA256]
    python -m bn_ref.conformance identify --adapter MOD:FACTORY     (which Convention a BN follows)
    python -m bn_ref.conformance facts [--check|--write docs/spec.md] [--collect DIR]  (the executed §9 table)
    python -m bn_ref.conformance facts --family NAME --json PATH   (a family's §9 rows, in its venv)

The default ledger is the one shipped in the package (``bn_ref/conformance/ledger.toml``). The JSON
report records ``spec_version``, the version of ``docs/spec.md`` the matrix checks against.

Exit status: 0 when every check passed or is a recorded expected deviation; 1 on any unexpected
failure or error (and, with ``--strict``, on ledger entries whose deviation did not occur);
2 on a usage error; 130 when interrupted (Ctrl-C).

Built-in adapters run in this process; any other ``--adapter`` runs isolated in a worker process
(:mod:`.adapters._isolated`), so a crash, a hang or a missing framework is that row's ERROR or
SKIP and the run goes on.
"""

from __future__ import annotations

import argparse
import importlib.resources as resources
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import report as _report
from .adapters import BUILTIN, load, parse_spec
from .adapters._isolated import IsolatedFactory
from .cases import ALL_SPECS, CaseSpec, compile_k, select
from .engine import AdapterResult, LedgerEntry, load_ledger, log, run_adapter
from .explain import Recorder, explain_failures

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


DEFAULT_TIMEOUT_S = 120.0
"""Default ``--timeout``: generous for a first JIT compilation, short of a hung CI job."""


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bn_ref.conformance",
        description="Check Batch Normalization implementations against the bn-ref oracle. "
        "Subcommands: export-vectors DIR, check-vectors DIR, identify --adapter MOD:FACTORY, facts "
        "(see --help of each).",
    )
    p.add_argument("--json", metavar="PATH", help="write the JSON report here")
    p.add_argument("--markdown", metavar="PATH", help="write the Markdown report (docs/conformance.md) here")
    p.add_argument("-k", dest="k", metavar="EXPR", default=None,
                   help="select cases: substrings of case ids combined with and/or/not (like pytest -k); "
                   "a step id printed by a failure line (case/stepK-mode) selects its case")
    p.add_argument("--adapter", action="append", default=[], metavar="MODULE:FACTORY",
                   help="run only these adapters (repeatable); the factory returns an adapter or a list. "
                   "Adapters other than the built-in ones run in a worker process each (see --timeout)")
    p.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="time limit for loading an isolated (third-party) adapter and for each of its calls; "
                   f"a hang past it is that case's error and ends the adapter's run (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--in-process", action="store_true",
                   help="run third-party adapters in this process (no isolation: for debuggers and profilers)")
    p.add_argument("--list", action="store_true", help="list the selected case ids and exit")
    p.add_argument("--list-adapters", action="store_true", help="build and list the adapters, then exit")
    p.add_argument("--ledger", metavar="PATH", default=None, help="expected-deviation ledger (TOML)")
    p.add_argument("--no-ledger", action="store_true", help="ignore the ledger: every deviation is a failure")
    p.add_argument("--max-examples", type=int, default=12, metavar="N",
                   help="hypothesis examples per random pseudo-case and adapter (default 12)")
    p.add_argument("--strict", action="store_true", help="also fail when a ledger deviation no longer occurs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


_STEP_ID = re.compile(r"([^\s()/]+)/[^\s()]*")


def case_expression(expr: str | None) -> str | None:
    """``-k`` with every step id (``case/stepK-mode``, as failure lines print them) reduced to its case.

    A step depends on the steps before it (the running statistics are fed forward), so a step
    selects its whole case.

    >>> case_expression("sequence-rank2-float64/step2-train or rank3")
    'sequence-rank2-float64 or rank3'
    """
    if expr is None:
        return None
    return _STEP_ID.sub(r"\1", expr)


def _usage_error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


@dataclass
class _Row:
    """One factory's adapters (in this process, or stand-ins for an isolated worker's)."""

    spec: str
    adapters: list[Any]
    error: str | None = None
    skip: str | None = None
    isolated: IsolatedFactory | None = None


def _load_row(spec: str, *, isolate: bool, timeout: float) -> _Row:
    if spec in BUILTIN:
        loaded = load(spec)
        return _Row(spec, loaded.adapters, loaded.error, loaded.skip)
    if not isolate:
        loaded = load(spec, third_party=True)
        return _Row(spec, loaded.adapters, loaded.error, loaded.skip)
    host = IsolatedFactory(spec, timeout)
    adapters, error, skip = host.load()
    return _Row(spec, list(adapters), error, skip, isolated=host)


def run(argv: Sequence[str]) -> int:
    """Run the matrix; return the exit status."""
    args = _parser().parse_args(list(argv))
    for spec in args.adapter:
        try:
            parse_spec(spec)
        except ValueError as exc:
            return _usage_error(str(exc))
    if args.max_examples < 0:
        return _usage_error(f"--max-examples must be >= 0, got {args.max_examples}")
    k = case_expression(args.k)
    try:
        compile_k(k)
    except ValueError as exc:
        return _usage_error(str(exc))
    specs, randoms = select(k)
    if args.list:
        for s in specs:
            split = f" [replicas {s.replicas}]" if s.replicas is not None else ""
            print(f"{s.id:40s} {s.description}{split}")
        for r in randoms:
            print(f"{r:40s} hypothesis search ({r.split('-', 1)[1]})")
        print(f"{len(specs) + len(randoms)} of {len(ALL_SPECS) + 2} cases selected", file=sys.stderr)
        return 0
    if not specs and not randoms:
        return _usage_error(f"-k {args.k!r} selects no case (see --list)")
    progress = (lambda m: None) if args.quiet else log
    ledger_path = None if args.no_ledger else (args.ledger or default_ledger_path())
    if args.ledger and not os.path.isfile(args.ledger):
        return _usage_error(f"--ledger {args.ledger!r}: no such file")
    try:
        ledger = load_ledger(ledger_path)
    except Exception as exc:  # noqa: BLE001
        return _usage_error(f"cannot read the ledger {ledger_path}: {exc}")
    t0 = time.perf_counter()
    factories = args.adapter or list(BUILTIN)
    results: list[AdapterResult] = []
    explained: dict[str, dict[str, Any]] = {}
    factory_of: dict[str, str] = {}
    progress(f"bn-ref conformance: {len(specs)} cases + {len(randoms)} random searches; "
             f"ledger {ledger_path or '(none)'}")
    for fspec in factories:
        row = _load_row(fspec, isolate=not args.in_process, timeout=args.timeout)
        try:
            if row.error or row.skip:
                results.append(AdapterResult(name=fspec, convention="?", build_error=row.error, build_skip=row.skip))
                factory_of[fspec] = fspec
                progress(f"  {fspec}: {'ERROR ' + row.error if row.error else 'skipped: ' + str(row.skip)}")
                continue
            if args.list_adapters:
                for a in row.adapters:
                    print(f"{a.name}  [{getattr(a.convention, 'name', a.convention)}]")
                continue
            for i, adapter in enumerate(row.adapters):
                progress(f"[{fspec.split(':')[0].rsplit('.', 1)[-1]} {i + 1}/{len(row.adapters)}] {adapter.name}")
                res = _run_one(adapter, row, specs, randoms, ledger, progress, args.max_examples, explained)
                factory_of[res.name] = fspec
                results.append(res)
        finally:
            for adapter in row.adapters:
                _close(adapter)
            if row.isolated is not None:
                row.isolated.close()
    if args.list_adapters:
        return 0
    wall = time.perf_counter() - t0
    command = "python -m bn_ref.conformance " + shlex.join(list(argv))
    rep = _report.build_report(results, ledger, command=command.strip(), selection=args.k, wall_s=wall,
                               ledger_path=_display_path(ledger_path), explained=explained, factories=factory_of)
    if not args.adapter and not args.list_adapters:
        _add_fold_rows(rep, progress)
    print(_report.render_console(rep))
    if rep.get("fold"):
        fold = rep["fold"]
        skipped = sum(1 for r in fold if r["skip"])
        passed = sum(1 for r in fold if not r["skip"] and not r["error"] and r["passed"])
        print(f"fold rows (spec §12): {passed} pass, {len(fold) - passed - skipped} fail or error, {skipped} skipped")
    if args.json:
        _report.write_text(args.json, json.dumps(rep, indent=1, default=str) + "\n")
        progress(f"wrote {args.json}")
    if args.markdown:
        _report.write_text(args.markdown, _report.render_markdown(rep))
        progress(f"wrote {args.markdown}")
    if args.adapter or args.strict:
        status = 1 if rep["unexpected"] else 0
    else:  # the built-in matrix: bn-ref's own rows decide; framework failures are findings
        own = _report.own_unexpected(rep)
        status = 1 if own else 0
        if rep["unexpected"] and not own:
            print(f"{rep['unexpected']} unexpected result(s), all in framework rows: findings about those frameworks "
                  "(docs/findings.md), not failures of bn-ref; exit status 0 (--strict counts them)")
    if args.strict and rep["totals"]["xpass_entries"]:
        status = 1
    return status


def _run_one(
    adapter: Any, row: _Row, specs: Sequence[CaseSpec], randoms: Sequence[str], ledger: Sequence[LedgerEntry],
    progress: Callable[[str], None], max_examples: int, explained: dict[str, dict[str, Any]],
) -> AdapterResult:
    """One adapter over the selection: its checks, and an explanation of each failing step."""
    recorder = Recorder(adapter)
    try:
        res = run_adapter(recorder, specs, randoms, ledger=ledger, progress=progress, max_examples=max_examples)
    except Exception as exc:  # noqa: BLE001 - the run goes on
        return AdapterResult(name=str(getattr(adapter, "name", row.spec)), convention=adapter.convention,
                             build_error=f"{type(exc).__name__}: {exc}")
    if row.isolated is not None:  # a crash is never the expected "raise" of the errors group
        for c in res.checks:
            crash = row.isolated.crashed_steps.get(c.step)
            if crash and c.status == "pass" and c.group == "errors":
                c.status, c.message = "error", f"AdapterCrashed: {crash}"
    try:
        explained.update({f"{res.name}|{k}": v for k, v in explain_failures(recorder, res.checks).items()})
    except Exception as exc:  # noqa: BLE001 - explanations are a help, never a reason to stop
        progress(f"  warning: could not explain the failures of {res.name}: {exc}")
    return res


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


def _add_fold_rows(rep: Any, progress: Callable[[str], None]) -> None:
    """The built-in run also checks BN folding (spec §12): PyTorch's and ONNX Runtime's fusions and
    bn-ref's folds, each dtype a row; a failing or erroring fold row is an unexpected result."""
    try:
        from ..porting.fold_checks import run_all
    except ModuleNotFoundError as exc:  # a framework of the fold rows is not installed
        progress(f"fold rows skipped: {exc}")
        return
    progress("fold rows (spec §12)")
    fold = run_all()
    rep["fold"] = fold
    bad = [r for r in fold if r["error"] or (not r["skip"] and not r["passed"])]
    if bad:
        rep["unexpected"] = int(rep["unexpected"]) + len(bad)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the matrix run, or the ``export-vectors`` / ``check-vectors`` subcommands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("export-vectors", "check-vectors"):
            from . import vectors

            return vectors.main(argv)
        if argv and argv[0] == "identify":
            from . import identify

            return identify.main(argv[1:])
        if argv and argv[0] == "facts":
            from . import facts

            return facts.main(argv[1:])
        return run(argv)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): no report written", file=sys.stderr)
        return 130
