"""Writing outputs: atomic file writes, and the rule that only ``--out`` is ever created.

No bn-ref command creates a folder the user did not name: :func:`atomic_write_bytes` requires the
parent folder to exist (:class:`OutputError` otherwise), and :func:`make_out_dir` creates the
training ``--out`` folder (with its parents: the one folder the user names for outputs).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["OutputError", "atomic_write_bytes", "check_output_path", "make_out_dir"]


class OutputError(ValueError):
    """An output path that cannot be written (its folder is missing, or it is a folder)."""


def check_output_path(path: Path) -> None:
    """Raise :class:`OutputError` unless ``path`` can be written as a file in an existing folder."""
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: the folder {parent} does not exist (create it first; bn-ref creates only --out folders)")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, not a file")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``.

    Readers see the old content or the new, never a part. The folder must exist.
    """
    path = Path(path)
    check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_out_dir(out: Path) -> None:
    """Create the ``--out`` folder (and its parents) the user named; an existing file there is an error."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
