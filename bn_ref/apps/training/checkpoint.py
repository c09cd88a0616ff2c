"""The training checkpoint: a framework-neutral file that reading can never turn into code.

Format ``bn-ref-checkpoint``, version 1 (``docs/checkpoints.md``): a ZIP archive (stored, not
compressed) that ``numpy.load(path, allow_pickle=False)`` opens as an ``.npz``:

* ``header.json`` -- UTF-8 JSON: ``format``, ``version``, ``config`` (the run's settings),
  ``settings`` (the trajectory settings that ``--resume`` compares), ``segments`` (the settings
  in force from each epoch on), ``epoch`` (the last finished epoch), ``epochs`` (the metrics of
  every finished epoch), ``rng`` (the random state: a pure function of the seed and the next
  epoch), ``framework`` (backend and its version), and ``arrays`` (``name -> {dtype, shape}``);
* ``<name>.npy`` -- one NumPy array per entry of ``arrays``, numeric dtypes only (bool, int,
  uint, float): the model's parameters and buffers and the optimizer's state, named
  ``model/<state_dict key>`` and ``opt/state/<i>/<key>`` (PyTorch) or ``params/<layer>/<leaf>``,
  ``batch_stats/<layer>/<leaf>`` and ``opt/<path>`` (Flax).

:func:`read_checkpoint` checks the ZIP's CRCs, the header, and each array's ``.npy`` header
against the declared dtype and shape before reading its bytes; anything else -- a pickle (the
0.1 format), a truncated or bit-flipped file, a foreign ZIP, a newer version -- raises
:class:`CheckpointError` with one line naming the file and the problem. No byte of the file is
ever unpickled.
"""

from __future__ import annotations

import io
import json
import lzma
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .fileio import atomic_write_bytes

__all__ = [
    "FORMAT",
    "VERSION",
    "FILENAME",
    "LEGACY_FILENAME",
    "CheckpointError",
    "Checkpoint",
    "encode_checkpoint",
    "decode_checkpoint",
    "read_checkpoint",
    "write_checkpoint",
    "check_state_fits",
    "convert_hint",
]

FORMAT = "bn-ref-checkpoint"
VERSION = 1
FILENAME = "checkpoint.npz"
LEGACY_FILENAME = "checkpoint.pkl"
HEADER = "header.json"
_MAX_HEADER_BYTES = 64 << 20
_ZIP_MAGIC = b"PK\x03\x04"
_NUMERIC_KINDS = "biuf"
_REQUIRED = {"config": dict, "settings": dict, "segments": list, "epoch": int, "epochs": list, "rng": dict, "arrays": dict}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: its header (JSON) and its arrays by name."""

    path: Path
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def epoch(self) -> int:
        return int(self.header["epoch"])


def convert_hint(path: Path | str) -> str:
    return (
        f"{path}: a pickle file (the bn-ref 0.1 checkpoint format), which bn-ref does not load because "
        "unpickling can run any code the file holds; if you wrote it yourself, convert it once with "
        f"`bn-ref convert-checkpoint --trust-pickle {path} NEW.npz`"
    )


def encode_checkpoint(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """The checkpoint file's bytes: ``header`` (JSON values; ``format``, ``version`` and
    ``arrays`` are filled in) and ``arrays`` (numeric NumPy arrays by name)."""
    full = dict(header)
    specs: dict[str, dict[str, Any]] = {}
    blobs: list[tuple[str, bytes]] = []
    for name, value in arrays.items():
        _check_name(name)
        a = np.asarray(value)
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
            a = a.copy(order="C")
        if a.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"checkpoint array {name!r}: dtype {a.dtype} is not numeric (bool, int, uint or float)")
        buf = io.BytesIO()
        np.lib.format.write_array(buf, a, allow_pickle=False)
        specs[name] = {"dtype": a.dtype.str, "shape": list(a.shape)}
        blobs.append((f"{name}.npy", buf.getvalue()))
    full.update(format=FORMAT, version=VERSION, arrays=specs)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for member, payload in [(HEADER, json.dumps(full, indent=1, allow_nan=True).encode())] + blobs:
            info = zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible bytes
            zf.writestr(info, payload)
    return out.getvalue()


def write_checkpoint(path: Path, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Encode and write atomically (a reader sees the previous checkpoint or this one)."""
    atomic_write_bytes(Path(path), encode_checkpoint(header, arrays))


def read_checkpoint(path: Path | str) -> Checkpoint:
    """Read and verify a checkpoint. Raises :class:`CheckpointError` (one line) on any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return decode_checkpoint(raw, path)


def decode_checkpoint(raw: bytes, path: Path | str = "<bytes>") -> Checkpoint:
    """:func:`read_checkpoint` on bytes already read (``path`` names them in messages)."""
    if not raw:
        raise CheckpointError(f"{path}: empty file, not a bn-ref checkpoint")
    if not raw.startswith(_ZIP_MAGIC):
        if raw[:1] == b"\x80":
            raise CheckpointError(convert_hint(path))
        raise CheckpointError(f"{path}: not a bn-ref checkpoint (not a ZIP/.npz archive)")
    try:
        header, arrays = _decode(raw, path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError, TypeError, IndexError,
            NotImplementedError, RuntimeError, struct.error, OverflowError, MemoryError, zlib.error, lzma.LZMAError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {detail[:200]})") from None
    return Checkpoint(Path(path), header, arrays)


def _check_name(name: str) -> None:
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise ValueError(f"checkpoint array name {name!r} is not a relative path of non-empty parts")


def _decode(raw: bytes, path: Path | str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        members = {info.filename: info for info in zf.infolist()}
        if HEADER not in members:
            what = "a torch.save file" if any(m.endswith("data.pkl") for m in members) else "a ZIP/.npz archive"
            raise CheckpointError(f"{path}: {what} without {HEADER}, not a bn-ref checkpoint")
        if members[HEADER].file_size > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: {HEADER} is {members[HEADER].file_size} bytes, too large for a checkpoint header")
        header = json.loads(zf.read(HEADER).decode("utf-8"))
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            found = header.get("format") if isinstance(header, dict) else None
            raise CheckpointError(f"{path}: not a bn-ref checkpoint ({HEADER} has format {found!r}, expected {FORMAT!r})")
        version = header.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CheckpointError(f"{path}: bad format version {version!r} in {HEADER}")
        if version > VERSION:
            raise CheckpointError(
                f"{path}: written in checkpoint format version {version} by a newer bn-ref; this bn-ref reads "
                f"version {VERSION} (upgrade bn-ref)"
            )
        for key, kind in _REQUIRED.items():
            value = header.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise CheckpointError(f"{path}: {HEADER} field {key!r} is missing or not a {kind.__name__}")
        if header["epoch"] < 0 or len(header["epochs"]) != header["epoch"]:
            raise CheckpointError(f"{path}: {HEADER} says epoch {header['epoch']} but holds {len(header['epochs'])} epochs of metrics")
        if not all(isinstance(e, dict) for e in header["epochs"]) or not all(
            isinstance(s, dict) and isinstance(s.get("first_epoch"), int) and isinstance(s.get("settings"), dict)
            for s in header["segments"]
        ):
            raise CheckpointError(f"{path}: {HEADER} has malformed 'epochs' or 'segments'")
        expected = {HEADER} | {f"{name}.npy" for name in header["arrays"]}
        if set(members) != expected:
            extra, missing = sorted(set(members) - expected), sorted(expected - set(members))
            raise CheckpointError(f"{path}: archive members do not match {HEADER} (missing {missing}, unexpected {extra})")
        arrays = {name: _read_array(zf, name, spec, path) for name, spec in header["arrays"].items()}
    return header, arrays


def _read_array(zf: zipfile.ZipFile, name: str, spec: Any, path: Path | str) -> np.ndarray:
    if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)):
        raise CheckpointError(f"{path}: {HEADER} entry for array {name!r} is malformed")
    dtype = np.dtype(spec["dtype"])
    shape = tuple(spec["shape"])
    if dtype.kind not in _NUMERIC_KINDS or dtype.hasobject or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: array {name!r} declares dtype {spec['dtype']} shape {spec['shape']}; only numeric arrays are allowed")
    member = zf.getinfo(f"{name}.npy")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if member.file_size > nbytes + 4096:
        raise CheckpointError(f"{path}: array {name!r} is {member.file_size} bytes, more than its declared shape needs")
    blob = io.BytesIO(zf.read(member))  # the ZIP's CRC-32 is checked here
    major, _ = np.lib.format.read_magic(blob)
    if major == 1:
        npy_shape, fortran, npy_dtype = np.lib.format.read_array_header_1_0(blob)
    elif major == 2:
        npy_shape, fortran, npy_dtype = np.lib.format.read_array_header_2_0(blob)
    else:
        raise CheckpointError(f"{path}: array {name!r} has an unsupported .npy version {major}")
    if npy_dtype != dtype or tuple(npy_shape) != shape or fortran:
        raise CheckpointError(
            f"{path}: array {name!r} is {npy_dtype} {tuple(npy_shape)} but {HEADER} declares {dtype} {shape}"
        )
    data = blob.read()
    if len(data) != nbytes:
        raise CheckpointError(f"{path}: array {name!r} holds {len(data)} bytes, expected {nbytes}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def check_state_fits(template: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray], path: Path | str) -> None:
    """Raise :class:`CheckpointError` unless ``arrays`` has exactly ``template``'s names, shapes and dtypes."""
    missing, extra = sorted(set(template) - set(arrays)), sorted(set(arrays) - set(template))
    problems = []
    if missing:
        problems.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    for name in sorted(set(template) & set(arrays)):
        t, a = np.asarray(template[name]), arrays[name]
        if t.shape != a.shape or t.dtype != a.dtype:
            problems.append(f"{name} is {a.dtype} {a.shape}, the model needs {t.dtype} {t.shape}")
            break
    if problems:
        raise CheckpointError(f"{path}: does not fit this model: {'; '.join(problems)}")
