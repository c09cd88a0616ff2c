"""tinygrad ``nn.BatchNorm`` (the ``tinygrad`` family).

tinygrad's layer follows PyTorch's conventions (eps 1e-5, momentum 0.1 on the batch term, the
running variance Bessel-corrected by ``numel / (numel - C)``, features on axis 1); training is the
global ``TRAINING`` context variable. Gradients of ``sum(y * dy)`` come from ``Tensor.gradient``
with ``dy`` as the output gradient. Rows: under the ``pytorch`` preset with eps and momentum
passed, and a *defaults* row ``nn.BatchNorm(C)``. When no device is chosen the adapter takes
``DEV=CPU`` if ``clang`` is on the PATH (tinygrad's CPU device compiles kernels with it) and
otherwise ``DEV=PYTHON``, tinygrad's pure-Python emulator (same kernels, slower).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

os.environ.setdefault("DEV", "CPU" if shutil.which("clang") else "PYTHON")
# Compile in this process: tinygrad's default compiles in a pool of spawned workers (one per core),
# each re-importing tinygrad -- on the 2-core CI machine that costs more than it saves (measured).
os.environ.setdefault("PARALLEL", "0")

import numpy as np  # noqa: E402
from tinygrad import Tensor, dtypes, nn  # noqa: E402
from tinygrad.helpers import Context  # noqa: E402

from ...conventions import PRESETS  # noqa: E402
from ..cases import Case  # noqa: E402
from ._defaults import as_f64, defaults_skip  # noqa: E402

__all__ = ["TinygradAdapter", "factory"]

_DT = {"float64": dtypes.float64, "float32": dtypes.float32, "float16": dtypes.float16, "bfloat16": dtypes.bfloat16}


def _version() -> str:
    from importlib import metadata

    return metadata.version("tinygrad")


class TinygradAdapter:
    def __init__(self, defaults: bool) -> None:
        self.defaults = defaults
        self.convention = PRESETS["pytorch"]
        self.name = "tinygrad.nn.BatchNorm(C) @pytorch (defaults)" if defaults else "tinygrad.nn.BatchNorm @pytorch"
        self.description = f"tinygrad {_version()} nn.BatchNorm on device {os.environ.get('DEV')}"

    def skip(self, case: Case) -> str | None:
        if self.defaults:
            return defaults_skip(case, 1, "tinygrad nn.BatchNorm")
        if case.momentum is None:
            return "tinygrad nn.BatchNorm has no cumulative-average mode (momentum=None)"
        if case.feature_axis != 1:
            return "tinygrad nn.BatchNorm takes the features on axis 1 only"
        return None

    def run(self, case: Case) -> dict[str, Any]:
        c = case.x.shape[1]
        dt = _DT[case.dtype]
        if self.defaults:
            bn = nn.BatchNorm(c)
        else:
            bn = nn.BatchNorm(c, eps=case.eps, affine=case.affine, momentum=case.momentum)
        if bn.weight is not None:
            bn.weight = Tensor(np.asarray(case.gamma if case.affine else np.ones(c)), dtype=dt)
            bn.bias = Tensor(np.asarray(case.beta if case.affine else np.zeros(c)), dtype=dt)
        bn.running_mean = Tensor(np.asarray(case.running_mean), dtype=dt)
        bn.running_var = Tensor(np.asarray(case.running_var), dtype=dt)
        x = Tensor(np.asarray(case.x), dtype=dt)
        with Context(TRAINING=int(case.training)):
            y = bn(x)
            targets = [x] + ([bn.weight, bn.bias] if case.affine else [])
            grads = y.gradient(*targets, gradient=Tensor(np.asarray(case.dy), dtype=y.dtype))
            # Every output is cast to a NumPy-readable dtype that holds it exactly (float32 holds every
            # float16/bfloat16 value) and all are realized in ONE schedule: realizing them one by one
            # re-schedules the shared graph each time (the bulk of this family's time, measured).
            wide = dtypes.float64 if case.dtype == "float64" else dtypes.float32
            keys = ["y", "dx"] + (["dgamma", "dbeta"] if case.affine else []) + ["running_mean", "running_var"]
            tensors = [t.cast(wide) for t in [y, *grads, bn.running_mean, bn.running_var]]
            Tensor.realize(*tensors)
            out: dict[str, Any] = {k: as_f64(t.numpy()) for k, t in zip(keys, tensors)}
        return out


def factory() -> list[Any]:
    return [TinygradAdapter(defaults=False), TinygradAdapter(defaults=True)]
