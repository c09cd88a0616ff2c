"""torchvision's ``torchvision.ops.FrozenBatchNorm2d`` (frozen BN, ``docs/spec.md`` §15) under ``pytorch``.

``FrozenBatchNorm2d`` holds gamma, beta and the running statistics as *buffers*: it normalizes with
the running statistics in training and eval alike, never updates them, and no gradient reaches
gamma or beta -- ``Variant(frozen="all")``. The row runs the ``variant-frozen-all-*`` cases of the
``variants`` group (rank 4, channels on axis 1) and declines the rest with its reason.

Loading. torchvision's PyPI wheels are built against PyTorch's CUDA build: next to the CPU build of
the same PyTorch release (the one this project pins) ``import torchvision`` fails while registering
its compiled operators (``torchvision::nms`` does not exist, ``_C.so`` needs ``libc10_cuda.so``).
``FrozenBatchNorm2d`` itself is plain Python (``torchvision/ops/misc.py``), so when the import fails
the adapter compiles that class from the installed file -- torchvision's own code, unchanged --
with only ``_log_api_usage_once`` (a telemetry call) replaced by a no-op; the row's description
says which way it was loaded. This module runs in the ``torchvision`` family's environment
(:mod:`bn_ref.conformance.families`).
"""

from __future__ import annotations

import ast
import importlib.util
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...conventions import PRESETS
from ..cases import Case
from . import _torch_util as tu
from .base import numpy_out

__all__ = ["FrozenBNAdapter", "load_frozen_batch_norm", "factory"]


def load_frozen_batch_norm() -> tuple[type, str, str]:
    """``(FrozenBatchNorm2d, torchvision version, how it was loaded)``.

    Raises ModuleNotFoundError when torchvision is not installed at all.
    """
    try:
        import torchvision
        from torchvision.ops import FrozenBatchNorm2d

        return FrozenBatchNorm2d, str(torchvision.__version__), "imported"
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "torchvision":
            raise
        why = f"{type(exc).__name__}: {exc}"
    except (RuntimeError, OSError, ImportError) as exc:  # the compiled ops of a CUDA-built wheel
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    spec = importlib.util.find_spec("torchvision")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("torchvision", name="torchvision")
    root = Path(list(spec.submodule_search_locations)[0])
    version = _dist_version()
    path = root / "ops" / "misc.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FrozenBatchNorm2d")
    ns: dict[str, Any] = {"torch": torch, "Tensor": torch.Tensor, "__name__": "torchvision.ops.misc",
                          "_log_api_usage_once": lambda obj: None}
    ns.update({k: getattr(typing, k) for k in ("Callable", "Optional", "Union", "List", "Dict", "Tuple")})
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), ns)  # noqa: S102
    return ns["FrozenBatchNorm2d"], version, f"compiled from {path.name} of the installed wheel ({why})"


def _dist_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchvision")
    except PackageNotFoundError:
        return "?"


class FrozenBNAdapter:
    """``torchvision.ops.FrozenBatchNorm2d(C, eps=...)`` on the frozen-all variant cases (CPU)."""

    def __init__(self) -> None:
        self._cls, version, how = load_frozen_batch_norm()
        self.convention = PRESETS["pytorch"]
        self.name = "torchvision.ops.FrozenBatchNorm2d @pytorch"
        self.description = f"torchvision {version} FrozenBatchNorm2d on torch {torch.__version__} ({how})"
        self.loaded = how

    def skip(self, case: Case) -> str | None:
        if case.variant is None:
            return "FrozenBatchNorm2d is frozen BN: this row runs the variants group only (§15)"
        return None

    def variant_skip(self, case: Case) -> str | None:
        v = case.variant
        if v.frozen != "all":
            return "FrozenBatchNorm2d is frozen='all' only: gamma and beta are buffers (no gradient, no update)"
        if case.rank != 4 or case.feature_axis != 1:
            return "FrozenBatchNorm2d takes (N, C, H, W) input only"
        return None

    def run(self, case: Case) -> dict[str, Any]:
        c = case.x.shape[1]
        m = self._cls(c, eps=case.eps).to(tu.DTYPES[case.dtype])
        with torch.no_grad():
            m.running_mean.copy_(tu.tensor(case.running_mean, case, "cpu"))
            m.running_var.copy_(tu.tensor(case.running_var, case, "cpu"))
            m.weight.copy_(tu.tensor(case.gamma if case.affine else np.ones(c), case, "cpu"))
            m.bias.copy_(tu.tensor(case.beta if case.affine else np.zeros(c), case, "cpu"))
        m.train(case.training)  # FrozenBatchNorm2d ignores the flag: frozen in training too
        buffers = [m.weight, m.bias]
        out = tu.run_with_grad(case, "cpu", m, [None, None])
        if any(b.requires_grad or b.grad is not None for b in buffers):
            out["dgamma"], out["dbeta"] = numpy_out(m.weight.grad), numpy_out(m.bias.grad)
        out["running_mean"], out["running_var"] = numpy_out(m.running_mean), numpy_out(m.running_var)
        return out


def factory() -> list[Any]:
    return [FrozenBNAdapter()]
