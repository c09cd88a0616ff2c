"""Identify an unknown Batch Normalization: probe an adapter and say which Convention it follows.

``python -m bn_ref.conformance.identify --adapter mod:factory`` (and :func:`identify`) drives any
implementation through the adapter contract of ``docs/adapters.md`` with crafted cases and reads
every field of a :class:`~bn_ref.Convention` off its outputs, with the evidence:

* **feature axis** (§6) -- which of axis 1 / -1 it accepts, and whether it normalizes over the
  axis it is given (a rank-4 input whose two candidate axes have the same size);
* **eps** (§2.2, §4) -- from eval with a zero running variance (``y = x / sqrt(eps)``), checked
  against training on channels of variance 1e-8 and 1e-6 (also catches eps outside the root);
* **momentum and the term it weights** (§3.1-§3.3) -- the batch weight ``w_b`` solved from the
  running mean of a step (channels with independent running and batch means), at step counts 0
  and 5 (constant momentum vs cumulative average vs a step-dependent weight no convention has),
  and again with momentum 0.3 to see which term the given number weights;
* **cumulative average** -- a case with ``momentum=None`` at count 3 must weight the batch 1/4;
* **running-variance estimator** (§3.4) -- the factor ``c`` fed into the running variance at
  n = 8: 1 (biased) or 8/7 (unbiased);
* **n = 1 behaviour** (§7.1) -- raises, or trains with output beta;
* **variance algorithm** (§8.1, §8.2) -- a large-mean float32 probe (mean 1000, std 0.01) that
  the one-pass formula E[x²] − E[x]² cannot pass.

Finally the implementation is run through a short sequence (three training steps and eval)
against the oracle under the identified convention; anything that still differs is reported as
*unexplained*. The result names the closest preset(s) and the fields that differ.

The adapter's claimed ``convention`` is used only to drive it the way the harness does (eps,
momentum and its spelling are passed in the case as the claim says); every reported value is read
from the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .. import oracle
from ..conventions import PRESETS, Convention
from ..tolerances import error_units
from .cases import Case

__all__ = ["Finding", "Identification", "identify", "closest_presets", "main"]


@dataclass
class Finding:
    """One field: the value read off the outputs (None: could not be probed) and the evidence."""

    field: str
    value: Any
    evidence: str
    probed: bool = True


@dataclass
class Identification:
    """The result of :func:`identify`.

    ``convention`` is the identified :class:`Convention` (fields that could not be probed keep the
    claimed value and are marked in ``findings``); ``closest`` lists the presets with the fewest
    differing fields and ``differences`` what differs for each of them; ``unexplained`` lists the
    behaviours no convention explains (empty when the identified convention reproduces every probe).
    """

    adapter: str
    claimed: Convention
    convention: Convention
    findings: dict[str, Finding]
    closest: list[str]
    differences: dict[str, list[str]]
    unexplained: list[str] = field(default_factory=list)
    cumulative: Finding | None = None
    claim_differences: list[str] = field(default_factory=list)

    @property
    def explained(self) -> bool:
        return not self.unexplained

    def __str__(self) -> str:
        c = self.convention
        lines = [f"adapter: {self.adapter}", f"claims:  {_fmt_conv(self.claimed)}", f"follows: {_fmt_conv(c)}", ""]
        for f in self.findings.values():
            mark = "" if f.probed else " (not probed; the claim's value)"
            lines.append(f"  {f.field:<14} {f.value!s:<12}{mark}  -- {f.evidence}")
        if self.cumulative is not None:
            lines.append(f"  {'cumulative':<14} {self.cumulative.value!s:<12}  -- {self.cumulative.evidence}")
        lines.append("")
        if self.claim_differences:
            lines.append(f"differs from its claim in: {'; '.join(self.claim_differences)}")
        for name in self.closest:
            diff = self.differences.get(name, [])
            head = "closest preset" if len(self.closest) == 1 else "closest preset (tied)"
            lines.append(f"{head}: {name}" + (" (every field matches)" if not diff else f" (differs in: {'; '.join(diff)})"))
        if self.unexplained:
            lines.append("NOT EXPLAINED by any convention:")
            lines += [f"  - {u}" for u in self.unexplained]
        else:
            lines.append("every probe is reproduced by the identified convention (oracle, spec §8.4)")
        return "\n".join(lines)


def _fmt_conv(c: Convention) -> str:
    return (f"eps={c.eps:g}, momentum={c.momentum} on the {c.momentum_on} term, {c.running_var} running variance, "
            f"feature axis {c.feature_axis}, n = 1: {c.single_value}")


# -- calling the adapter ---------------------------------------------------------------------------


class _Skipped(Exception):
    pass


def _call(adapter: Any, case: Case) -> dict[str, np.ndarray]:
    """Run one case: returns the float64 outputs; raises _Skipped (with the reason) or what run raised."""
    skip = getattr(adapter, "skip", None)
    if skip is not None:
        reason = skip(case)
        if reason:
            raise _Skipped(reason)
    out = adapter.run(dataclasses.replace(case, x=case.x.copy(), running_mean=case.running_mean.copy(),
                                          running_var=case.running_var.copy()))
    return {k: np.asarray(v, dtype=np.float64) for k, v in (out or {}).items() if v is not None}


def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(a, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)
    return np.asarray(a, np.float64).astype(dtype).astype(np.float64)


def _case(conv: Convention, x: np.ndarray, *, rm: np.ndarray, rv: np.ndarray, training: bool, axis: int,
          dtype: str, count: int = 0, gamma: np.ndarray | None = None, beta: np.ndarray | None = None,
          cid: str = "identify", seed: int = 0) -> Case:
    c = x.shape[axis]
    x = _round(x, dtype)
    ax = axis % x.ndim
    conv = dataclasses.replace(conv, feature_axis=axis if conv.feature_axis % x.ndim != ax else conv.feature_axis)
    n = x.size // c if x.size else 0
    return Case(
        x=x,
        gamma=_round(np.ones(c) if gamma is None else gamma, dtype),
        beta=_round(np.zeros(c) if beta is None else beta, dtype),
        running_mean=_round(rm, dtype), running_var=_round(rv, dtype),
        dy=_round(np.random.default_rng(seed).standard_normal(x.shape), dtype),
        training=training, feature_axis=ax, count=count, dtype=dtype, eps=conv.eps, momentum=conv.momentum,
        id=f"identify/{cid}", convention=conv, expect_error=conv.rejects_batch(n, training=training),
    )


def _snap(value: float, candidates: Sequence[float], rel: float) -> float:
    for c in candidates:
        if c is not None and abs(value - c) <= rel * abs(c):
            return float(c)
    return float(f"{value:.4g}")


# -- the probes ------------------------------------------------------------------------------------


def _probe_dtype(adapter: Any, claim: Convention) -> str:
    x = np.random.default_rng(0).normal(0.0, 1.0, (8, 3))
    for dt in ("float32", "float64"):
        try:
            _call(adapter, _case(claim, x, rm=np.zeros(3), rv=np.ones(3), training=True, axis=1, dtype=dt))
            return dt
        except _Skipped:
            continue
    return "float32"


def _probe_axis(adapter: Any, claim: Convention, dtype: str) -> tuple[Finding, int, list[str]]:
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (4, 3, 2, 3)) * rng.uniform(0.5, 3.0, (1, 3, 1, 1)) + rng.normal(0, 2, (1, 3, 1, 1))
    x = x + rng.normal(0, 2, (1, 1, 1, 3))
    accepted: list[int] = []
    notes: list[str] = []
    unexplained: list[str] = []
    for ax in (1, -1):
        case = _case(claim, x, rm=np.zeros(3), rv=np.ones(3), training=True, axis=ax, dtype=dtype, cid=f"axis{ax}")
        try:
            y = _call(adapter, case)["y"]
        except _Skipped as exc:
            notes.append(f"axis {ax}: declined ({exc})")
            continue
        except Exception as exc:  # noqa: BLE001
            notes.append(f"axis {ax}: raised {type(exc).__name__}")
            continue
        errs = {}
        for other in (1, -1):
            e = oracle.forward(case.x, None, None, None, None, training=True, convention=claim, axis=other).y
            errs[other] = float(np.max(np.abs(y - e)) / (np.max(np.abs(e)) or 1.0))
        if errs[ax] < 1e-2:
            accepted.append(ax)
            notes.append(f"axis {ax}: normalizes over it")
        elif errs[-ax] < 1e-2:
            notes.append(f"axis {ax}: normalizes over axis {-ax} instead")
            unexplained.append(f"asked for feature axis {ax}, the implementation normalized over axis {-ax}")
        else:
            notes.append(f"axis {ax}: output matches neither axis (relative error {errs[ax]:.2g})")
    if claim.feature_axis % 4 in [a % 4 for a in accepted]:
        axis = claim.feature_axis
        how = "the claimed default; " if len(accepted) > 1 else ""
    elif accepted:
        axis = accepted[0]
        how = ""
    else:
        axis = claim.feature_axis
        return Finding("feature_axis", axis, "; ".join(notes) or "no axis accepted", probed=False), axis, unexplained
    if len(accepted) > 1:
        how += "takes the axis as a parameter: "
    return Finding("feature_axis", axis, how + "; ".join(notes)), axis, unexplained


def _probe_eps(adapter: Any, claim: Convention, dtype: str) -> tuple[Finding, list[str]]:
    unexplained: list[str] = []
    rng = np.random.default_rng(2)
    x = rng.uniform(0.5, 2.0, (4, 3)) * rng.choice([-1.0, 1.0], (4, 3))
    case = _case(claim, x, rm=np.zeros(3), rv=np.array([0.0, 0.0, 1.0]), training=False, axis=1, dtype=dtype, cid="eps-eval")
    try:
        y = _call(adapter, case)["y"]
    except _Skipped as exc:
        return Finding("eps", claim.eps, f"eval probe declined ({exc})", probed=False), unexplained
    with np.errstate(divide="ignore", invalid="ignore"):
        est = (case.x[:, :2] / y[:, :2]) ** 2
    eps_eval = float(np.median(est))
    spread = float(np.max(np.abs(est - eps_eval)) / eps_eval) if eps_eval > 0 else float("inf")
    rel = 1e-9 if dtype == "float64" else 1e-4
    if not (math.isfinite(eps_eval) and eps_eval > 0 and spread < 1e3 * rel):
        unexplained.append(f"eval with running variance 0 is not x / sqrt(eps): implied eps values {est[:, 0]} "
                           "(eval may be using batch statistics, spec §4)")
        return Finding("eps", claim.eps, "eval probe inconsistent (see below)", probed=False), unexplained
    eps = _snap(eps_eval, [claim.eps, 1e-5, 1e-3, 1e-12, 1e-4, 1e-6], 1e2 * rel)
    evidence = f"eval with running var 0: y = x/sqrt(eps) gives eps = {eps_eval:.6g}"
    # training: two channels of variance 1e-8 and 1e-6 around 0
    z = np.array([-1.0, 1.0, -1.0, 1.0]).reshape(4, 1)
    xt = np.concatenate([z * 1e-4, z * 1e-3, rng.normal(0, 1, (4, 1))], axis=1)
    tcase = _case(claim, xt, rm=np.zeros(3), rv=np.ones(3), training=True, axis=1, dtype=dtype, cid="eps-train")
    try:
        yt = _call(adapter, tcase)["y"]
        xc = tcase.x - tcase.x.mean(axis=0)
        var = (xc**2).mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            implied = (xc[:, :2] / yt[:, :2]) ** 2 - var[:2]
        i1, i2 = float(np.median(implied[:, 0])), float(np.median(implied[:, 1]))
        tol = 1e-3 if dtype == "float64" else 2e-2
        if abs(i1 - eps) > tol * eps or abs(i2 - eps) > tol * eps:
            unexplained.append(f"training does not normalize with 1/sqrt(biased batch variance + eps): the eps it implies is "
                               f"{i1:.4g} on a channel of variance 1e-8 and {i2:.4g} on one of 1e-6, eval gave {eps:.4g} "
                               "(eps outside the square root, or an unbiased variance in the normalization? spec §2.1, §2.2)")
        else:
            evidence += f"; training on variances 1e-8 and 1e-6 agrees ({i1:.4g}, {i2:.4g})"
    except _Skipped as exc:
        evidence += f"; training probe declined ({exc})"
    return Finding("eps", eps, evidence), unexplained


def _mean_step(adapter: Any, conv: Convention, dtype: str, count: int, axis: int, cid: str) -> tuple[float, float, float, dict, Case]:
    """One training step with independent running and batch means; returns (w_r, w_b, residual, out, case)."""
    rng = np.random.default_rng(3)
    mu = np.array([1.5, -0.5, 0.25])
    x = rng.normal(0.0, 1.0, (8, 3))
    x = (x - x.mean(0)) / x.std(0) * np.array([0.7, 1.3, 2.0]) + mu
    rm, rv = np.array([-1.0, 2.0, 0.5]), np.array([0.5, 1.5, 2.5])
    case = _case(conv, x, rm=rm, rv=rv, training=True, axis=1, dtype=dtype, count=count, cid=cid)
    out = _call(adapter, case)
    b = case.x.mean(axis=0)
    A = np.stack([case.running_mean, b], axis=1)
    sol, *_ = np.linalg.lstsq(A, out["running_mean"], rcond=None)
    resid = float(np.max(np.abs(A @ sol - out["running_mean"])))
    del axis
    return float(sol[0]), float(sol[1]), resid, out, case


def _probe_momentum(adapter: Any, claim: Convention, dtype: str) -> tuple[Finding, Finding, Finding, list[str]]:
    unexplained: list[str] = []
    tol = 1e-9 if dtype == "float64" else 1e-5
    conv = claim if claim.momentum is not None else dataclasses.replace(claim, momentum=0.1)
    try:
        w_r0, w_b0, res0, out0, case0 = _mean_step(adapter, conv, dtype, 0, 1, "momentum-count0")
    except _Skipped as exc:
        f = Finding("momentum", claim.momentum, f"training probe declined ({exc})", probed=False)
        return f, Finding("momentum_on", claim.momentum_on, "not probed", False), \
            Finding("running_var", claim.running_var, "not probed", False), unexplained
    ev = [f"step 1 (count 0): running mean = {w_r0:.6g} * old + {w_b0:.6g} * batch mean"]
    if res0 > 1e3 * tol or abs(w_r0 + w_b0 - 1.0) > 1e3 * tol:
        unexplained.append(f"the running mean is not a blend w_r * old + w_b * batch with w_r + w_b = 1 "
                           f"(w_r = {w_r0:.6g}, w_b = {w_b0:.6g}, residual {res0:.3g}; spec §3)")
    _, w_b5, _, _, _ = _mean_step(adapter, conv, dtype, 5, 1, "momentum-count5")
    ev.append(f"at count 5: w_b = {w_b5:.6g}")
    cumulative_default = abs(w_b0 - 1.0) < 1e2 * tol and abs(w_b5 - 1 / 6) < 1e2 * tol
    if cumulative_default:
        momentum: float | None = None
        term = claim.momentum_on
        ev.append("w_b = 1/(count + 1): the cumulative average (spec §3.3)")
    else:
        if abs(w_b5 - w_b0) > 1e2 * tol:
            unexplained.append(f"the batch weight depends on the step count ({w_b0:.6g} at count 0, {w_b5:.6g} at "
                               "count 5) but is not 1/(count + 1): no convention has it (a zero-debiased EMA? spec §9)")
        term = claim.momentum_on
        _, claim_wb = conv.update_weights(0)
        if abs(w_b0 - claim_wb) <= 1e2 * tol:
            ev.append(f"= the claimed momentum {conv.momentum} on the {conv.momentum_on} term")
        elif abs(w_b0 - (1 - claim_wb)) <= 1e2 * tol:
            term = "running" if conv.momentum_on == "batch" else "batch"
            ev.append(f"the claimed momentum {conv.momentum} weights the {term} term, not the {conv.momentum_on} one")
        # a second momentum tells which term the given number weights, or that it is ignored
        probe = dataclasses.replace(conv, momentum=0.3)
        try:
            _, w_b3, _, _, _ = _mean_step(adapter, probe, dtype, 0, 1, "momentum-0.3")
            expect = probe.update_weights(0)[1]
            if abs(w_b3 - expect) <= 1e2 * tol:
                ev.append(f"momentum 0.3 (as {conv.momentum_on}-term momentum) gives w_b = {w_b3:.6g}: "
                          f"weights the {conv.momentum_on} term")
                if term != conv.momentum_on:
                    unexplained.append("the momentum weights the claimed term at 0.3 but not at the default")
            elif abs(w_b3 - (1 - expect)) <= 1e2 * tol:
                other = "running" if conv.momentum_on == "batch" else "batch"
                ev.append(f"momentum 0.3 gives w_b = {w_b3:.6g}: the given number weights the {other} term")
                term = other
            elif abs(w_b3 - w_b0) <= 1e2 * tol:
                ev.append(f"momentum 0.3 gives the same w_b = {w_b3:.6g}: the momentum argument is ignored")
                unexplained.append(f"the implementation ignores the momentum it is given (fixed batch weight {w_b0:.6g})")
            else:
                ev.append(f"momentum 0.3 gives w_b = {w_b3:.6g}, neither 0.3 nor 0.7")
                unexplained.append(f"momentum 0.3 gives the batch weight {w_b3:.6g}, neither 0.3 nor 0.7")
        except _Skipped as exc:
            ev.append(f"momentum 0.3 declined ({exc})")
        m = w_b0 if term == "batch" else 1.0 - w_b0
        momentum = _snap(m, [claim.momentum_spelled(term) if claim.momentum is not None else None, 0.1, 0.9, 0.99, 0.01],
                         1e2 * tol)
    # the estimator factor from the same step (§3.4)
    n = case0.x.shape[0]
    var_b = case0.x.var(axis=0)
    if cumulative_default:
        w_r0, w_b0 = 0.0, 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (out0["running_var"] - w_r0 * case0.running_var) / (w_b0 * var_b)
    c_med = float(np.median(c))
    if abs(c_med - n / (n - 1)) <= 1e-3:
        est, est_ev = "unbiased", f"stored variance = {c_med:.6g} x biased batch variance = n/(n-1) for n = {n}"
    elif abs(c_med - 1.0) <= 1e-3:
        est, est_ev = "biased", f"stored variance = {c_med:.6g} x biased batch variance (n = {n}): biased"
    else:
        est, est_ev = claim.running_var, f"stored variance = {c_med:.6g} x biased batch variance at n = {n}"
        unexplained.append(f"the running variance is fed {c_med:.6g} x the biased batch variance at n = {n}, neither 1 "
                           f"nor n/(n-1) = {n / (n - 1):.6g} (spec §3.4)")
    return (Finding("momentum", momentum, "; ".join(ev)), Finding("momentum_on", term, "see momentum"),
            Finding("running_var", est, est_ev), unexplained)


def _probe_cumulative(adapter: Any, claim: Convention, dtype: str) -> Finding:
    conv = dataclasses.replace(claim, momentum=None)
    tol = 1e-9 if dtype == "float64" else 1e-5
    try:
        _, w_b, _, _, _ = _mean_step(adapter, conv, dtype, 3, 1, "cumulative")
    except _Skipped as exc:
        return Finding("cumulative", "no", f"momentum=None declined ({exc})")
    except Exception as exc:  # noqa: BLE001
        return Finding("cumulative", "no", f"momentum=None raised {type(exc).__name__}: {str(exc)[:80]}")
    if abs(w_b - 0.25) <= 1e2 * tol:
        return Finding("cumulative", "yes", "momentum=None at count 3 weights the batch 1/4 (spec §3.3)")
    return Finding("cumulative", "no", f"momentum=None at count 3 weights the batch {w_b:.6g}, not 1/4")


def _probe_single(adapter: Any, claim: Convention, dtype: str) -> tuple[Finding, list[str]]:
    x = np.array([[0.7, -1.2, 3.0]])
    beta = np.array([0.25, -0.5, 0.125])
    case = _case(claim, x, rm=np.zeros(3), rv=np.ones(3), training=True, axis=1, dtype=dtype, beta=beta, cid="n1")
    try:
        out = _call(adapter, case)
    except _Skipped as exc:
        return Finding("single_value", claim.single_value, f"n = 1 declined ({exc})", probed=False), []
    except Exception as exc:  # noqa: BLE001
        return Finding("single_value", "error", f"training on n = 1 raises {type(exc).__name__}"), []
    y = out["y"]
    if np.allclose(y, case.beta, rtol=1e-3, atol=1e-6):
        return Finding("single_value", "allow", "training on n = 1 returns beta (var = 0)"), []
    return (Finding("single_value", claim.single_value, f"training on n = 1 returns {y.ravel()}", probed=False),
            [f"training on n = 1 returns {y.ravel()} rather than raising or returning beta (spec §7.1)"])


def _probe_variance(adapter: Any, claim: Convention, conv: Convention) -> Finding:
    """Drive with the claim (as the harness does), judge with the identified convention ``conv``."""
    rng = np.random.default_rng(0)
    x = 1000.0 + 0.01 * rng.standard_normal((64, 3))
    for dt in ("float32", "float64"):
        xx = x if dt == "float32" else 1e8 + 0.1 * rng.standard_normal((64, 3))
        case = _case(claim, xx, rm=np.zeros(3), rv=np.ones(3), training=True, axis=1, dtype=dt, cid=f"large-mean-{dt}")
        try:
            y = _call(adapter, case)["y"]
        except _Skipped:
            continue
        e = oracle.forward(case.x, case.gamma, case.beta, case.running_mean, case.running_var, training=True,
                           convention=conv, axis=1)
        kappa = oracle.condition_number(case.x, convention=conv, axis=1)
        units = error_units(y, e.y, dt, kappa=kappa)
        true_var = float(e.batch_var.min())
        with np.errstate(divide="ignore", invalid="ignore"):
            implied = (np.std(case.x, axis=0) / np.std(y, axis=0)) ** 2 - conv.eps
        if units <= 1.0:
            return Finding("variance", "two-pass",
                           f"large-mean {dt} probe (mean {case.x.mean():.3g}, var {true_var:.3g}): y within "
                           f"{units:.3g} x the spec §8.4 bound (two-pass, Welford or equivalent, spec §8.1)")
        return Finding("variance", "one-pass",
                       f"large-mean {dt} probe: y off by {units:.3g} x the §8.4 bound; the batch variance implied by y "
                       f"is {', '.join(f'{v:.3g}' for v in implied)} against the true {true_var:.3g}: "
                       "E[x^2] - E[x]^2 cancels (spec §8.2)")
    return Finding("variance", "unknown", "large-mean probe declined in float32 and float64", probed=False)


def _sequence_check(adapter: Any, claim: Convention, conv: Convention, dtype: str, axis: int) -> list[str]:
    """Three training steps and eval on rank-4 data, driven with the claim, against the oracle under ``conv``."""
    rng = np.random.default_rng(4)
    shape = (3, 3, 4, 2) if axis % 4 == 1 else (3, 4, 2, 3)
    cax = axis % 4
    rm, rv = np.zeros(3), np.ones(3)
    gamma = 1 + 0.3 * rng.standard_normal(3)
    beta = 0.2 * rng.standard_normal(3)
    problems: list[str] = []
    for k, training in enumerate((True, True, True, False)):
        x = rng.normal(0.5, 2.0, shape)
        case = _case(claim, x, rm=rm, rv=rv, training=training, axis=cax, dtype=dtype, count=k if training else 3,
                     gamma=gamma, beta=beta, cid=f"sequence{k}")
        try:
            out = _call(adapter, case)
        except _Skipped as exc:
            problems.append(f"sequence step {k} declined ({exc})") if k == 0 else None
            return []
        e = oracle.forward(case.x, case.gamma, case.beta, case.running_mean, case.running_var, training=training,
                           convention=conv, axis=cax, count=case.count)
        kappa = oracle.condition_number(case.x, convention=conv, axis=cax)
        for key, exp in (("y", e.y), ("running_mean", e.running_mean), ("running_var", e.running_var)):
            if key in out:
                u = error_units(out[key], exp, dtype, kappa=kappa)
                if not u <= 1.0:
                    problems.append(f"{'training' if training else 'eval'} step {k}: {key} differs from the oracle under "
                                    f"the identified convention by {u:.3g} x the §8.4 bound")
        rm, rv = out.get("running_mean", e.running_mean), out.get("running_var", e.running_var)
    return problems


_FIELDS = ("eps", "momentum", "running_var", "feature_axis", "single_value")


def _differences(conv: Convention, p: Convention) -> list[str]:
    d: list[str] = []
    if not math.isclose(conv.eps, p.eps, rel_tol=1e-6):
        d.append(f"eps {conv.eps:g} vs {p.eps:g}")
    w_c = None if conv.momentum is None else conv.update_weights(0)[1]
    w_p = None if p.momentum is None else p.update_weights(0)[1]
    if (w_c is None) != (w_p is None) or (w_c is not None and w_p is not None and not math.isclose(w_c, w_p, rel_tol=1e-6)):
        d.append(f"batch weight {w_c if w_c is None else round(w_c, 6)} vs {w_p if w_p is None else round(w_p, 6)} "
                 f"({p.name}: momentum {p.momentum} on the {p.momentum_on} term)")
    if conv.running_var != p.running_var:
        d.append(f"running variance {conv.running_var} vs {p.running_var}")
    if (conv.feature_axis == 1) != (p.feature_axis == 1):
        d.append(f"feature axis {conv.feature_axis} vs {p.feature_axis}")
    if conv.single_value != p.single_value:
        d.append(f"n = 1 {conv.single_value} vs {p.single_value}")
    return d


def closest_presets(conv: Convention) -> tuple[list[str], dict[str, list[str]]]:
    """The presets with the fewest differing fields, and the differences for every preset.

    Momentum is compared as the batch weight (so ``0.1`` on the batch term equals ``0.9`` on the
    running term, spec §3.5); the feature axis by its meaning (1 or last)."""
    diffs = {name: _differences(conv, p) for name, p in PRESETS.items()}
    best = min(len(d) for d in diffs.values())
    return [n for n, d in diffs.items() if len(d) == best], diffs


def identify(adapter: Any, *, check_float64: bool = True) -> Identification:
    """Probe ``adapter`` (the contract of ``docs/adapters.md``) and return its :class:`Identification`.

    The probes run in float32 (float64 when the adapter declines float32). ``check_float64``: also
    run the closing sequence in float64 and report whether the results carry float64 accuracy (a
    precision finding, never a convention difference)."""
    claim: Convention = adapter.convention
    unexplained: list[str] = []

    def guarded(what: str, fn: Any, fallback: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - an implementation that raises on a valid probe
            unexplained.append(f"the {what} probe raised {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
            return fallback

    dtype = _probe_dtype(adapter, claim)
    f_axis, axis, u = guarded("feature-axis", lambda: _probe_axis(adapter, claim, dtype),
                              (Finding("feature_axis", claim.feature_axis, "probe raised", False), claim.feature_axis, []))
    unexplained += u
    f_eps, u = guarded("eps", lambda: _probe_eps(adapter, claim, dtype),
                       (Finding("eps", claim.eps, "probe raised", False), []))
    unexplained += u
    f_m, f_on, f_rv, u = guarded("momentum", lambda: _probe_momentum(adapter, claim, dtype), (
        Finding("momentum", claim.momentum, "probe raised", False), Finding("momentum_on", claim.momentum_on, "", False),
        Finding("running_var", claim.running_var, "probe raised", False), []))
    unexplained += u
    f_cum = _probe_cumulative(adapter, claim, dtype)
    f_n1, u = _probe_single(adapter, claim, dtype)
    unexplained += u
    conv = Convention(f"identified:{getattr(adapter, 'name', type(adapter).__name__)}", f_eps.value, f_m.value,
                      f_on.value, f_rv.value, f_axis.value, f_n1.value)
    f_var = guarded("large-mean", lambda: _probe_variance(adapter, claim, conv),
                    Finding("variance", "unknown", "probe raised", False))
    if f_var.value == "one-pass":
        unexplained.append("one-pass variance E[x^2] - E[x]^2: no convention computes it (spec §8.2); it agrees with "
                           "the conventions only on well-conditioned data")
    f_64 = None
    if not unexplained:
        unexplained += guarded("sequence", lambda: _sequence_check(adapter, claim, conv, dtype, axis), [])
        if check_float64 and not unexplained and dtype != "float64":
            p64 = guarded("float64 sequence", lambda: _sequence_check(adapter, claim, conv, "float64", axis), [])
            worst = max((float(t.split(" by ")[1].split(" x")[0]) for t in p64 if " by " in t), default=0.0)
            f_64 = Finding("float64", "float64" if not p64 else "not float64",
                           "a float64 sequence matches the oracle to the float64 bound" if not p64 else
                           f"a float64 sequence is off by up to {worst:.3g} x the float64 bound: it computes (or "
                           "stores a constant) in lower precision; a precision matter, not a convention")
    findings = {f.field: f for f in (f_eps, f_m, f_on, f_rv, f_axis, f_n1, f_var, f_64) if f is not None}
    closest, diffs = closest_presets(conv)
    return Identification(getattr(adapter, "name", type(adapter).__name__), claim, conv, findings, closest, diffs,
                          unexplained, f_cum, _differences(conv, claim))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bn_ref.conformance.identify --adapter mod:factory``: print each adapter's identification.

    Exit status 0 when every adapter is explained by a convention, 1 when some behaviour is not,
    2 on a usage error (an adapter that cannot be loaded)."""
    from .adapters import load

    p = argparse.ArgumentParser(prog="python -m bn_ref.conformance identify",
                                description="Probe a BN implementation and print the Convention it follows.")
    p.add_argument("--adapter", action="append", required=True, metavar="MOD:FACTORY",
                   help="an adapter factory (docs/adapters.md); repeatable")
    p.add_argument("-k", dest="select", help="only adapters whose name contains this text")
    args = p.parse_args(argv)
    status = 0
    for spec in args.adapter:
        loaded = load(spec)
        if loaded.error or loaded.skip:
            print(f"{spec}: {loaded.error or loaded.skip}")
            status = max(status, 2 if loaded.error else status)
            continue
        for a in loaded.adapters:
            if args.select and args.select not in getattr(a, "name", ""):
                continue
            if getattr(a, "world_size", None) or getattr(a, "unavailable", None):
                print(f"{a.name}: skipped (distributed or unavailable adapter)\n")
                continue
            ident = identify(a)
            print(ident)
            print()
            if not ident.explained:
                status = max(status, 1)
            close = getattr(a, "close", None)
            if close is not None:
                close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
