"""bn-ref's own PyTorch backend (``bn_ref.torch``): functional and module forms, both
implementations (closed-form ``autograd.Function`` and plain autograd), CPU and CUDA."""

from __future__ import annotations

from typing import Any

import torch

from ... import torch as bt
from ...conventions import PRESETS, Convention
from ...torch.variants import RenormState, batch_norm_variant
from ..cases import Case
from . import _torch_util as tu
from .base import numpy_out

__all__ = ["FunctionalAdapter", "ModuleAdapter", "factory"]


class FunctionalAdapter:
    """``bn_ref.torch.batch_norm``."""

    def __init__(self, convention: Convention, implementation: str, device: str) -> None:
        self.convention = convention
        self.implementation = implementation
        self.device = device
        self.name = f"bn_ref.torch.batch_norm[{implementation}, {device}] @{convention.name}"
        self.description = "bn-ref PyTorch functional form"

    def skip(self, case: Case) -> str | None:
        return tu.layout_reason(case)

    def variant_skip(self, case: Case) -> str | None:
        """Every variant runs through ``bn_ref.torch.variants.batch_norm_variant`` (one implementation:
        the rows of the closed-form implementation run it)."""
        if self.implementation != "function":
            return "batch_norm_variant has one implementation; the implementation='function' rows run it"
        return None

    def _run_variant(self, case: Case) -> dict[str, Any]:
        d = self.device
        rm, rv = tu.tensor(case.running_mean, case, d), tu.tensor(case.running_var, case, d)
        w, b = tu.tensor(case.gamma, case, d), tu.tensor(case.beta, case, d)
        for p in (w, b):
            if p is not None:
                p.requires_grad_(True)
        state = None
        if case.variant.renorm:
            dt = tu.DTYPES[case.dtype]
            state = RenormState(torch.tensor(case.renorm_mean, dtype=dt, device=d),
                                torch.tensor(case.renorm_stat, dtype=dt, device=d))

        def fwd(x: torch.Tensor) -> torch.Tensor:
            y, _ = batch_norm_variant(x, rm, rv, w, b, training=case.training, variant=case.variant,
                                      convention=case.convention, count=case.count, renorm=state)
            return y

        out = tu.run_with_grad(case, d, fwd, [w, b])
        out["running_mean"], out["running_var"] = numpy_out(rm), numpy_out(rv)
        if state is not None:
            out["renorm_mean"], out["renorm_stat"] = numpy_out(state.mean), numpy_out(state.stat)
        return out

    def run(self, case: Case) -> dict[str, Any]:
        if case.variant is not None:
            return self._run_variant(case)
        d = self.device
        rm, rv = tu.tensor(case.running_mean, case, d), tu.tensor(case.running_var, case, d)
        w = tu.tensor(case.gamma, case, d)
        b = tu.tensor(case.beta, case, d)
        for p in (w, b):
            if p is not None:
                p.requires_grad_(True)

        def fwd(x: torch.Tensor) -> torch.Tensor:
            return bt.batch_norm(x, rm, rv, w, b, training=case.training, convention=case.convention,
                                 axis=case.feature_axis, count=case.count, implementation=self.implementation)

        out = tu.run_with_grad(case, d, fwd, [w, b])
        out["running_mean"], out["running_var"] = numpy_out(rm), numpy_out(rv)
        return out


class ModuleAdapter:
    """``bn_ref.torch.BatchNorm`` (one module per configuration, reused across cases)."""

    def __init__(self, convention: Convention, implementation: str, device: str) -> None:
        self.convention = convention
        self.implementation = implementation
        self.device = device
        self.name = f"bn_ref.torch.BatchNorm[{implementation}, {device}] @{convention.name}"
        self.description = "bn-ref PyTorch module (train/eval from module.training)"
        self._modules: dict[Any, Any] = {}

    def skip(self, case: Case) -> str | None:
        return tu.layout_reason(case)

    def _module(self, case: Case) -> Any:
        c = case.x.shape[case.feature_axis]
        key = (c, case.dtype, case.affine, case.convention)
        m = self._modules.get(key)
        if m is None:
            m = bt.BatchNorm(c, convention=case.convention, affine=case.affine, device=self.device,
                             dtype=tu.DTYPES[case.dtype], implementation=self.implementation)
            self._modules[key] = m
        return m

    def run(self, case: Case) -> dict[str, Any]:
        m = self._module(case)
        params = tu.load_case_state(m, case, self.device)
        out = tu.run_with_grad(case, self.device, m, params)
        out["running_mean"], out["running_var"] = numpy_out(m.running_mean), numpy_out(m.running_var)
        return out


def factory() -> list[Any]:
    """Functional form under every preset; module form under pytorch and flax; CPU and CUDA."""
    out: list[Any] = []
    for device in tu.devices():
        for impl in ("function", "autograd"):
            for name in (PRESETS if (impl == "function" and device == "cpu") else ("pytorch",)):
                out.append(FunctionalAdapter(PRESETS[name], impl, device))
            for name in ("pytorch", "flax"):
                out.append(ModuleAdapter(PRESETS[name], impl, device))
    return out
