"""``bn-ref convert-checkpoint``: a bn-ref 0.1 pickle checkpoint to the current format.

The one place bn-ref unpickles a file, and only when the user passes ``--trust-pickle``: a 0.1
``checkpoint.pkl`` is ``{"config", "epoch", "epochs", "state"}`` with ``state`` holding the torch
``{"model": state_dict, "opt": optimizer state_dict}`` or the Flax ``{"params", "stats", "opt"}``.
The new checkpoint records no data checksums (0.1 did not keep them), so ``--resume`` cannot
compare the data and says so.
"""

from __future__ import annotations

import pickle
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CheckpointError, write_checkpoint
from .config import TrainConfig, trajectory_settings

__all__ = ["convert_legacy"]


def _torch_arrays(state: dict[str, Any]) -> dict[str, np.ndarray]:
    arrays = {f"model/{k}": v.detach().cpu().numpy().copy() for k, v in state["model"].items()}
    for index, entry in state["opt"].get("state", {}).items():
        for key, value in entry.items():
            if hasattr(value, "detach"):
                arrays[f"opt/state/{index}/{key}"] = value.detach().cpu().numpy().copy()
    return arrays


def _flax_arrays(state: dict[str, Any]) -> dict[str, np.ndarray]:
    from .flax_backend import tree_arrays

    return {**tree_arrays("params", state["params"]), **tree_arrays("batch_stats", state["stats"]), **tree_arrays("opt", state["opt"])}


def convert_legacy(old: Path, new: Path) -> int:
    """Unpickle ``old`` (trusted by the caller), write ``new``; returns the checkpoint's epoch.

    Raises:
        CheckpointError: ``old`` is missing, not a pickle, or not a 0.1 checkpoint (one line).
    """
    try:
        raw = old.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{old}: cannot be read ({exc.strerror or exc})") from None
    if raw.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{old}: a ZIP archive (already the current format?), not a 0.1 pickle checkpoint")
    try:
        obj = pickle.loads(raw)  # trusted by the user's explicit --trust-pickle
        config_in, epoch, epochs, state = obj["config"], obj["epoch"], obj["epochs"], obj["state"]
        backend = config_in["backend"]
        arrays = _torch_arrays(state) if backend == "torch" else _flax_arrays(state)
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign pickle is one line
        raise CheckpointError(f"{old}: not a bn-ref 0.1 checkpoint ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in config_in.items() if k in names})
    settings = trajectory_settings(config, None)
    header = {
        "config": config.as_json(),
        "settings": settings,
        "segments": [{"first_epoch": 1, "settings": settings}],
        "epoch": int(epoch),
        "epochs": list(epochs),
        "rng": {
            "scheme": "epoch e shuffles with numpy.random.default_rng([seed, e]); initial weights from seed",
            "seed": config.seed,
            "next_epoch": int(epoch) + 1,
        },
        "framework": {"backend": backend, "converted_from": str(old)},
    }
    write_checkpoint(new, header, arrays)
    return int(epoch)
