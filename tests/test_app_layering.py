"""The application code (bn_ref.apps) sits on top of the core and nothing else: the core never
imports it, it imports only the core's public names, and the training package's submodules never
import back from its ``__init__`` (issue 10, item 6). Checked on the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import bn_ref

ROOT = Path(bn_ref.__file__).parent
APPS = "bn_ref.apps"
DISPATCHER = "bn_ref.__main__"  # the `bn-ref` command: dispatches to every subcommand, core and application


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import statement in ``path``."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names]))
    return found


MODULES = sorted(ROOT.rglob("*.py"))


def test_scan_sees_the_package():
    names = {_module_name(p) for p in MODULES}
    assert {"bn_ref.torch", "bn_ref.flax", "bn_ref.apps.training.loop", "bn_ref.apps.lenet_torch"} <= names
    assert len(MODULES) > 30


def test_core_never_imports_the_applications():
    offenders = [
        (_module_name(p), target)
        for p in MODULES
        if not _module_name(p).startswith(APPS) and _module_name(p) != DISPATCHER
        for target, names in _imports(p)
        if target.startswith(APPS) or (target == "bn_ref" and "apps" in names)
    ]
    assert offenders == []


def test_applications_use_only_public_core_names():
    offenders = []
    for p in MODULES:
        if not _module_name(p).startswith(APPS):
            continue
        for target, names in _imports(p):
            if not target.startswith("bn_ref") or target.startswith(APPS):
                continue
            private = [n for n in names if n.startswith("_")] + [c for c in target.split(".") if c.startswith("_")]
            if private:
                offenders.append((_module_name(p), target, private))
    assert offenders == []


def test_training_submodules_do_not_import_back_from_the_package():
    pkg = f"{APPS}.training"
    submodules = {_module_name(p).rsplit(".", 1)[1] for p in (ROOT / "apps" / "training").glob("*.py")} - {"__init__"}
    assert {"config", "loop", "checkpoint", "fileio", "batches", "plots", "progress"} <= submodules
    offenders = []
    for p in (ROOT / "apps" / "training").glob("*.py"):
        if p.name == "__init__.py":
            continue
        for target, names in _imports(p):
            if target == pkg and any(n not in submodules for n in names):
                offenders.append((p.name, names))
    assert offenders == []
