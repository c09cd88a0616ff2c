"""The data a run trains on, and how it is cut: the epoch shuffle and the data-parallel shards."""

from __future__ import annotations

import numpy as np

from .. import data as data_mod
from .config import TrainConfig

__all__ = ["Arrays", "as_float", "epoch_permutation", "load_raw", "shard_bounds"]

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(train images, train labels, test images, test labels)."""


def load_raw(config: TrainConfig) -> tuple[Arrays, data_mod.FashionMNIST]:
    """uint8 arrays cut to ``config``'s limits, and the dataset record (files used, their MD5s).

    Raises:
        DataError: missing or corrupt data (nothing has been written).
    """
    ds = data_mod.load_fashion_mnist(config.data_dir)
    xtr, ytr, xte, yte = ds.train_images, ds.train_labels, ds.test_images, ds.test_labels
    if config.limit_train:
        xtr, ytr = xtr[: config.limit_train], ytr[: config.limit_train]
    if config.limit_test:
        xte, yte = xte[: config.limit_test], yte[: config.limit_test]
    return (xtr, ytr, xte, yte), ds


def as_float(raw: Arrays) -> Arrays:
    """Images to float32 in [0, 1] (:func:`bn_ref.apps.data.to_float`), labels to int32."""
    xtr, ytr, xte, yte = raw
    return data_mod.to_float(xtr), ytr.astype(np.int32), data_mod.to_float(xte), yte.astype(np.int32)


def shard_bounds(batch: int, nshards: int, shard: int) -> tuple[int, int]:
    """``[lo, hi)`` of shard ``shard`` of a global batch of ``batch`` samples split ``nshards`` ways.

    Contiguous shards of ``ceil(batch / nshards)`` samples; the last ones shorter or empty.
    """
    size = -(-batch // nshards)
    return min(shard * size, batch), min((shard + 1) * size, batch)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffle of epoch ``epoch`` (1-based): a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)
