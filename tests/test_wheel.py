"""The package is complete as installed (issue 11, item 3): a wheel built from the source tree and
installed non-editable into a fresh virtual environment runs ``python -m bn_ref.conformance`` from
a directory outside the checkout with the packaged ledger, and gives the same matrix as the checkout.

The heavy frameworks (PyTorch, ONNX Runtime) come from this interpreter's environment: the fresh
venv gets a ``.pth`` file listing this environment's site-packages *after* its own, so the wheel's
``bn_ref`` is the one imported (asserted). ``--system-site-packages`` would not do: from a venv (as
under nox) it exposes the base interpreter's packages, not the venv's. CI runs this test as part of
``nox -s tests`` (``.ci/run``)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

ADAPTERS = ("bn_ref.conformance.adapters.onnx_adapter:factory", "bn_ref.conformance.adapters.frameworks_torch:factory")
SELECTION = "rank2-float64 or tiny-scale-float64 or dtype-float32"


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _matrix_args(out: Path) -> list[str]:
    args = ["-m", "bn_ref.conformance", "-k", SELECTION, "-q", "--json", str(out)]
    for a in ADAPTERS:
        args += ["--adapter", a]
    return args


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with the wheel of this source tree installed (not editable); returns its python."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "bn_ref", src / "bn_ref", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = _clean_env()
    isolation = []
    try:
        import setuptools  # noqa: F401

        isolation = ["--no-build-isolation"]  # build offline with this environment's setuptools
    except ImportError:
        pass
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp / "dist"), str(src)],
         cwd=tmp, env=env)
    (whl,) = (tmp / "dist").glob("bn_ref-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "bn_ref/conformance/ledger.toml" in names, "the ledger is not package data"
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    py = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp, env=env).stdout.strip())
    # This environment's package directories, including any a .pth file added (as in a venv layered
    # on another); in sys.path order, which the fresh venv keeps after its own site-packages.
    cands = [*sys.path, *site.getsitepackages()]
    parents = list(dict.fromkeys(p for p in cands if Path(p).name in ("site-packages", "dist-packages")
                                 and Path(p).is_dir()))
    (purelib / "zz_parent_env.pth").write_text("".join(f"{p}\n" for p in parents))
    # Install with this environment's pip (visible through the .pth) into the venv, ignoring any
    # bn-ref this environment may hold (an editable install under nox).
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(whl)],
         cwd=tmp, env=env)
    return py


def test_wheel_install_runs_the_matrix_like_the_checkout(installed, tmp_path):
    py = installed
    venv = py.parents[1]
    away = tmp_path / "elsewhere"  # no bn_ref/ and no conformance/ here
    away.mkdir()
    env = _clean_env()
    probe = _run([str(py), "-c", "import bn_ref, bn_ref.conformance.cli as c; print(bn_ref.__file__); "
                  "print(c.default_ledger_path())"], cwd=away, env=env).stdout.split("\n")
    assert Path(probe[0]).resolve().is_relative_to(venv.resolve()), probe
    assert Path(probe[1]).resolve().is_relative_to(venv.resolve()) and probe[1].endswith("ledger.toml"), probe
    assert Path(probe[1]).read_bytes() == (ROOT / "bn_ref" / "conformance" / "ledger.toml").read_bytes()

    _run([str(py), *_matrix_args(away / "wheel.json")], cwd=away, env=env)
    env_checkout = {**env, "PYTHONPATH": str(ROOT)}
    _run([sys.executable, *_matrix_args(tmp_path / "checkout.json")], cwd=ROOT, env=env_checkout)
    wheel = json.loads((away / "wheel.json").read_text())
    checkout = json.loads((tmp_path / "checkout.json").read_text())

    assert wheel["totals"] == checkout["totals"]
    assert wheel["totals"]["pass"] > 50 and wheel["totals"]["fail"] == wheel["totals"]["error"] == 0
    # The packaged ledger was found and applied: the same entries, exercised the same way, with
    # expected deviations among the totals (ONNX's float32 attributes on float64 cases).
    assert wheel["ledger"]["path"] and Path(wheel["ledger"]["path"]).resolve().is_relative_to(venv.resolve())
    assert wheel["ledger"]["entries"] == checkout["ledger"]["entries"] and wheel["ledger"]["entries"]
    assert wheel["totals"]["xfail"] > 0
    cells = {a["name"]: {g: c["status"] for g, c in a["groups"].items()} for a in wheel["adapters"]}
    assert cells == {a["name"]: {g: c["status"] for g, c in a["groups"].items()} for a in checkout["adapters"]}
    assert len(cells) >= 3, sorted(cells)
    assert wheel["spec_version"] == checkout["spec_version"]
