"""Weight porting of LeNet-BN between PyTorch (:mod:`bn_ref.apps.lenet_torch`) and Flax (:mod:`bn_ref.apps.lenet_flax`).

What changes between the two (``docs/spec.md`` §10):

* conv kernels: PyTorch ``(O, I, kh, kw)`` (OIHW) ↔ Flax ``(kh, kw, I, O)`` (HWIO);
* dense kernels: PyTorch ``(out, in)`` ↔ Flax ``(in, out)``;
* the flatten before the first dense layer: PyTorch flattens an NCHW map ``(16, 4, 4)`` in
  (c, h, w) order, Flax an NHWC map ``(4, 4, 16)`` in (h, w, c) order, so the 256 input rows of
  that kernel are permuted, not just transposed;
* BN names: ``weight``/``bias`` ↔ ``params/scale``/``params/bias``; ``running_mean``/``running_var``
  ↔ ``batch_stats/mean``/``batch_stats/var``; ``num_batches_tracked`` ↔ ``batch_stats/count``.

The running statistics are copied as they are: both models must use the same convention (a
PyTorch ``bn="native"`` model is a ``pytorch``-convention model), because converting a running
variance between the biased and unbiased conventions is not exact after more than one step
(``docs/spec.md`` §3.5). ``bn="none"`` models port too (conv and dense layers only).

Arrays come out as NumPy (Flax side) or ``torch.Tensor`` (PyTorch side) of the input dtype.
:func:`read_weights` and :func:`write_weights` are the files of ``bn-ref port`` (none is unpickled).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..porting.convert import flatten_variables, to_numpy

__all__ = ["LAYOUT", "PortFileError", "flatten_variables", "flax_to_torch", "read_weights", "torch_to_flax", "write_weights"]

# Flax submodule name -> (kind, PyTorch Sequential index with BN, index without BN)
LAYOUT: tuple[tuple[str, str, int, int | None], ...] = (
    ("conv1", "conv", 0, 0),
    ("bn1", "bn", 1, None),
    ("conv2", "conv", 4, 3),
    ("bn2", "bn", 5, None),
    ("dense1", "dense_flatten", 9, 7),
    ("bn3", "bn", 10, None),
    ("dense2", "dense", 12, 9),
    ("bn4", "bn", 13, None),
    ("dense3", "dense", 15, 11),
)
_FLAT = (16, 4, 4)  # the (C, H, W) map flattened before dense1




def _has_bn(keys: Any) -> bool:
    """With BN, module 1 of the Sequential is the first BN layer; without, it is a sigmoid."""
    return any(k.startswith("1.") for k in keys)


def _torch_key(index: int, leaf: str) -> str:
    return f"{index}.{leaf}"


def torch_to_flax(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A :func:`bn_ref.apps.lenet_torch.lenet` (or ``bn="native"``) state_dict as Flax LeNet variables.

    Returns ``{"params": {...}, "batch_stats": {...}}`` (``batch_stats`` empty without BN), with
    NumPy arrays; pass it to ``bn_ref.apps.lenet_flax.LeNet(...).apply``.

    Raises:
        ValueError: the state_dict does not have the LeNet-BN layout (a missing or extra key, or
            a wrong shape).
    """
    keys = set(state_dict)
    with_bn = _has_bn(keys)
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    used: set[str] = set()

    def take(index: int, leaf: str) -> np.ndarray:
        key = _torch_key(index, leaf)
        if key not in state_dict:
            raise ValueError(f"state_dict has no {key!r}: not a LeNet-BN state_dict of bn_ref.apps.lenet_torch.lenet")
        used.add(key)
        return to_numpy(state_dict[key])

    for name, kind, idx_bn, idx_plain in LAYOUT:
        index = idx_bn if with_bn else idx_plain
        if index is None:
            continue
        if kind == "conv":
            w = take(index, "weight")
            params[name] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)), "bias": take(index, "bias")}
        elif kind in ("dense", "dense_flatten"):
            w = take(index, "weight")  # (out, in)
            if kind == "dense_flatten":
                c, h, wd = _FLAT
                if w.shape[1] != c * h * wd:
                    raise ValueError(f"{_torch_key(index, 'weight')} has shape {w.shape}; expected (120, {c * h * wd})")
                # rows of the Flax kernel are in (h, w, c) order, PyTorch's columns in (c, h, w) order
                w = w.reshape(w.shape[0], c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, w.shape[0])
            else:
                w = w.T
            params[name] = {"kernel": np.ascontiguousarray(w), "bias": take(index, "bias")}
        else:
            params[name] = {"scale": take(index, "weight"), "bias": take(index, "bias")}
            entry = {"mean": take(index, "running_mean"), "var": take(index, "running_var")}
            nbt = _torch_key(index, "num_batches_tracked")
            if nbt in state_dict:
                used.add(nbt)
                entry["count"] = np.asarray(int(to_numpy(state_dict[nbt])), dtype=np.int32)
            else:
                entry["count"] = np.asarray(0, dtype=np.int32)
            stats[name] = entry
    extra = keys - used
    if extra:
        raise ValueError(f"state_dict has keys that are not part of LeNet-BN: {sorted(extra)}")
    return {"params": params, "batch_stats": stats}


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Flax LeNet variables (``{"params": ..., "batch_stats": ...}``) as a PyTorch state_dict.

    The result loads with ``strict=True`` into ``bn_ref.apps.lenet_torch.lenet(bn=...)`` of the same kind
    (and into ``bn="native"`` when the convention is ``pytorch``). A Flax-native BN without a
    ``count`` gives ``num_batches_tracked = 0``.
    """
    import torch

    params = variables.get("params", variables)
    stats = variables.get("batch_stats", {}) or {}
    with_bn = "bn1" in params
    out: dict[str, Any] = {}

    def tensor(a: Any) -> "torch.Tensor":
        arr = np.asarray(a)
        if arr.dtype.name == "bfloat16":
            return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(np.array(arr))

    for name, kind, idx_bn, idx_plain in LAYOUT:
        index = idx_bn if with_bn else idx_plain
        if index is None:
            continue
        if name not in params:
            raise ValueError(f"variables have no params/{name}: not a bn_ref.apps.lenet_flax.LeNet")
        p = params[name]
        if kind == "conv":
            out[_torch_key(index, "weight")] = tensor(np.asarray(p["kernel"]).transpose(3, 2, 0, 1))
            out[_torch_key(index, "bias")] = tensor(p["bias"])
        elif kind in ("dense", "dense_flatten"):
            k = np.asarray(p["kernel"])  # (in, out)
            if kind == "dense_flatten":
                c, h, wd = _FLAT
                k = k.reshape(h, wd, c, k.shape[1]).transpose(3, 2, 0, 1).reshape(k.shape[1], c * h * wd)
            else:
                k = k.T
            out[_torch_key(index, "weight")] = tensor(k)
            out[_torch_key(index, "bias")] = tensor(p["bias"])
        else:
            s = stats.get(name)
            if s is None:
                raise ValueError(f"variables have no batch_stats/{name}")
            out[_torch_key(index, "weight")] = tensor(p["scale"])
            out[_torch_key(index, "bias")] = tensor(p["bias"])
            out[_torch_key(index, "running_mean")] = tensor(s["mean"])
            out[_torch_key(index, "running_var")] = tensor(s["var"])
            count = int(np.asarray(s["count"])) if "count" in s else 0
            out[_torch_key(index, "num_batches_tracked")] = torch.tensor(count, dtype=torch.long)
    return out


# -- files -------------------------------------------------------------------------------------
#
# What ``bn-ref port`` reads and writes. Nothing here unpickles a file of unknown origin: a bn-ref
# checkpoint and a .npz are read with NumPy's pickle-free reader; a torch.save file only through
# ``torch.load(weights_only=True)``, PyTorch's loader that admits tensors and plain containers
# and refuses anything else; a raw pickle stream (a 0.1 checkpoint, a pickled Flax dict) is refused.


class PortFileError(ValueError):
    """A weights file ``bn-ref port`` cannot use (one line naming the file and the problem)."""


_ZIP_MAGIC = b"PK\x03\x04"


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PortFileError(f"array name {name!r} clashes with another array")
        node[leaf] = value
    return tree


def _from_flat(flat: Mapping[str, np.ndarray], backend: str, path: Any) -> Any:
    if backend == "torch":
        if flat and all(k.startswith("model/") for k in flat):
            return {k[len("model/"):]: v for k, v in flat.items()}
        return dict(flat)
    variables = _unflatten({k: v for k, v in flat.items() if k.split("/", 1)[0] in ("params", "batch_stats")})
    if "params" not in variables:
        raise PortFileError(f"{path}: no params/... arrays: not Flax LeNet variables")
    variables.setdefault("batch_stats", {})
    return variables


def read_weights(path: Any, backend: str) -> Any:
    """The weights in ``path`` for ``backend``: a state_dict (torch) or ``{"params", "batch_stats"}`` (flax).

    Accepts a ``bn-ref train`` checkpoint (``checkpoint.npz``) of that backend, a ``.npz`` of
    arrays (state_dict keys, or ``params/...``/``batch_stats/...`` names as :func:`write_weights`
    writes them), and for torch a ``torch.save`` file (read with ``weights_only=True``).

    Raises:
        PortFileError: anything else, with one line naming the file.
    """
    import io
    import struct
    import zipfile
    import zlib
    from pathlib import Path

    from .training.checkpoint import CheckpointError, convert_hint, decode_checkpoint

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PortFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise PortFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not raw.startswith(_ZIP_MAGIC):
        if raw[:1] == b"\x80":
            raise PortFileError(
                convert_hint(path) + " (a pickled Flax dict: save it with numpy.savez as params/... and "
                "batch_stats/... arrays instead)"
            )
        raise PortFileError(f"{path}: not a bn-ref checkpoint, .npz or torch.save file")
    broken = (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError, RuntimeError, struct.error,
              zlib.error, MemoryError)
    try:
        names = zipfile.ZipFile(io.BytesIO(raw)).namelist()
    except broken as exc:
        raise PortFileError(f"{path}: corrupt or truncated archive ({exc})") from None
    if "header.json" in names:
        try:
            ckpt = decode_checkpoint(raw, path)
        except CheckpointError as exc:
            raise PortFileError(str(exc)) from None
        written_by = ckpt.header["config"].get("backend")
        if written_by != backend:
            raise PortFileError(f"{path} was written by a {written_by} run, not {backend}")
        return _from_flat(ckpt.arrays, backend, path)
    if any(n.endswith("data.pkl") for n in names):
        if backend != "torch":
            raise PortFileError(f"{path}: a torch.save file; use --from torch")
        import torch

        try:
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files; all are one line here
            detail = " ".join(str(exc).split())[:200]
            raise PortFileError(f"{path}: torch.load(weights_only=True) refused it ({type(exc).__name__}: {detail})") from None
        if not (isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())):
            raise PortFileError(f"{path}: a torch.save file that is not a state_dict of tensors")
        return dict(obj)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except broken as exc:
        raise PortFileError(f"{path}: unreadable .npz ({' '.join(str(exc).split())[:200]})") from None
    if not flat:
        raise PortFileError(f"{path}: an empty .npz")
    return _from_flat(flat, backend, path)


def write_weights(path: Any, backend: str, weights: Any) -> None:
    """Write ported weights atomically: flax -> ``.npz`` (``params/...``, ``batch_stats/...``);
    torch -> ``torch.save`` of the state_dict. The folder must exist (nothing is created)."""
    import io
    from pathlib import Path

    from .training.fileio import atomic_write_bytes

    buf = io.BytesIO()
    if backend == "flax":
        np.savez(buf, **flatten_variables(weights))
    else:
        import torch

        torch.save(weights, buf)
    atomic_write_bytes(Path(path), buf.getvalue())
