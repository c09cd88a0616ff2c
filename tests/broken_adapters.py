"""Adapters for the meta-tests of the conformance harness: one correct NumPy BN, and seven
deliberately broken variants, each with one classic mistake the harness must catch.

Run one from the command line with
``PYTHONPATH=tests python -m bn_ref.conformance --adapter broken_adapters:unbiased_normalize``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bn_ref import _checks
from bn_ref.conventions import PRESETS, Convention

BUGS = (
    "unbiased_normalize",  # normalizes with the unbiased variance (§2.1 says biased)
    "momentum_wrong_term",  # momentum weights the other term of the running update (§3.1/§3.2)
    "eps_outside_sqrt",  # 1 / (sqrt(var) + eps) instead of 1 / sqrt(var + eps) (§2.2)
    "backward_no_mean_dy",  # dx misses the - mean(dy) term (§5.1)
    "biased_running_var",  # pytorch preset storing the biased variance (§3.4)
    "eval_batch_stats",  # eval normalizes with batch statistics (§4)
    "nan_leak",  # a NaN anywhere poisons every channel (§7.4)
)


@dataclasses.dataclass
class NumpyBN:
    """A small, independent NumPy BN following docs/spec.md, with an optional injected bug."""

    convention: Convention
    bug: str | None = None

    @property
    def name(self) -> str:
        return f"numpy-bn[{self.bug or 'correct'}] @{self.convention.name}"

    def run(self, case: Any) -> dict[str, Any]:
        conv, ax, bug = case.convention, case.feature_axis, self.bug
        x = case.x
        _checks.check_batch(case.n, x.shape, conv, training=case.training)
        red = tuple(i for i in range(x.ndim) if i != ax)
        bshape = tuple(-1 if i == ax else 1 for i in range(x.ndim))
        n = case.n
        g = np.ones(x.shape[ax]) if case.gamma is None else case.gamma
        b = np.zeros(x.shape[ax]) if case.beta is None else case.beta
        use_batch = case.training or bug == "eval_batch_stats"
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if use_batch:
                mean = x.mean(axis=red)
                var = ((x - mean.reshape(bshape)) ** 2).mean(axis=red)
            else:
                mean, var = case.running_mean, case.running_var
            var_norm = var * n / (n - 1) if (bug == "unbiased_normalize" and use_batch and n > 1) else var
            if bug == "eps_outside_sqrt":
                inv = 1.0 / (np.sqrt(var_norm) + conv.eps)
            else:
                inv = 1.0 / np.sqrt(var_norm + conv.eps)
            xhat = (x - mean.reshape(bshape)) * inv.reshape(bshape)
            y = g.reshape(bshape) * xhat + b.reshape(bshape)
            if bug == "nan_leak" and np.isnan(x).any():
                y = np.full_like(y, np.nan)
            rm, rv = case.running_mean.copy(), case.running_var.copy()
            if case.training:
                w_r, w_b = conv.update_weights(case.count)
                if bug == "momentum_wrong_term":
                    w_r, w_b = w_b, w_r
                corr = 1.0 if bug == "biased_running_var" else conv.variance_correction(n)
                rm = w_r * rm + w_b * mean
                rv = w_r * rv + w_b * var * corr
            dy = case.dy
            dbeta = dy.sum(axis=red)
            dgamma = (dy * xhat).sum(axis=red)
            if case.training:
                mean_dy = 0.0 if bug == "backward_no_mean_dy" else (dbeta / n).reshape(bshape)
                dx = (g * inv).reshape(bshape) * (dy - mean_dy - xhat * (dgamma / n).reshape(bshape))
            else:
                dx = (g * inv).reshape(bshape) * dy
        out = {"y": y, "running_mean": rm, "running_var": rv, "dx": dx}
        if case.gamma is not None:
            out["dgamma"] = dgamma
        if case.beta is not None:
            out["dbeta"] = dbeta
        return out


def correct() -> list[NumpyBN]:
    return [NumpyBN(PRESETS["pytorch"]), NumpyBN(PRESETS["flax"])]


def _make(bug: str):
    def factory() -> NumpyBN:
        return NumpyBN(PRESETS["pytorch"], bug)

    factory.__name__ = bug
    return factory


for _bug in BUGS:
    globals()[_bug] = _make(_bug)


class Raises:
    """Raises on every call: the harness must report an error per case and go on."""

    name = "always-raises @pytorch"
    convention = PRESETS["pytorch"]

    def run(self, case: Any) -> dict[str, Any]:
        raise RuntimeError("kernel exploded")


def raises() -> Raises:
    return Raises()


class NoGrads(NumpyBN):
    """Returns no gradients: the backward checks must be *skipped*, not passed."""

    def run(self, case: Any) -> dict[str, Any]:
        out = super().run(case)
        for k in ("dx", "dgamma", "dbeta"):
            out.pop(k, None)
        return out


def no_grads() -> NoGrads:
    return NoGrads(PRESETS["pytorch"])
