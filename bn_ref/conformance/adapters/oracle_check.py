"""Self-check of the oracle by independent means.

* Forward and running statistics: recomputed channel by channel with ``math.fsum`` (exactly
  rounded sums, a different summation from NumPy's pairwise one) and the convention's update rule
  (§2, §3, §4).
* Gradients: fourth-order central finite differences of ``sum(y * dy)`` through
  :func:`bn_ref.oracle.forward` -- which checks the closed forms of :func:`bn_ref.oracle.backward`
  (§5) against the forward they claim to differentiate.

The differences are taken on the per-channel-centred problem (BN is shift invariant), so they
stay accurate on large-mean data; cases with non-finite inputs are declined, with the reason.
"""

from __future__ import annotations

import math

import numpy as np

from ... import _checks, oracle
from ...conventions import PRESETS, Convention
from ..cases import Case

__all__ = ["OracleSelfCheck", "factory"]


class OracleSelfCheck:
    """The oracle against fsum statistics and finite differences."""

    description = "bn_ref.oracle vs math.fsum statistics and 4th-order central finite differences"

    def __init__(self, convention: Convention) -> None:
        self.convention = convention
        self.name = f"bn_ref.oracle (fsum + finite differences) @{convention.name}"

    def skip(self, case: Case) -> str | None:
        if not np.isfinite(case.x).all():
            return "finite differences of non-finite inputs are meaningless"
        return None

    def run(self, case: Case) -> dict:
        conv, ax = case.convention, case.feature_axis
        _checks.check_batch(case.n, case.x.shape, conv, training=case.training)  # §7.1
        xc = np.moveaxis(case.x, ax, 0).reshape(case.x.shape[ax], -1)  # (C, n)
        c, n = xc.shape
        y = np.empty_like(xc)
        new_rm, new_rv = case.running_mean.copy(), case.running_var.copy()
        w_r, w_b = conv.update_weights(case.count) if case.training else (1.0, 0.0)
        for ch in range(c):
            vals = [float(v) for v in xc[ch]]
            if case.training:
                mean = math.fsum(vals) / n  # §2.1
                var = math.fsum((v - mean) ** 2 for v in vals) / n
                new_rm[ch] = w_r * case.running_mean[ch] + w_b * mean  # §3
                new_rv[ch] = w_r * case.running_var[ch] + w_b * var * conv.variance_correction(n)  # §3.4
            else:
                mean, var = case.running_mean[ch], case.running_var[ch]  # §4
            inv = 1.0 / math.sqrt(var + conv.eps)  # §2.2
            g = 1.0 if case.gamma is None else case.gamma[ch]
            b = 0.0 if case.beta is None else case.beta[ch]
            y[ch] = [g * (v - mean) * inv + b for v in vals]  # §2.3
        shape_c = (case.x.shape[ax],) + tuple(s for i, s in enumerate(case.x.shape) if i != ax)
        y_out = np.moveaxis(y.reshape(shape_c), 0, ax)
        out = {"y": y_out, "running_mean": new_rm, "running_var": new_rv}
        if case.dy is not None:
            out.update(self._grads(case))
        return out

    def _grads(self, case: Case) -> dict:
        conv, ax = case.convention, case.feature_axis
        red = tuple(i for i in range(case.x.ndim) if i != ax)
        # BN is invariant to a per-channel shift of x (and, in eval, of the running mean by the
        # same amount): differencing the shifted problem keeps the step well above round-off
        # even for large-mean data (§8.2). The derivatives are those of the unshifted problem.
        shift = case.x.mean(axis=red) if case.training else case.running_mean
        bshape = tuple(-1 if i == ax else 1 for i in range(case.x.ndim))
        x0 = case.x - shift.reshape(bshape)
        rm0 = case.running_mean - shift

        def loss(x, gamma, beta):
            r = oracle.forward(x, gamma, beta, rm0, case.running_var, training=case.training,
                               convention=conv, axis=ax, count=case.count)
            return float(np.sum(r.y * case.dy))

        def d(f, a, h):
            """4th-order central difference of f at a along every element (step h per element)."""
            g = np.empty_like(a)
            for i in np.ndindex(a.shape):
                hi = h[i]
                vals = []
                for s in (2.0, 1.0, -1.0, -2.0):
                    b = a.copy()
                    b[i] += s * hi
                    vals.append(f(b))
                g[i] = (-vals[0] + 8.0 * vals[1] - 8.0 * vals[2] + vals[3]) / (12.0 * hi)
            return g

        spread = np.sqrt(case.x.var(axis=red, keepdims=True) + conv.eps)
        if not case.training:
            spread = np.sqrt(case.running_var + conv.eps).reshape(bshape)
        h_x = np.broadcast_to(1e-3 * spread, case.x.shape).copy()
        out = {}
        if not (case.training and case.n == 1):  # n = 1: y = beta, dx = 0; differences only add noise
            out["dx"] = d(lambda b: loss(b, case.gamma, case.beta), x0, h_x)
        if case.gamma is not None:
            out["dgamma"] = d(lambda b: loss(x0, b, case.beta), case.gamma, np.full(case.gamma.shape, 1e-3))
        if case.beta is not None:
            out["dbeta"] = d(lambda b: loss(x0, case.gamma, b), case.beta, np.full(case.beta.shape, 1e-3))
        return out


def factory() -> list[OracleSelfCheck]:
    """The self-check under a channel-first and a channel-last preset."""
    return [OracleSelfCheck(PRESETS["pytorch"]), OracleSelfCheck(PRESETS["flax"])]
