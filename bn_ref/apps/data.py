"""Fashion-MNIST from the standard IDX files, verified by the MD5 of their decompressed bytes.

Where the files are looked for:

* when a folder is given -- ``data_dir`` (the CLI's ``--data-dir``), else the ``BN_REF_DATA``
  environment variable -- that folder is the only source: the four files must be in it (or in a
  torchvision-style ``FashionMNIST/raw`` folder inside it); missing files are a
  :class:`DataError` naming the folder and the files, and nothing is downloaded;
* otherwise, in order (the first folder holding all four files wins): Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), then the user cache
  ``~/.cache/bn_ref/fashion-mnist`` (``$XDG_CACHE_HOME`` respected); when neither has them and
  ``download_missing=True``, the files are fetched from the dataset's official mirror into the
  cache, each written to a temporary file and renamed only once its checksum matches.

Each file may be plain or gzip-compressed (``name`` or ``name.gz``). Checksums are taken over the
*decompressed* content, because repackaging (Debian's, for one) rewrites gzip headers.

Arrays: images ``uint8 (N, 28, 28)``, labels ``uint8 (N,)``; :func:`to_float` scales images to
``float32`` in [0, 1] as the book's ``ToTensor`` does. :attr:`FashionMNIST.files` and
:attr:`FashionMNIST.md5` record what was read; :meth:`FashionMNIST.describe` says it in one line.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = [
    "FILES",
    "CHECKSUMS",
    "DEBIAN_DIR",
    "DEBIAN_PACKAGE",
    "MIRROR",
    "DataError",
    "FashionMNIST",
    "cache_dir",
    "candidate_dirs",
    "explicit_dir",
    "find_data_dir",
    "read_idx",
    "load_fashion_mnist",
    "download",
    "to_float",
]

FILES: Mapping[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CHECKSUMS: Mapping[str, str] = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

_IDX_DTYPES = {0x08: np.uint8}


class DataError(ValueError):
    """The data are missing, truncated or corrupt; the message says which file and how to fix it."""


@dataclass(frozen=True)
class FashionMNIST:
    """The four arrays and the folder they came from."""

    train_images: np.ndarray  # uint8 (60000, 28, 28)
    train_labels: np.ndarray  # uint8 (60000,)
    test_images: np.ndarray  # uint8 (10000, 28, 28)
    test_labels: np.ndarray  # uint8 (10000,)
    source: Path
    files: tuple[Path, ...] = ()
    """The four files read (train images, train labels, test images, test labels)."""
    md5: Mapping[str, str] = field(default_factory=dict)
    """MD5 of each file's decompressed content, by IDX name (e.g. ``train-images-idx3-ubyte``)."""
    verified: bool = False
    """True when every MD5 matched the expected checksum."""

    def describe(self) -> str:
        """One line: the files used and whether their checksums held."""
        names = ", ".join(p.name for p in self.files)
        held = "MD5 checksums of the decompressed content match" if self.verified else "checksums NOT verified"
        return f"data: {self.source}: {names} ({held})"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/bn_ref/fashion-mnist`` (default ``~/.cache/bn_ref/fashion-mnist``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bn_ref" / "fashion-mnist"


def _file_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _complete(folder: Path) -> bool:
    return all(_file_in(folder, name) is not None for name in FILES.values())


def explicit_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str] | None:
    """The folder the user named -- ``data_dir``, else ``BN_REF_DATA`` -- and how it was named; None."""
    if data_dir is not None:
        return Path(data_dir), "--data-dir"
    env = os.environ.get("BN_REF_DATA")
    if env:
        return Path(env), "BN_REF_DATA"
    return None


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched, in order (see the module docstring)."""
    named = explicit_dir(data_dir)
    if named is not None:
        return [named[0], named[0] / "FashionMNIST" / "raw"]
    return [DEBIAN_DIR, cache_dir()]


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first candidate folder that holds all four files, or None."""
    for folder in candidate_dirs(data_dir):
        if folder.is_dir() and _complete(folder):
            return folder
    return None


def _missing_in_named(folder: Path, how: str) -> DataError:
    if not folder.is_dir():
        return DataError(f"{how} {folder}: no such folder (a folder given by {how} is the only place searched)")
    missing = [name for name in FILES.values() if _file_in(folder, name) is None]
    return DataError(
        f"{how} {folder}: missing {', '.join(missing)} (each as NAME or NAME.gz; a folder given by {how} "
        "is the only place searched, and nothing is downloaded into it)"
    )


def _raw_bytes(path: Path, compressed: bool | None = None) -> bytes:
    if compressed is None:
        compressed = path.suffix == ".gz"
    try:
        if compressed:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{path}: cannot be read ({exc.__class__.__name__}: {exc}); the file is truncated or corrupt. "
            f"Delete it and run again to download a fresh copy into {cache_dir()}, or reinstall the "
            f"Debian package {DEBIAN_PACKAGE}."
        ) from exc


def read_idx(path: str | os.PathLike, *, md5: str | None = None, compressed: bool | None = None) -> np.ndarray:
    """Read one IDX file, checking its header, length and, if given, the MD5 of its decompressed
    bytes. ``compressed=None`` decides gzip by the ``.gz`` suffix. Raises :class:`DataError`
    naming the file on any mismatch."""
    return _read_idx(path, md5=md5, compressed=compressed)[0]


def _read_idx(path: str | os.PathLike, *, md5: str | None = None, compressed: bool | None = None) -> tuple[np.ndarray, str]:
    """:func:`read_idx` and the MD5 of the decompressed bytes."""
    path = Path(path)
    raw = _raw_bytes(path, compressed)
    digest = hashlib.md5(raw).hexdigest()
    hint = (
        f"Delete it and run again to download a fresh copy into {cache_dir()}, or reinstall the "
        f"Debian package {DEBIAN_PACKAGE}."
    )
    if md5 is not None:
        if digest != md5:
            raise DataError(
                f"{path}: MD5 of the decompressed content is {digest}, expected {md5} "
                f"({len(raw)} bytes; the file is truncated or corrupt). {hint}"
            )
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number). {hint}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header. {hint}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims)) if dims else 0
    if len(raw) != header + size:
        raise DataError(
            f"{path}: IDX header announces {dims} = {size} bytes of data but the file holds "
            f"{len(raw) - header}; it is truncated or corrupt. {hint}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy(), digest


def _progress(done: int, total: int, name: str) -> None:
    if total > 0:
        frac = done / total
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r  {name}: [{bar:<30}] {100 * frac:5.1f}% of {total / 1e6:.1f} MB")
    else:
        sys.stderr.write(f"\r  {name}: {done / 1e6:.1f} MB")
    sys.stderr.flush()


def download(dest: str | os.PathLike | None = None, *, mirror: str = MIRROR, checksums: Mapping[str, str] | None = None) -> Path:
    """Fetch the four ``.gz`` files into ``dest`` (default: the cache) with a progress bar.

    Each file goes to a temporary file in ``dest`` and is renamed into place only after the MD5
    of its decompressed content matches. Files already present and valid are kept.
    """
    checksums = CHECKSUMS if checksums is None else checksums
    dest = Path(dest) if dest is not None else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        target = dest / f"{name}.gz"
        if target.is_file():
            try:
                read_idx(target, md5=checksums.get(name))
                continue
            except DataError:
                target.unlink()
        url = mirror.rstrip("/") + f"/{name}.gz"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                total = int(resp.headers.get("Content-Length") or 0)
                done = 0
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    out.write(chunk)
                    done += len(chunk)
                    _progress(done, total, name)
            sys.stderr.write("\n")
            read_idx(tmp, md5=checksums.get(name), compressed=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
    return dest


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download_missing: bool = True,
    checksums: Mapping[str, str] | None = None,
    verify: bool = True,
) -> FashionMNIST:
    """Find (or download), verify and read Fashion-MNIST.

    Args:
        data_dir: an explicit folder, the only one searched; None uses ``BN_REF_DATA`` (likewise
            the only one searched when set), else the standard places.
        download_missing: fetch the files into the cache when no standard place has them (never
            when a folder is named).
        checksums: expected MD5 of each decompressed file by name; None means the official
            ones (:data:`CHECKSUMS`). Pass the subset's own for a subset of the data.
        verify: False skips the MD5 check (the IDX header and length are still checked).

    Raises:
        DataError: a named folder lacks files (the message names the folder and the files); no
            data and no download possible (the message names the Debian package and the cache
            path); a truncated/corrupt file (the message names it).
    """
    checksums = CHECKSUMS if checksums is None else checksums
    folder = find_data_dir(data_dir)
    named = explicit_dir(data_dir)
    if folder is None and named is not None:
        raise _missing_in_named(*named)
    if folder is None:
        searched = ", ".join(str(d) for d in candidate_dirs(data_dir))
        if not download_missing:
            raise DataError(
                f"Fashion-MNIST not found (searched: {searched}). Install the Debian package "
                f"{DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}), or put the four IDX files in "
                f"{cache_dir()} or a folder given by --data-dir / BN_REF_DATA."
            )
        try:
            folder = download(checksums=checksums)
        except OSError as exc:
            raise DataError(
                f"Fashion-MNIST not found (searched: {searched}) and the download failed ({exc}). "
                f"Install the Debian package {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}), or put "
                f"the four IDX files in {cache_dir()}."
            ) from exc
    arrays, files, digests = {}, [], {}
    for key, name in FILES.items():
        path = _file_in(folder, name)
        assert path is not None
        arrays[key], digests[name] = _read_idx(path, md5=checksums.get(name) if verify else None)
        files.append(path)
    verified = verify and all(checksums.get(name) == digests[name] for name in FILES.values())
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{folder}: {split} images {images.shape} and labels {labels.shape} do not pair up "
                "(expected (N, 28, 28) and (N,))"
            )
    return FashionMNIST(source=folder, files=tuple(files), md5=digests, verified=verified, **arrays)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images to float32 in [0, 1] (the book's ``ToTensor`` scaling), shape unchanged."""
    return images.astype(np.float32) / np.float32(255.0)
