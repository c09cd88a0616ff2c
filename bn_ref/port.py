"""Weight porting of LeNet-BN between PyTorch (``bn_ref.torch.lenet``) and Flax (``bn_ref.flax.LeNet``).

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
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["LAYOUT", "torch_to_flax", "flax_to_torch"]

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


def _np(value: Any) -> np.ndarray:
    """A NumPy copy (never a view: a torch buffer updated in place later must not change it)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy().copy()
    return np.array(value, copy=True)


def _has_bn(keys: Any) -> bool:
    """With BN, module 1 of the Sequential is the first BN layer; without, it is a sigmoid."""
    return any(k.startswith("1.") for k in keys)


def _torch_key(index: int, leaf: str) -> str:
    return f"{index}.{leaf}"


def torch_to_flax(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A ``bn_ref.torch.lenet`` (or ``bn="native"``) state_dict as Flax LeNet variables.

    Returns ``{"params": {...}, "batch_stats": {...}}`` (``batch_stats`` empty without BN), with
    NumPy arrays; pass it to ``bn_ref.flax.LeNet(...).apply``.

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
            raise ValueError(f"state_dict has no {key!r}: not a LeNet-BN state_dict of bn_ref.torch.lenet")
        used.add(key)
        return _np(state_dict[key])

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
                entry["count"] = np.asarray(int(_np(state_dict[nbt])), dtype=np.int32)
            else:
                entry["count"] = np.asarray(0, dtype=np.int32)
            stats[name] = entry
    extra = keys - used
    if extra:
        raise ValueError(f"state_dict has keys that are not part of LeNet-BN: {sorted(extra)}")
    return {"params": params, "batch_stats": stats}


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Flax LeNet variables (``{"params": ..., "batch_stats": ...}``) as a PyTorch state_dict.

    The result loads with ``strict=True`` into ``bn_ref.torch.lenet(bn=...)`` of the same kind
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
            raise ValueError(f"variables have no params/{name}: not a bn_ref.flax.LeNet")
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
