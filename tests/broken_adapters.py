"""Adapters for the meta-tests of the conformance harness: one correct NumPy BN, seven
deliberately broken variants, each with one classic mistake the harness must catch, and adapters
that misbehave as programs (crash, hang, build nothing, need a missing framework), which the
harness must survive.

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
        eps = 1e-3 if bug == "eps_1e-3" else conv.eps  # a hard-coded eps (Keras's) under another preset
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
                inv = 1.0 / (np.sqrt(var_norm) + eps)
            else:
                inv = 1.0 / np.sqrt(var_norm + eps)
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


def eps_1e_3() -> NumpyBN:
    """Claims the pytorch preset (eps 1e-5) but normalizes with eps 1e-3: explained as ``eps=0.001``."""
    return NumpyBN(PRESETS["pytorch"], "eps_1e-3")


# -- adapters that misbehave as programs: the harness must survive them (they run isolated) ----------


def _exit_hard(code: int = 3) -> None:
    import os
    import sys

    sys.stdout.flush()
    os._exit(code)


def _segfault() -> None:
    import ctypes

    ctypes.string_at(0)  # reads address 0: SIGSEGV


class Misbehaves(NumpyBN):
    """Correct, except on cases whose id contains ``where``: there it does ``what``."""

    def __init__(self, what: str, where: str) -> None:
        super().__init__(PRESETS["pytorch"])
        self.what, self.where = what, where

    @property
    def name(self) -> str:
        return f"numpy-bn[{self.what} on {self.where}] @pytorch"

    def skip(self, case: Any) -> str | None:
        if self.what == "exit in skip" and self.where in case.id:
            _exit_hard()
        return None

    def run(self, case: Any) -> dict[str, Any]:
        if self.where in case.id:
            if self.what == "exit":
                _exit_hard()
            elif self.what == "segfault":
                _segfault()
            elif self.what == "hang":
                import time

                time.sleep(3600)
        return super().run(case)


def exits_on_sequence() -> Misbehaves:
    """``os._exit(3)`` on every step of the sequence cases."""
    return Misbehaves("exit", "sequence")


def segfaults_on_nan() -> Misbehaves:
    return Misbehaves("segfault", "nan-channel")


def hangs_on_sequence() -> Misbehaves:
    return Misbehaves("hang", "sequence")


def crashes_instead_of_raising() -> Misbehaves:
    """Dies on the n = 1 case that must raise: a crash is not a conforming "raise" (an ERROR, not a pass)."""
    return Misbehaves("exit", "single-value")


def exits_in_skip_on_nan() -> Misbehaves:
    """Dies inside the optional ``skip(case)``: still only that case's error."""
    return Misbehaves("exit in skip", "nan-channel")


def empty() -> list[NumpyBN]:
    """A factory that returns no adapter: an error, never a green row of nothing."""
    return []


def needs_missing_framework() -> NumpyBN:
    """Imports a framework that is not installed: the row is skipped, naming the module."""
    import not_installed_framework_xyz  # noqa: F401

    return NumpyBN(PRESETS["pytorch"])


def exits_on_load() -> NumpyBN:
    _exit_hard(7)
    raise AssertionError("unreachable")


def hangs_on_load() -> NumpyBN:
    import time

    time.sleep(3600)
    raise AssertionError("unreachable")
