"""Helpers for the PyTorch-based adapters: tensors in the case dtype/layout, gradients out."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..cases import Case
from .base import numpy_out

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def devices() -> list[str]:
    """"cpu", plus "cuda" when a CUDA device is present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tensor(a: np.ndarray | None, case: Case, device: str) -> torch.Tensor | None:
    if a is None:
        return None
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=DTYPES[case.dtype], device=device)


def input_tensor(case: Case, device: str) -> torch.Tensor:
    """x in the case dtype and the case's memory layout, as a leaf that requires grad."""
    x = tensor(case.x, case, device)
    if case.layout == "channels_last" and x.ndim in (4, 5):
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    elif case.layout == "non_contiguous":
        big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=device)
        big[..., ::2] = x
        x = big[..., ::2]
        assert not x.is_contiguous()
    return x.detach().requires_grad_(True)


def layout_reason(case: Case) -> str | None:
    if case.layout == "channels_last" and case.rank not in (4, 5):
        return "channels_last needs a 4-D or 5-D tensor"
    return None


def run_with_grad(case: Case, device: str, fwd: Callable[[torch.Tensor], Any], params: list[Any]) -> dict[str, Any]:
    """Call ``fwd(x)``; when ``case.dy`` is given, backpropagate it into x and ``params`` (gamma, beta)."""
    x = input_tensor(case, device)
    y = fwd(x)
    out: dict[str, Any] = {"y": numpy_out(y)}
    if case.dy is not None and y.requires_grad:
        dy = tensor(case.dy, case, device)
        y.backward(dy)
        out["dx"] = numpy_out(x.grad)
        if params[0] is not None:
            out["dgamma"] = numpy_out(params[0].grad)
        if params[1] is not None:
            out["dbeta"] = numpy_out(params[1].grad)
    return out


def load_case_state(m: Any, case: Case, device: Any) -> list[Any]:
    """Put the case's running statistics, step count and affine parameters into a BN module
    (bn-ref's or torch.nn's; same buffer names), set its mode, and return ``[weight, bias]``
    (``[None, None]`` without affine) for :func:`run_with_grad`."""
    def own(a: np.ndarray, buf: torch.Tensor) -> torch.Tensor:
        # In the buffer's own dtype (float32 under mixed precision, §8.4): a state fed back from the
        # previous step is not rounded to T on the way in (the oracle sees it unrounded).
        return torch.tensor(np.asarray(a, dtype=np.float64), dtype=buf.dtype, device=device)

    with torch.no_grad():
        assert case.running_mean is not None and case.running_var is not None  # a tracked module's case
        m.running_mean.copy_(own(case.running_mean, m.running_mean))
        m.running_var.copy_(own(case.running_var, m.running_var))
        m.num_batches_tracked.fill_(case.count)
        if case.affine:
            assert case.gamma is not None and case.beta is not None
            m.weight.copy_(own(case.gamma, m.weight))
            m.bias.copy_(own(case.beta, m.bias))
    m.zero_grad(set_to_none=True)
    m.train(case.training)
    return [m.weight, m.bias] if case.affine else [None, None]
