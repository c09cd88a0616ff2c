"""Shared pytest set-up. Framework-specific fixtures live in the test modules that need them.

* JAX gets 4 host CPU devices (for the cross-device tests); this must happen before JAX starts.
* Hypothesis is derandomized: every run draws the same examples, so CI is reproducible.
* ``x64``: JAX's float64 mode for one test or, with ``pytestmark = pytest.mark.usefixtures("x64")``,
  one module; the previous setting comes back afterwards. Nothing in bn-ref turns it on at import
  (the conformance adapters enable it only inside their runs), so a module without the fixture
  runs in JAX's default 32-bit mode.
"""

from __future__ import annotations

import os

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("KERAS_BACKEND", "jax")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "bn_ref",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("BN_REF_HYPOTHESIS_PROFILE", "bn_ref"))


@pytest.fixture
def x64():
    """``jax_enable_x64`` on for the test, restored afterwards."""
    import jax

    with jax.enable_x64(True):
        yield


# -- conformance harness helpers (tests/test_conformance*.py) -------------------------------------
# Kept apart from the framework fixtures above.

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent


def _conformance_cli(*args: str, env_extra: dict[str, str] | None = None, timeout: float = 240,
                     python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``python -m bn_ref.conformance ARGS`` from the repository root, tests/ importable (broken_adapters)."""
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *python_flags, "-m", "bn_ref.conformance", *args], capture_output=True,
                          text=True, env=env, cwd=str(REPO_ROOT), timeout=timeout)


@pytest.fixture
def conformance_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the harness's command line in a subprocess (see :func:`_conformance_cli`)."""
    return _conformance_cli


@pytest.fixture
def bad_checks() -> Callable[[Any], list[Any]]:
    """The unexpected failures and errors of an engine ``AdapterResult``."""
    return lambda res: [c for c in res.checks if c.status in ("fail", "error")]
