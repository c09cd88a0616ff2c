"""Task runner: ``nox -s conformance`` (the main job), ``nox -s tests``, ``nox -s lint``.

Every session installs the package with its extras into a fresh virtual environment; the
constraints file pins the PyTorch CPU build used in CI (see .ci/constraints.txt).
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "conformance", "lint"]
nox.options.reuse_existing_virtualenvs = True

HERE = os.path.dirname(os.path.abspath(__file__))
CONSTRAINTS = os.path.join(HERE, ".ci", "constraints.txt")
EXTRAS = ".[torch,jax,train,frameworks,dev]"


def _install(session: nox.Session) -> None:
    session.install("-c", CONSTRAINTS, "-e", EXTRAS)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU; CUDA tests run where a GPU is present)."""
    _install(session)
    session.run("python", "-m", "pytest", "-n", os.environ.get("BN_REF_TEST_WORKERS", "2"), *session.posargs)


def _split_only(posargs: list[str]) -> tuple[list[str], list[str]]:
    """``--only NAME[,NAME]`` (repeatable) picks families; every other argument goes to the harness."""
    only, rest, it = [], [], iter(posargs)
    for a in it:
        if a == "--only":
            only.append(next(it, ""))
        elif a.startswith("--only="):
            only.append(a.split("=", 1)[1])
        else:
            rest.append(a)
    return only, rest


@nox.session
def conformance(session: nox.Session) -> None:
    """Check every BN implementation against the oracle and publish the matrix.

    Each framework family (bn_ref/conformance/families.py) runs in its own virtual environment
    (built under .nox/family-NAME on first use, reused afterwards) and process; the family reports
    (conformance/families/NAME.json) are merged into conformance/report.json and
    docs/conformance.md. Each family's §9 fact probes run in the same venv; their rows are committed as
    conformance/facts/NAME.json and the table of docs/spec.md §9 is rewritten from them (a new
    framework version shows up as a diff). ``nox -s conformance -- --only tensorflow`` runs one family (its report
    stays in conformance/families/; the published matrix is only written by a full run). Other
    arguments go to the harness (e.g. ``-- -k rank4``).
    """
    _install(session)
    only, harness = _split_only(list(session.posargs))
    out = os.path.join("conformance", "families")
    # Two families at a time: each is one mostly single-threaded process (the CI machine has 2 cores).
    session.run("python", "-m", "bn_ref.conformance.families", "run", *only, "--out", out,
                "--envs", os.path.join(HERE, ".nox"), "--jobs", str(min(2, os.cpu_count() or 1)),
                *[f"--harness-arg={a}" for a in harness])
    merge = ["python", "-m", "bn_ref.conformance.merge", out]
    if only:
        session.run(*merge, "--families", ",".join(only), "--json", os.path.join(out, "merged-only.json"))
    else:
        session.run(*merge, "--json", os.path.join("conformance", "report.json"),
                    "--markdown", os.path.join("docs", "conformance.md"))
    # The §9 table: each family's fact probes (NAME.facts.json, run in its venv) become the committed
    # conformance/facts/NAME.json; the table is rebuilt from those and the core probes, run here.
    facts = ["python", "-m", "bn_ref.conformance", "facts", "--collect", out, "--write", os.path.join("docs", "spec.md")]
    session.run(*facts, *(["--families", ",".join(only)] if only else []))


@nox.session
def docs(session: nox.Session) -> None:
    """Build the website into build/site (bn_ref/site.py), then check it in headless Chromium.

    The browser test (tests/test_site_browser.py) needs Debian's ``chromium`` and ``chromium-driver``
    (``apt-get install chromium chromium-driver``); without them it skips and says so. Pass
    ``-- --no-check`` to only build.
    """
    session.install("-e", ".[docs]")
    session.run("python", "-m", "bn_ref.site", "build", env={"NO_MKDOCS_2_WARNING": "1"})
    if "--no-check" not in session.posargs:
        session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_site.py",
                    "tests/test_site_browser.py", env={"BN_REF_SITE_DIR": os.path.join(HERE, "build", "site")})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests and tooling; mypy over the package (config in pyproject.toml).

    mypy is strict on the core modules (conventions, _checks, oracle, tolerances) and runs the
    default checks elsewhere; the frameworks are not installed here, so their APIs type as Any.
    """
    session.install("ruff>=0.5", "mypy>=1.10", "numpy>=1.24", "hypothesis>=6.100")
    session.run("ruff", "check", "bn_ref", "tests", "noxfile.py", "benchmarks")
    session.run("mypy")
