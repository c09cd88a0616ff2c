"""The porting and identification tools are reachable from the two command lines, as the README says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_bn_ref_translate():
    r = _run("-m", "bn_ref", "translate", "--from", "pytorch", "--to", "flax")
    assert r.returncode == 0, r.stderr
    # PyTorch's 0.1 on the batch term is Flax's 0.9 on the running term (spec §3.5).
    assert "momentum=0.9" in r.stdout and "NOT EXACT" in r.stdout


def test_bn_ref_port_with_template_is_the_generic_porter(tmp_path):
    r = _run("-m", "bn_ref", "port", "--from", "torch", str(tmp_path / "missing.pt"), "--to", "flax",
             str(tmp_path / "out.npz"), "--template", str(tmp_path / "t.npz"))
    assert r.returncode == 2 and "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.npz").exists()


def test_conformance_identify_and_facts_subcommands():
    r = _run("-m", "bn_ref.conformance", "identify", "--help")
    assert r.returncode == 0 and "--adapter" in r.stdout
    r = _run("-m", "bn_ref.conformance", "facts", "--help")
    assert r.returncode == 0 and "--check" in r.stdout
