"""Compare two LeNet-BN training checkpoints tensor by tensor (e.g. data-parallel vs single-device).

    python benchmarks/compare_checkpoints.py runs/single/checkpoint.npz runs/ddp2/checkpoint.npz

For each parameter and running statistic it prints max|a - b| in units of the bound
``1e-5 + 1e-4 * max|b|`` used by tests/test_training_parallel.py, worst first, and the two runs'
per-epoch accuracies. Both checkpoints must come from the same backend.
"""

from __future__ import annotations

import sys

import numpy as np

from bn_ref.apps.training.checkpoint import CheckpointError, read_checkpoint


def flat_state(path: str) -> tuple[str, dict[str, np.ndarray], list[dict]]:
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        sys.exit(str(exc))
    tensors = {k: v for k, v in ckpt.arrays.items() if not k.startswith("opt/")}
    return ckpt.header["config"]["backend"], tensors, ckpt.header["epochs"]


def main(a_path: str, b_path: str) -> None:
    ba, a, ea = flat_state(a_path)
    bb, b, eb = flat_state(b_path)
    if ba != bb or a.keys() != b.keys():
        sys.exit(f"not comparable: {ba} vs {bb} checkpoints, or different layers")
    rows = []
    for key in a:
        x, y = a[key].astype(np.float64), b[key].astype(np.float64)
        bound = 1e-5 + 1e-4 * float(np.max(np.abs(y))) if y.size else 1.0
        rows.append((float(np.max(np.abs(x - y))) / bound if y.size else 0.0, key))
    for units, key in sorted(rows, reverse=True)[:8]:
        print(f"{units:8.3f} x bound  {key}")
    for ra, rb in zip(ea, eb):
        print(f"epoch {ra['epoch']}: train acc {ra['train_acc']:.4f} vs {rb['train_acc']:.4f}, "
              f"test acc {ra['test_acc']:.4f} vs {rb['test_acc']:.4f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
