"""Throughput of the LeNet-BN training loop (images/s), both backends, ``--bn ref`` vs ``native``.

Measures the training loop of :mod:`bn_ref.apps.training` itself (data resident on the device, metrics
on the device, one host read per epoch) on synthetic Fashion-MNIST-shaped data, so it runs
anywhere; the figure is the steady state after ``--warmup`` epochs (compilation excluded).

    python benchmarks/lenet_throughput.py --device cuda --batch-sizes 256 4096 --json out.json

Results go to docs/results.md with the card they were measured on. Not a test: nothing here is
asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from bn_ref.apps.training import TrainConfig, epoch_permutation


def measure(backend: str, bn: str, batch_size: int, device: str, images: int, epochs: int, warmup: int) -> dict:
    cfg = TrainConfig(backend=backend, bn=bn, batch_size=batch_size, device=device, progress=False, lr=0.1)
    if backend == "torch":
        from bn_ref.apps.training.torch_backend import Trainer
    else:
        from bn_ref.apps.training.flax_backend import Trainer
    rng = np.random.default_rng(0)
    xtr = rng.random((images, 28, 28), dtype=np.float32)
    ytr = rng.integers(0, 10, images).astype(np.int32)
    trainer = Trainer(cfg)
    trainer.setup(xtr, ytr, xtr[:1000], ytr[:1000])
    times = []
    for epoch in range(1, warmup + epochs + 1):
        perm = epoch_permutation(0, epoch, images)
        t0 = time.perf_counter()
        trainer.train_epoch(perm, lambda done: None)  # returns host floats: the epoch is finished
        if epoch > warmup:
            times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "backend": backend,
        "bn": bn,
        "batch_size": batch_size,
        "device": trainer.device_name,
        "images": images,
        "epoch_seconds_best": best,
        "epoch_seconds_median": float(np.median(times)),
        "images_per_s": images / best,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["torch", "flax"])
    ap.add_argument("--bn", nargs="+", default=["ref", "native"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 4096])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for backend in args.backends:
        for bn in args.bn:
            for bs in args.batch_sizes:
                row = measure(backend, bn, bs, args.device, args.images, args.epochs, args.warmup)
                rows.append(row)
                print(f"{backend:5s} bn={bn:6s} batch {bs:5d}  {row['images_per_s']:>12,.0f} images/s  "
                      f"({row['epoch_seconds_best']:.3f} s/epoch) on {row['device']}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"host": platform.node(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
