"""``curves.png``: loss and accuracies per epoch, readable for one epoch and for many."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["curves_figure", "plot_curves"]


def plot_curves(epochs: Sequence[dict[str, Any]], path: Path, title: str, *, changes: Sequence[int] = ()) -> bool:
    """Write the curves as a PNG (atomically); False when matplotlib is missing.

    Training loss on the left axis, train and test accuracy on the right one (0 to 1); integer
    epoch ticks; ``changes`` marks the epochs from which a resumed run changed its settings.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = curves_figure(epochs, title, changes=changes)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return True


def curves_figure(epochs: Sequence[dict[str, Any]], title: str, *, changes: Sequence[int] = ()) -> Any:
    """The matplotlib figure :func:`plot_curves` saves (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [e["epoch"] for e in epochs]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    acc = ax.twinx()
    lines = ax.plot(xs, [e["train_loss"] for e in epochs], "o-", color="C0", label="train loss")
    lines += acc.plot(xs, [e["train_acc"] for e in epochs], "s--", color="C1", label="train accuracy")
    lines += acc.plot(xs, [e["test_acc"] for e in epochs], "^-.", color="C2", label="test accuracy")
    for epoch in changes:
        ax.axvline(epoch - 0.5, color="0.5", linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    acc.set_ylabel("accuracy")
    acc.set_ylim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    if len(xs) <= 10:
        ax.set_xticks(xs)  # every epoch
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
    if xs:
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    fig.tight_layout()
    return fig
