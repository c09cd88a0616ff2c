"""The docstring examples of bn_ref run as tests (issue 10, item 7).

Every module whose source holds a ``>>>`` example is found by reading the files (nothing is
imported at collection, so no optional framework loads there); a module under ``bn_ref/torch`` or
``bn_ref/jax``/``bn_ref/flax`` runs only where its framework is installed.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bn_ref"
NEEDS = {"torch": "torch", "jax": "jax", "flax": "flax"}  # first folder under bn_ref -> framework


def _modules_with_examples() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>>" not in path.read_text(encoding="utf-8"):
            continue
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append(".".join(parts))
    return found


MODULES = _modules_with_examples()
# Asserted, so that the parametrization cannot silently shrink to nothing.
assert {"bn_ref.conventions", "bn_ref.conformance.report", "bn_ref.conformance.cli", "bn_ref.conformance.explain",
        "bn_ref.conformance.adapters"} <= set(MODULES), MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in NEEDS:
        pytest.importorskip(NEEDS[parts[1]])
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{name}: no example ran"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (output above)"
