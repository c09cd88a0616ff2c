"""PyTorch's own Batch Normalization under the ``pytorch`` preset: ``torch.nn.BatchNorm1d/2d/3d``
and ``torch.nn.functional.batch_norm``, on CPU and CUDA.

Working dtypes (§8.3, §8.4): x and dy in the case dtype T; for T = float16/bfloat16 the layer is
used the way mixed precision uses it -- weight, bias and running statistics in float32 (what
``torch.autocast`` keeps for BN), and PyTorch's mixed-type kernel returns y in T. (A module cast
wholly to T folds scale and shift in T and loses ~u_T * kappa: measured 0.07 std on mean-100
bfloat16 data; that configuration is not a row.)

Each adapter's ``defaults()`` builds the layer from PyTorch's own defaults (no eps, no momentum
passed) for the ``defaults`` check group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ...conventions import PRESETS
from ..cases import Case
from . import _torch_util as tu
from .base import axis_reason, numpy_out

__all__ = ["TorchModuleAdapter", "TorchFunctionalAdapter", "factory"]

_MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def param_dtype(case: Case) -> torch.dtype:
    """Parameters and running statistics: float32 for float16/bfloat16 cases (mixed precision), else T."""
    return torch.float32 if case.dtype in ("float16", "bfloat16") else tu.DTYPES[case.dtype]


def _ptensor(a, case: Case, device: str) -> torch.Tensor | None:
    return None if a is None else torch.tensor(a, dtype=param_dtype(case), device=device)


def _reason(case: Case, what: str) -> str | None:
    return axis_reason(case, (1,), what) or tu.layout_reason(case)


class TorchModuleAdapter:
    """``torch.nn.BatchNorm{1,2,3}d`` by rank; ``num_batches_tracked`` set from ``count``."""

    def __init__(self, device: str, defaults: bool = False) -> None:
        self.convention = PRESETS["pytorch"]
        self.device = device
        self.name = f"torch.nn.BatchNorm*d[{device}] @pytorch"
        self.description = f"torch {torch.__version__} torch.nn.BatchNorm1d/2d/3d"
        self._cache: dict[Any, Any] = {}
        self._defaults = defaults

    def defaults(self) -> "TorchModuleAdapter":
        """The module built as ``BatchNorm2d(C)``: PyTorch's defaults, nothing passed."""
        return TorchModuleAdapter(self.device, defaults=True)

    def skip(self, case: Case) -> str | None:
        return _reason(case, "torch.nn.BatchNorm*d")

    def variant_skip(self, case: Case) -> str | None:
        """``track_running_stats=False``; frozen BN the PyTorch way -- ``.eval()`` inside a training
        step, with ``requires_grad`` on (``frozen="statistics"``) or off (``"all"``); precise BN as
        ``momentum=None`` (§15-§17). No renorm, no ghost batches."""
        v = case.variant
        if self._defaults:
            return "the defaults row runs the plain catalogue only"
        if v.renorm:
            return "torch.nn.BatchNorm*d has no Batch Renormalization"
        if v.ghost_batch_size is not None:
            return "torch.nn.BatchNorm*d has no ghost batches"
        return None

    def _run_variant(self, case: Case) -> dict[str, Any]:
        v, dev = case.variant, self.device
        c = case.x.shape[1]
        key = ("variant", case.rank, c, case.dtype, case.affine, case.eps, case.momentum, v.track_running_stats)
        m = self._cache.get(key)
        if m is None:
            m = _MODULES[case.rank](c, eps=case.eps, momentum=case.momentum, affine=case.affine,
                                    track_running_stats=v.track_running_stats, device=dev, dtype=param_dtype(case))
            self._cache[key] = m
        if v.track_running_stats:
            params = tu.load_case_state(m, case, dev)
        else:
            with torch.no_grad():
                if case.affine:
                    m.weight.copy_(torch.tensor(case.gamma, dtype=param_dtype(case), device=dev))
                    m.bias.copy_(torch.tensor(case.beta, dtype=param_dtype(case), device=dev))
            m.zero_grad(set_to_none=True)
            m.train(case.training)
            params = [m.weight, m.bias] if case.affine else [None, None]
        if v.frozen != "no":
            m.eval()  # the PyTorch idiom for frozen BN: eval mode inside a training step
        for p in params:
            if p is not None:
                p.requires_grad_(v.frozen != "all")
        out = tu.run_with_grad(case, dev, m, params)
        out["running_mean"], out["running_var"] = numpy_out(m.running_mean), numpy_out(m.running_var)
        return out

    def run(self, case: Case) -> dict[str, Any]:
        if case.variant is not None:
            return self._run_variant(case)
        c = case.x.shape[1]
        key = (case.rank, c, case.dtype, case.affine, case.eps, case.momentum)
        m = self._cache.get(key)
        if m is None:
            if self._defaults:
                m = _MODULES[case.rank](c, device=self.device, dtype=param_dtype(case))
            else:
                m = _MODULES[case.rank](c, eps=case.eps, momentum=case.momentum, affine=case.affine,
                                        device=self.device, dtype=param_dtype(case))
            self._cache[key] = m
        out = tu.run_with_grad(case, self.device, m, tu.load_case_state(m, case, self.device))
        out["running_mean"], out["running_var"] = numpy_out(m.running_mean), numpy_out(m.running_var)
        return out


class TorchFunctionalAdapter:
    """``torch.nn.functional.batch_norm``. ``momentum=None`` is passed as the factor
    ``1 / (count + 1)``, which is what the modules do with ``num_batches_tracked`` (§3.3)."""

    def __init__(self, device: str, defaults: bool = False) -> None:
        self.convention = PRESETS["pytorch"]
        self.device = device
        self.name = f"torch.nn.functional.batch_norm[{device}] @pytorch"
        self.description = f"torch {torch.__version__} F.batch_norm"
        self._defaults = defaults

    def defaults(self) -> "TorchFunctionalAdapter":
        """``F.batch_norm(x, rm, rv, w, b, training=...)``: PyTorch's default momentum and eps."""
        return TorchFunctionalAdapter(self.device, defaults=True)

    def skip(self, case: Case) -> str | None:
        return _reason(case, "F.batch_norm")

    def run(self, case: Case) -> dict[str, Any]:
        d = self.device
        rm, rv = _ptensor(case.running_mean, case, d), _ptensor(case.running_var, case, d)
        w, b = _ptensor(case.gamma, case, d), _ptensor(case.beta, case, d)
        for p in (w, b):
            if p is not None:
                p.requires_grad_(True)
        # F.batch_norm's momentum is the batch weight of this one step (§3.1, §3.3).
        _, momentum = dataclasses.replace(self.convention, momentum=case.momentum).update_weights(case.count)

        def fwd(x: torch.Tensor) -> torch.Tensor:
            if self._defaults:  # the default momentum 0.1 is the pytorch preset's; None is not a default
                return F.batch_norm(x, rm, rv, w, b, training=case.training)
            return F.batch_norm(x, rm, rv, w, b, training=case.training, momentum=momentum, eps=case.eps)

        out = tu.run_with_grad(case, d, fwd, [w, b])
        out["running_mean"], out["running_var"] = numpy_out(rm), numpy_out(rv)
        return out


def factory() -> list[Any]:
    out: list[Any] = []
    for device in tu.devices():
        out += [TorchModuleAdapter(device), TorchFunctionalAdapter(device)]
    return out
