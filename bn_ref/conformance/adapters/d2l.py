"""bn-ref's re-implementation of the d2l book's from-scratch layer (``bn_ref.d2l_scratch.BatchNorm``)
under the ``d2l`` preset.

The row is named for what it is: bn-ref's own rewrite of the book's algorithm (the project ships
no copy of the book's code, and the seed notes' transcription omits ``return Y``), so it checks the
*preset's* description of the book's layer, not the book's code itself. Its ``defaults()`` is the
layer as the book builds it (eps and momentum are hard-coded there).

Faithful to the book: train/eval is chosen by grad mode (training runs with grad enabled, eval
under ``torch.no_grad()``, so eval has no gradients), 2-D and 4-D inputs with the features on
axis 1 only, eps and momentum hard-coded (1e-5, 0.9 on the running term).
"""

from __future__ import annotations

from typing import Any

import torch

from ... import d2l_scratch
from ...conventions import PRESETS
from ..cases import Case
from . import _torch_util as tu
from .base import axis_reason, numpy_out

__all__ = ["D2LAdapter", "factory"]


class D2LAdapter:
    def __init__(self) -> None:
        self.convention = PRESETS["d2l"]
        self.name = "bn_ref.d2l_scratch.BatchNorm (rewrite of the d2l layer) @d2l"
        self.description = "bn-ref's rewrite of the d2l book's classic from-scratch layer (bn_ref.d2l_scratch)"

    def defaults(self) -> "D2LAdapter":
        """The layer as the book builds it, ``BatchNorm(C, num_dims)``: eps and momentum are hard-coded."""
        return D2LAdapter()

    def skip(self, case: Case) -> str | None:
        if case.rank not in (2, 4):
            return "the d2l layer takes 2-D or 4-D input only"
        if case.eps != d2l_scratch.EPS or case.momentum != d2l_scratch.MOMENTUM:
            return "the d2l layer hard-codes eps=1e-5 and momentum=0.9 (no cumulative average)"
        return axis_reason(case, (1,), "the d2l layer")

    def run(self, case: Case) -> dict[str, Any]:
        c = case.x.shape[1]
        m = d2l_scratch.BatchNorm(c, case.rank).to(tu.DTYPES[case.dtype])
        shape = m.gamma.shape
        with torch.no_grad():
            if case.affine:
                m.gamma.copy_(tu.tensor(case.gamma, case, "cpu").reshape(shape))
                m.beta.copy_(tu.tensor(case.beta, case, "cpu").reshape(shape))
        m.moving_mean = tu.tensor(case.running_mean, case, "cpu").reshape(shape)
        m.moving_var = tu.tensor(case.running_var, case, "cpu").reshape(shape)
        params = [m.gamma, m.beta] if case.affine else [None, None]
        if case.training:
            with torch.enable_grad():
                out = tu.run_with_grad(case, "cpu", m, params)
        else:
            with torch.no_grad():  # the book's eval switch (§4)
                out = tu.run_with_grad(case, "cpu", m, params)
        for k in ("dgamma", "dbeta"):  # the book's parameters are (1, C) / (1, C, 1, 1)
            if out.get(k) is not None:
                out[k] = out[k].reshape(-1)
        out["running_mean"] = numpy_out(m.moving_mean.reshape(-1))
        out["running_var"] = numpy_out(m.moving_var.reshape(-1))
        return out


def factory() -> list[Any]:
    return [D2LAdapter()]
