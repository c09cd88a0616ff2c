"""Framework families: each runs in its own virtual environment and process, then the reports merge.

TensorFlow, JAX, Paddle, MindSpore and Keras 3 pin conflicting versions of numpy, ml_dtypes and
protobuf, and Keras 3 fixes its backend once per process. So the matrix is split into *families*:
each family names the pip requirements of its environment, the adapter factories it runs, and the
environment variables of its process (``KERAS_BACKEND``). A family is run by

    python -m bn_ref.conformance.families run NAME --out DIR [--root REPO] [--envs DIR]

which builds (or reuses) the family's virtual environment under ``--envs`` (``.nox/family-<env>``
by default, so nox's cache holds it), installs bn-ref there, runs ``python -m bn_ref.conformance
--adapter ... --json DIR/NAME.json`` in a fresh process and writes ``DIR/NAME.meta.json`` (harness
seconds, install size, the reason when the environment could not be built); then the family's §9
fact probes in the same venv, ``DIR/NAME.facts.json`` (:mod:`bn_ref.conformance.facts_families`). A family whose
environment cannot be built, or whose harness writes no report, still yields a report: one row per
adapter factory carrying the reason (:func:`missing_report`), so it is never silently missing.
:mod:`bn_ref.conformance.merge` merges the family reports into ``conformance/report.json`` and
``docs/conformance.md``; ``nox -s conformance`` does all of it (``-- --only NAME`` for one family).

``--jobs N`` runs N families at once (nox passes 2). Each family's meta records its wall seconds,
its CPU seconds (``os.wait4``: user + system, reaped children included) and the load average at
its start and end; ``_matrix.meta.json`` records the whole run. JAX's persistent compilation cache
is kept in ``ENVS/jax-compilation-cache`` (:func:`_jax_cache_env`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["Family", "FAMILIES", "CORE", "get", "select", "missing_report", "env_dir", "ensure_env",
           "run_family", "main"]

_A = "bn_ref.conformance.adapters."
_BASE_REQS = ("hypothesis>=6.100", "ml_dtypes>=0.4")  # what the harness itself needs besides numpy


@dataclass(frozen=True)
class Family:
    """One row group of the matrix, run in its own environment and process.

    ``steps`` are pip argument lists run in order in a fresh venv (several steps let a package be
    installed ``--no-deps``: tf-keras depends on ``tensorflow``, which would pull the CUDA-ready
    build over ``tensorflow-cpu``). ``env`` names the venv; families with the same ``env`` share it
    (Keras 3 on TensorFlow uses the TensorFlow family's venv). ``core`` families run in the nox
    session's own environment (the packages of bn-ref's extras), no venv is built for them.
    """

    name: str
    adapters: tuple[str, ...]
    steps: tuple[tuple[str, ...], ...] = ()
    env: str = ""
    variables: tuple[tuple[str, str], ...] = ()
    core: bool = False
    what: str = ""
    extra_args: tuple[str, ...] = field(default=())

    @property
    def env_name(self) -> str:
        return "core" if self.core else (self.env or self.name)

    def requirement_key(self) -> str:
        """A hash of the install steps: a venv built for other steps is rebuilt."""
        return hashlib.sha256(json.dumps([self.steps, list(_BASE_REQS)]).encode()).hexdigest()[:16]


TF_STEPS: tuple[tuple[str, ...], ...] = (("tensorflow-cpu==2.21.*",), ("--no-deps", "tf-keras==2.21.*"))
JAX_STEPS: tuple[tuple[str, ...], ...] = (("jax[cpu]>=0.4.30", "dm-haiku", "equinox"),)

FAMILIES: tuple[Family, ...] = (
    Family("core", tuple(), core=True,
           what="bn-ref's own backends, PyTorch, Flax, Keras 3 on JAX, ONNX, d2l and the distributed rows "
                "(the adapters built into the harness)"),
    Family("tensorflow", (_A + "tf_keras:factory",), TF_STEPS,
           what="tf.keras (Keras 2, tf-keras) BatchNormalization: non-fused and fused paths, and the renorm and "
                "virtual_batch_size rows of the variants group, TensorFlow CPU"),
    Family("keras-tensorflow", (_A + "keras_backends:factory",), TF_STEPS, env="tensorflow",
           variables=(("KERAS_BACKEND", "tensorflow"),), what="Keras 3 BatchNormalization on the TensorFlow backend"),
    Family("keras-torch", (_A + "keras_backends:factory",), core=True,
           variables=(("KERAS_BACKEND", "torch"),), what="Keras 3 BatchNormalization on the PyTorch backend"),
    Family("keras-numpy", (_A + "keras_backends:factory",), core=True,
           variables=(("KERAS_BACKEND", "numpy"),), what="Keras 3 BatchNormalization on the NumPy backend"),
    Family("keras-jax", (_A + "keras_backends:factory",), core=True,
           variables=(("KERAS_BACKEND", "jax"),),
           what="Keras 3 BatchNormalization on the JAX backend, built from its defaults (the preset row is in core)"),
    Family("jax-libraries", (_A + "haiku_adapter:factory", _A + "equinox_adapter:factory", _A + "stax_adapter:factory"),
           JAX_STEPS, what="dm-haiku hk.BatchNorm, Equinox eqx.nn.BatchNorm, jax.example_libraries.stax.BatchNorm"),
    # torchvision's PyPI wheel is built against PyTorch's CUDA build; installed --no-deps next to the CPU
    # build it cannot load its compiled ops, and the adapter compiles FrozenBatchNorm2d from its source
    # file (torchvision_adapter). "+cpu" keeps pip from ever fetching the multi-GB CUDA torch.
    Family("torchvision", (_A + "torchvision_adapter:factory",),
           (("torch==2.13.0+cpu",), ("--no-deps", "torchvision==0.28.0")),
           what="torchvision.ops.FrozenBatchNorm2d (frozen BN, the variants group) next to the CPU torch 2.13.0"),
    Family("tinygrad", (_A + "tinygrad_adapter:factory",), (("tinygrad",),), what="tinygrad nn.BatchNorm"),
    Family("paddle", (_A + "paddle_adapter:factory",), (("paddlepaddle",),),
           what="PaddlePaddle paddle.nn.BatchNorm1D/2D/3D (CPU)"),
    Family("mlx", (_A + "mlx_adapter:factory",), (("mlx[cpu]",),), what="MLX mlx.nn.BatchNorm (CPU build for Linux)"),
    Family("openvino", (_A + "openvino_adapter:factory",), (("openvino",),),
           what="OpenVINO BatchNormInference-5 (inference only)"),
    # mindspore 2.10's metadata admits numpy 2, but with numpy 2.4 a multiply inside mindspore.grad
    # fails ("numpy.core.multiarray failed to import"); ml_dtypes < 0.5 is the line that works on numpy 1.
    Family("mindspore", (_A + "mindspore_adapter:factory",), (("mindspore", "numpy<2", "ml_dtypes<0.5"),),
           what="MindSpore nn.BatchNorm1d/2d/3d (CPU)"),
)
"""The family table, in report order. ``core`` runs the harness's built-in rows."""

CORE = FAMILIES[0]


def get(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def select(only: Sequence[str] | None) -> list[Family]:
    """The families named in ``only`` (comma-separated items allowed), or all of them."""
    if not only:
        return list(FAMILIES)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    return [get(n) for n in names]


def missing_report(family: Family, reason: str, *, error: bool = False) -> dict:
    """A report with one row per adapter factory of ``family`` saying why it did not run.

    ``error=False`` makes the rows *skipped* (an environment that cannot be built on this machine, a
    wheel that does not exist for this Python); ``error=True`` makes them errors (the harness crashed).
    """
    rows = []
    for spec in family.adapters or ("(built-in adapters)",):
        mod = spec.split(":")[0].rsplit(".", 1)[-1]
        rows.append({"name": f"[{family.name}] {mod}", "convention": "?", "description": family.what,
                     "wall_s": 0.0, "build_error": reason if error else None,
                     "build_skip": None if error else reason, "groups": {}, "skipped_cases": [], "random": []})
    return {"schema": "bn-ref-conformance/1", "generated": None, "command": f"family {family.name}",
            "selection": None, "wall_s": 0.0, "versions": {}, "tolerances": {}, "ledger": {"path": None, "entries": []},
            "cases": [], "adapters": rows,
            "totals": {"pass": 0, "fail": 0, "error": 0, "xfail": 0, "skip": 0,
                       "build_errors": len(rows) if error else 0, "xpass_entries": 0},
            "non_pass_checks": [], "unexpected": len(rows) if error else 0}


def env_dir(family: Family, envs: Path) -> Path:
    return envs / f"family-{family.env_name}"


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _tail(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("WARNING")]
    return " / ".join(lines[-n:])[:400]


def _du(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def ensure_env(family: Family, root: Path, envs: Path, *, log=print) -> tuple[Path | None, str | None, dict]:
    """Build or reuse the family's venv; return (python, reason it could not be built, install facts).

    A venv is reused when its stamp (the hash of the install steps) matches; otherwise it is built
    afresh. bn-ref itself is not installed there: the harness process imports it from ``root``
    through ``PYTHONPATH`` (numpy comes with every framework; the harness's other needs are in
    ``_BASE_REQS``).
    """
    if family.core:
        return Path(sys.executable), None, {"env": "core"}
    venv = env_dir(family, envs)
    with _ENV_LOCKS.setdefault(str(venv.resolve()), threading.Lock()):  # families sharing a venv build it once
        return _ensure_venv(family, venv, log=log)


_ENV_LOCKS: dict[str, threading.Lock] = {}


def _ensure_venv(family: Family, venv: Path, *, log=print) -> tuple[Path | None, str | None, dict]:
    py = _python(venv)
    stamp = venv / "bn-ref-family.stamp"
    key = family.requirement_key()
    facts: dict = {"env": str(venv)}
    if py.exists() and stamp.is_file() and stamp.read_text().strip() == key:
        facts["reused"] = True
    else:
        facts["reused"] = False
        if venv.exists():
            shutil.rmtree(venv)
        t0 = time.perf_counter()
        steps = [("-m", "venv", str(venv))]
        pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        cmds = [[sys.executable, *steps[0]]] + [pip + list(s) for s in family.steps] + [pip + list(_BASE_REQS)]
        for cmd in cmds:
            log(f"[{family.name}] {' '.join(cmd[-4:])}")
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                reason = f"environment not built: `pip install {' '.join(cmd[len(pip):])}` failed: {_tail(p.stderr or p.stdout)}"
                return None, reason, facts | {"install_s": round(time.perf_counter() - t0, 1)}
        stamp.write_text(key + "\n")
        facts["install_s"] = round(time.perf_counter() - t0, 1)
    facts["install_mb"] = round(_du(venv) / 2**20)
    return py, None, facts


def _jax_cache_env(envs: Path) -> dict[str, str]:
    """JAX's persistent compilation cache beside the family venvs (``ENVS/jax-compilation-cache``).

    The JAX rows (bn-ref's JAX backend, Flax, Keras on JAX, Haiku, Equinox, stax) compile one XLA
    program per configuration and shape; most of their harness time is that compilation. Kept with
    the venvs, a rerun loads the compiled programs instead (measured on stax's rows: 17 -> 6 CPU s).
    Like the venvs it is a build artefact: keyed by the program, the JAX/XLA version and the backend,
    so it never changes a result; a cold run fills it. Set ``JAX_COMPILATION_CACHE_DIR`` yourself
    to put it elsewhere, ``JAX_ENABLE_COMPILATION_CACHE=false`` to turn it off.
    """
    return {"JAX_COMPILATION_CACHE_DIR": str((envs / "jax-compilation-cache").resolve()),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not on this platform
        return None


def _wait(p: subprocess.Popen) -> tuple[int, float | None]:
    """Wait for ``p``; its exit status and its CPU seconds (user + system, reaped children included).

    CPU seconds are what a loaded machine does not inflate (the machine may be shared): wall time
    there is CPU time stretched by the other processes. ``os.wait4`` gives them per child, so
    families run concurrently (``--jobs``) are still measured apart.
    """
    if hasattr(os, "wait4"):
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        return p.returncode, round(ru.ru_utime + ru.ru_stime, 1)
    return p.wait(), None


def run_family(family: Family, out_dir: Path, *, root: Path, envs: Path, harness_args: Sequence[str] = (),
               log=print) -> Path:
    """Run one family in its own process; always write ``out_dir/NAME.json`` (a report) and ``NAME.meta.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / f"{family.name}.json"
    meta_path = out_dir / f"{family.name}.meta.json"
    report.unlink(missing_ok=True)
    py, reason, facts = ensure_env(family, root, envs, log=log)
    meta = {"family": family.name, "what": family.what, **facts}
    if py is None:
        meta["reason"] = reason
        report.write_text(json.dumps(missing_report(family, str(reason)), indent=1) + "\n")
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        return report
    cmd = [str(py), "-m", "bn_ref.conformance", "--json", str(report), *family.extra_args, *harness_args]
    for spec in family.adapters:
        cmd += ["--adapter", spec]
    env = dict(os.environ, **dict(family.variables))
    for k, v in _jax_cache_env(envs).items():
        env.setdefault(k, v)
    if not family.core:  # bn-ref itself comes from the checkout, not from the venv
        env["PYTHONPATH"] = str(root)
    log(f"[{family.name}] {' '.join(cmd[1:])}")
    meta["load_avg_start"] = _loadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, env=env, cwd=str(root), stdout=out, stderr=err, text=True)
        rc, cpu_s = _wait(p)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    meta["harness_s"] = round(time.perf_counter() - t0, 1)
    meta["cpu_s"] = cpu_s  # user + system seconds of the harness and its reaped children (None: not measured)
    meta["load_avg_end"] = _loadavg()
    meta["exit_status"] = rc
    if not report.is_file():
        reason = f"the harness wrote no report (exit {rc}): {_tail(stderr)}"
        meta["reason"] = reason
        report.write_text(json.dumps(missing_report(family, reason, error=True), indent=1) + "\n")
    else:
        tail = stdout.strip().splitlines()[-1:] if stdout.strip() else []
        log(f"[{family.name}] {tail[0] if tail else ''} ({meta['harness_s']} s)")
    if family is not CORE:
        meta.update(_run_facts(family, py, out_dir, env=env, root=root, log=log))
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return report


def _run_facts(family: Family, py: Path, out_dir: Path, *, env: dict, root: Path, log=print) -> dict:
    """The family's §9 fact probes (bn_ref/conformance/facts_families.py) in its own process and venv:
    ``out_dir/NAME.facts.json``, which ``python -m bn_ref.conformance facts --collect`` commits."""
    out = out_dir / f"{family.name}.facts.json"
    out.unlink(missing_ok=True)
    cmd = [str(py), "-m", "bn_ref.conformance", "facts", "--family", family.name, "--json", str(out)]
    t0 = time.perf_counter()
    status: int | str
    try:
        p = subprocess.run(cmd, env=env, cwd=str(root), capture_output=True, text=True, timeout=900)
        status, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        status, err = "timeout", "the fact probes ran past 900 s"
    facts: dict[str, object] = {"facts_s": round(time.perf_counter() - t0, 1), "facts_exit_status": status}
    if not out.is_file():
        facts["facts_reason"] = f"no facts written (exit {status}): {_tail(err)}"
    log(f"[{family.name}] facts: {facts.get('facts_reason', out.name)} ({facts['facts_s']} s)")
    return facts


MATRIX_META = "_matrix.meta.json"
"""Written by ``run`` beside the family reports: the whole run's wall time, ``--jobs``, load averages."""


def _previous_seconds(out_dir: Path, fam: Family) -> float:
    try:
        return float(json.loads((out_dir / f"{fam.name}.meta.json").read_text()).get("harness_s") or 0)
    except (OSError, ValueError):
        return 0.0


def _locked_log():
    lock = threading.Lock()

    def log(m: str) -> None:
        with lock:
            print(m, file=sys.stderr, flush=True)

    return log


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bn_ref.conformance.families",
                                description="Run framework families of the conformance matrix in their own venvs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the family table")
    r = sub.add_parser("run", help="run families (build their venvs when needed)")
    r.add_argument("names", nargs="*", help="families to run (default: all)")
    r.add_argument("--out", default=os.path.join("conformance", "families"), help="directory of the family reports")
    r.add_argument("--root", default=str(Path(__file__).resolve().parents[2]), help="the bn-ref checkout to install")
    r.add_argument("--envs", default=".nox", help="where the family venvs live (default .nox, nox's cache)")
    r.add_argument("--harness-arg", action="append", default=[], help="extra argument for the harness (repeatable)")
    r.add_argument("--jobs", type=int, default=1,
                   help="families run at once (default 1). Each family is one process; on a 2-core machine "
                        "--jobs 2 overlaps one family's imports and single-threaded work with another's")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.cmd == "list":
        for f in FAMILIES:
            print(f"{f.name:18s} env={f.env_name:12s} {' ; '.join(' '.join(s) for s in f.steps) or '(core)':55s} {f.what}")
        return 0
    fams = select(args.names)
    out_dir = Path(args.out)
    log = _locked_log()
    t0, load0 = time.perf_counter(), _loadavg()

    def one(fam: Family) -> Path:
        return run_family(fam, out_dir, root=Path(args.root), envs=Path(args.envs), harness_args=args.harness_arg,
                          log=log)

    if args.jobs <= 1:
        for fam in fams:
            one(fam)
    else:  # longest first (by the previous run's harness time, when there is one): the pool drains evenly
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, sorted(fams, key=lambda f: -_previous_seconds(out_dir, f))))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MATRIX_META).write_text(json.dumps({
        "families": [f.name for f in fams], "jobs": args.jobs, "wall_s": round(time.perf_counter() - t0, 1),
        "load_avg_start": load0, "load_avg_end": _loadavg(), "cpu_count": os.cpu_count()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
