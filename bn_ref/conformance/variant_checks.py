"""The ``variants`` check group: BN variants (``docs/spec.md`` §13-§17) against :mod:`bn_ref.variants`.

A case of :data:`~bn_ref.conformance.cases.VARIANTS` names a :class:`~bn_ref.variants.Variant`.
It runs only on adapters that declare the capability ``variant_skip(case) -> str | None`` (None:
the adapter runs the case through its ordinary ``run``; a string: it cannot express the variant,
and every step is *skipped (not supported: ...)*). An adapter without ``variant_skip`` is skipped
the same way, so the contract stays backward compatible. An adapter may also declare
``variant_raises(case) -> str | None``: the framework is known to raise on this case (a finding
the row records); the check then passes only if ``run`` does raise.

Like the plain engine, every step is checked on its own (one-step semantics): the expected values
are :func:`bn_ref.variants.forward` / :func:`~bn_ref.variants.backward` in float64 on exactly the
inputs the adapter was given, the adapter's own state (running pair, renorm correction pair) is fed
to the next step, and every output is judged with the per-element bound of §8.4
(:func:`bn_ref.tolerances.element_bounds`) applied to the plain BN the variant reduces to:

* frozen / eval / tracking off: plain BN on the running (batch) statistics;
* renorm (§13.2): plain BN with scale ``gamma * r`` and shift ``gamma * d + beta``, plus the
  rounding of ``r`` and ``d`` themselves; ``dgamma = r * sum(dy x_hat) + d * sum(dy)`` is bounded
  term by term; the correction pair like a running pair with the ``renorm_momentum`` weights;
* ghost batches (§14): the bound of each sub-batch, concatenated (y, dx) or summed (dgamma, dbeta,
  running statistics).

A precise-BN case (tag ``precise``) adds one whole-sequence check after its last step: the
adapter's final running statistics against :func:`bn_ref.variants.precise_statistics` of the
batches it was given (§16.2), bounded by the sum of the per-step running bounds.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import numpy as np

from .. import oracle, variants
from ..tolerances import accumulation_dtype, element_bounds, tolerance
from .cases import Case

__all__ = ["VARIANT_KEYS", "check_variant_steps", "expected_outputs", "variant_bounds", "supports"]

VARIANT_KEYS = ("y", "running_mean", "running_var", "renorm_mean", "renorm_stat", "dx", "dgamma", "dbeta")
"""What ``run`` may return for a variant case (``renorm_*``: the correction pair after the step)."""

_C = 4.0  # headroom on the extra rounding terms of r, d and the stddev pair (cf. C_ELEM of §8.4)


def supports(adapter: Any, case: Case) -> str | None:
    """None when ``adapter`` runs the variant ``case``; else the skip message ("not supported: ...")."""
    fn = getattr(adapter, "variant_skip", None)
    if not callable(fn):
        return "not supported: the adapter declares no variant capability (variant_skip)"
    reason = fn(case)
    return None if reason is None else f"not supported: {reason}"


def expected_outputs(case: Case) -> tuple[dict[str, Any], variants.VariantResult]:
    """The float64 reference of one step: ``{key: array or None}`` and the oracle's forward result."""
    v = case.variant
    conv = case.convention
    ax = case.feature_axis
    res = variants.forward(case.x, case.gamma, case.beta, case.running_mean, case.running_var,
                           training=case.training, convention=conv, variant=v, axis=ax, count=case.count,
                           renorm_mean=case.renorm_mean, renorm_stat=case.renorm_stat)
    dx = dg = db = None
    if case.dy is not None:
        dx, dg, db = variants.backward(case.dy, case.x, case.gamma, case.running_mean, case.running_var,
                                       training=case.training, convention=conv, variant=v, axis=ax, r=res.r, d=res.d)
    exp: dict[str, Any] = {"y": res.y, "running_mean": res.running_mean, "running_var": res.running_var,
                           "renorm_mean": None, "renorm_stat": None, "dx": dx, "dgamma": dg,
                           "dbeta": db if case.beta is not None else None}
    if v.renorm:  # the pair after a training step; unchanged by eval
        exp["renorm_mean"] = res.renorm_mean if res.renorm_mean is not None else case.renorm_mean
        exp["renorm_stat"] = res.renorm_stat if res.renorm_stat is not None else case.renorm_stat
    return exp, res


def _plain_bounds(case: Case, x: np.ndarray, exp: dict[str, Any], judge: str, *, training: bool, gamma: Any,
                  beta: Any, rm: Any, rv: Any, dy: Any, count: int) -> dict[str, np.ndarray]:
    conv = case.convention
    n = int(x.size // x.shape[case.feature_axis])
    return element_bounds(
        x, expected={k: v for k, v in exp.items() if v is not None}, dtype=judge, training=training, eps=case.eps,
        axis=case.feature_axis, gamma=gamma, beta=beta, running_mean=rm, running_var=rv, dy=dy,
        update_weights=conv.update_weights(count) if training else (1.0, 0.0),
        variance_correction=conv.variance_correction(n))


def variant_bounds(case: Case, exp: dict[str, Any], res: variants.VariantResult, judge: str) -> dict[str, np.ndarray]:
    """The per-element bound of every expected output of one variant step (see the module doc)."""
    v = case.variant
    plain = {k: exp[k] for k in ("y", "running_mean", "running_var", "dx", "dgamma", "dbeta")}
    if not v.track_running_stats:
        return _plain_bounds(case, case.x, plain, judge, training=True, gamma=case.gamma, beta=case.beta,
                             rm=None, rv=None, dy=case.dy, count=case.count)
    if v.frozen != "no" or not case.training:
        out = _plain_bounds(case, case.x, plain, judge, training=False, gamma=case.gamma, beta=case.beta,
                            rm=case.running_mean, rv=case.running_var, dy=case.dy, count=case.count)
        u_a = tolerance(accumulation_dtype(judge)).u
        for k in ("renorm_mean", "renorm_stat"):  # unchanged by eval: its own rounding only
            if exp[k] is not None:
                out[k] = u_a * np.abs(np.asarray(exp[k], np.float64)) + 1e-300
        return out
    if v.ghost_batch_size is not None:
        return _ghost_bounds(case, plain, judge)
    if v.renorm:
        return _renorm_bounds(case, exp, res, judge)
    return _plain_bounds(case, case.x, plain, judge, training=True, gamma=case.gamma, beta=case.beta,
                         rm=case.running_mean, rv=case.running_var, dy=case.dy, count=case.count)


def _ghost_bounds(case: Case, plain: dict[str, Any], judge: str) -> dict[str, np.ndarray]:
    v, conv, ax = case.variant, case.convention, case.feature_axis
    size = int(v.ghost_batch_size)
    parts = [slice(i, min(i + size, case.x.shape[0])) for i in range(0, case.x.shape[0], size)]
    ys, dxs = [], []
    sums: dict[str, np.ndarray] = {}
    rm: Any = case.running_mean
    rv: Any = case.running_var
    count = case.count
    for sl in parts:
        xs = case.x[sl]
        dys = None if case.dy is None else case.dy[sl]
        ref = oracle.forward(xs, case.gamma, case.beta, rm, rv, training=True, convention=conv, axis=ax, count=count)
        e: dict[str, Any] = {"y": ref.y, "running_mean": ref.running_mean, "running_var": ref.running_var}
        if dys is not None:
            e["dx"], e["dgamma"], e["dbeta"] = oracle.backward(dys, xs, case.gamma, training=True, convention=conv,
                                                               axis=ax)
            if case.beta is None:
                e["dbeta"] = None
        b = _plain_bounds(case, xs, e, judge, training=True, gamma=case.gamma, beta=case.beta, rm=rm, rv=rv,
                          dy=dys, count=count)
        ys.append(b["y"])
        if "dx" in b:
            dxs.append(b["dx"])
        for k in ("dgamma", "dbeta", "running_mean", "running_var"):
            if k in b:
                sums[k] = sums.get(k, 0.0) + b[k]
        if v.ghost_update == "sequential":
            rm, rv, count = ref.running_mean, ref.running_var, ref.count
    out = dict(sums)
    out["y"] = np.concatenate(ys, axis=0)
    if dxs:
        out["dx"] = np.concatenate(dxs, axis=0)
    return {k: b for k, b in out.items() if plain.get(k) is not None}


def _renorm_bounds(case: Case, exp: dict[str, Any], res: variants.VariantResult, judge: str) -> dict[str, np.ndarray]:
    v, conv, ax = case.variant, case.convention, case.feature_axis
    r, d = np.asarray(res.r, np.float64), np.asarray(res.d, np.float64)
    c = r.shape[0]
    g = np.ones(c) if case.gamma is None else np.asarray(case.gamma, np.float64)
    b0 = np.zeros(c) if case.beta is None else np.asarray(case.beta, np.float64)
    geff, beff = g * r, g * d + b0
    dx_p = dg_p = db_p = None
    if case.dy is not None:
        dx_p, dg_p, db_p = oracle.backward(case.dy, case.x, geff, training=True, convention=conv, axis=ax)
    plain = {"y": exp["y"], "running_mean": exp["running_mean"], "running_var": exp["running_var"],
             "dx": dx_p, "dgamma": dg_p, "dbeta": db_p}
    out = _plain_bounds(case, case.x, plain, judge, training=True, gamma=geff, beta=beff,
                        rm=case.running_mean, rv=case.running_var, dy=case.dy, count=case.count)
    u_t, u_a = tolerance(judge).u, tolerance(accumulation_dtype(judge)).u
    mean, var = oracle._batch_stats(case.x, _layout(case))[0::2]
    s_b = np.sqrt(var + case.eps)
    rmu = np.asarray(case.renorm_mean, np.float64)
    sigma = _sigma(case)
    bsh = tuple(-1 if i == ax else 1 for i in range(case.x.ndim))
    xh = (case.x - mean.reshape(bsh)) / s_b.reshape(bsh)
    # r = s_B / sigma and d = (mu_B - mu~) / sigma are themselves rounded (a few u_A each, relative to
    # |r| and to (|mu_B| + |mu~|) / sigma): their effect on y = gamma (x_hat r + d) + beta.
    dr = _C * u_a * r
    dd = _C * u_a * (np.abs(d) + (np.abs(mean) + np.abs(rmu)) / sigma)
    out["y"] = out["y"] + np.abs(g).reshape(bsh) * (np.abs(xh) * dr.reshape(bsh) + dd.reshape(bsh))
    if case.dy is not None:
        out["dx"] = out["dx"] + _C * u_a * np.abs(np.asarray(dx_p))
        if exp["dgamma"] is not None:
            # dgamma = r * sum(dy x_hat) + d * sum(dy): the plain bounds of both sums, scaled; r and d's rounding.
            ed = {"dgamma": oracle.backward(case.dy, case.x, g, training=True, convention=conv, axis=ax)[1],
                  "dbeta": db_p}
            bd = _plain_bounds(case, case.x, ed, judge, training=True, gamma=g, beta=b0, rm=None, rv=None,
                               dy=case.dy, count=case.count)
            sdy = np.abs(np.asarray(db_p))
            sxh = np.abs(np.asarray(ed["dgamma"]))
            out["dgamma"] = (np.abs(r) * bd["dgamma"] + np.abs(d) * bd["dbeta"] + dr * sxh + dd * sdy
                             + u_t * np.abs(np.asarray(exp["dgamma"])))
        if exp["dbeta"] is None:
            out.pop("dbeta", None)
    # The correction pair: a running pair with the renorm_momentum weights (§13.3).
    m = conv.momentum if v.renorm_momentum is None else v.renorm_momentum
    v_r, v_b = dataclasses.replace(conv, momentum=m).update_weights(case.count)
    n = int(case.x.size // case.x.shape[ax])
    pair_exp = {"running_mean": exp["renorm_mean"]}
    var_only = _plain_bounds(case, case.x, {"running_var": var * conv.variance_correction(n)}, judge, training=True,
                             gamma=g, beta=b0, rm=np.zeros(c), rv=np.zeros(c), dy=None, count=case.count)
    if v.renorm_track == "variance":
        pair_exp["running_var"] = exp["renorm_stat"]
    pb = element_bounds(case.x, expected=pair_exp, dtype=judge, training=True, eps=case.eps, axis=ax,
                        gamma=g, beta=b0, running_mean=rmu, running_var=case.renorm_stat, dy=None,
                        update_weights=(v_r, v_b), variance_correction=conv.variance_correction(n))
    out["renorm_mean"] = pb["running_mean"]
    if v.renorm_track == "variance":
        out["renorm_stat"] = pb["running_var"]
    else:
        old = np.abs(np.asarray(case.renorm_stat, np.float64))
        # s_B = sqrt(var + eps): the error of var (bounded as a batch variance fed with weight 1,
        # var_only) halves relative to s_B; then the update's own rounding.
        out["renorm_stat"] = (float(v_b) * var_only["running_var"] / (2.0 * s_b)
                              + _C * u_a * (float(v_r) * old + float(v_b) * s_b)
                              + u_t * np.abs(np.asarray(exp["renorm_stat"])))
    return {k: bnd for k, bnd in out.items() if exp.get(k) is not None}


def _layout(case: Case) -> Any:
    from .._checks import layout

    return layout(case.x.shape, case.feature_axis)


def _sigma(case: Case) -> np.ndarray:
    """The correction pair's stddev the step divides by (§13.1)."""
    stat = np.asarray(case.renorm_stat, np.float64)
    if case.variant.renorm_track == "variance":
        return np.sqrt(stat + case.eps)
    return np.maximum(stat, math.sqrt(case.eps))


def check_variant_steps(adapter: Any, name: str, spec_id: str, cases: Sequence[Case]) -> list:
    """Run one variant case (all its steps) on one adapter; return its check results (group ``variants``)."""
    from .engine import CheckResult, _compare, _private_copy, _short, _where, adapter_skip, compute_dtype

    res: list[CheckResult] = []
    first = cases[0]
    rm, rv, count = first.running_mean, first.running_var, first.count
    rmu, rstat = first.renorm_mean, first.renorm_stat
    precise_batches: list[np.ndarray] = []
    precise_bound: np.ndarray | None = None
    for proto in cases:
        case = dataclasses.replace(proto, running_mean=rm, running_var=rv, count=count,
                                   renorm_mean=rmu, renorm_stat=rstat)
        base: dict[str, Any] = {"adapter": name, "case": spec_id, "step": case.id}
        try:
            reason = adapter_skip(adapter, case) or supports(adapter, case)
            raises = getattr(adapter, "variant_raises", None)
            declared = raises(case) if callable(raises) and reason is None else None
        except Exception as exc:  # noqa: BLE001 - a failing capability query is the case's error
            res.append(CheckResult(**base, group="variants", key="run", status="error", message=_short(exc)))
            return res
        if reason is not None:
            res.append(CheckResult(**base, group="case", key="*", status="skip", message=reason))
            return res
        if declared is not None:
            try:
                adapter.run(_private_copy_variant(case, _private_copy))
            except Exception as exc:  # noqa: BLE001 - the declared outcome
                res.append(CheckResult(**base, group="variants", key="raises", status="pass",
                                       message=f"raised {_short(exc)}, as the adapter declares: {declared}"))
            else:
                res.append(CheckResult(**base, group="variants", key="raises", status="fail",
                                       message=f"the adapter declares a raise ({declared}) but run returned normally"))
            return res
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out = adapter.run(_private_copy_variant(case, _private_copy))
            if not isinstance(out, dict):
                raise TypeError(f"run(case) must return a dict, got {type(out).__name__}")
        except Exception as exc:  # noqa: BLE001
            res.append(CheckResult(**base, group="variants", key="run", status="error", message=_short(exc) + _where(exc)))
            return res
        unknown = set(out) - set(VARIANT_KEYS)
        if unknown:
            res.append(CheckResult(**base, group="variants", key="keys", status="fail",
                                   message=f"run(case) returned unknown keys {sorted(unknown)}; allowed: {VARIANT_KEYS}"))
        judge = compute_dtype(adapter, case)
        with np.errstate(all="ignore"):
            exp, ref = expected_outputs(case)
            bounds = variant_bounds(case, exp, ref, judge)
        for key in VARIANT_KEYS:
            if key in ("dx", "dgamma", "dbeta") and case.dy is None:
                continue
            kdt = judge if key in ("y", "dx") else accumulation_dtype(judge)
            _compare(res, base, "variants", key, out.get(key), exp[key], case, bounds.get(key), kdt)
        if "precise" in case.spec_id or "precise" in spec_id:
            precise_batches.append(case.x)
            if bounds.get("running_var") is not None:
                pb = np.maximum(bounds["running_mean"], 0), np.maximum(bounds["running_var"], 0)
                precise_bound = np.stack(pb) if precise_bound is None else precise_bound + np.stack(pb)

        rm, rv = _fed(out, "running_mean", exp), _fed(out, "running_var", exp)
        if exp["renorm_mean"] is not None:
            rmu, rstat = _fed(out, "renorm_mean", exp), _fed(out, "renorm_stat", exp)
        count = ref.count
    if precise_batches and precise_bound is not None and rm is not None:
        pm, pv = variants.precise_statistics(precise_batches, convention=cases[0].convention,
                                             axis=cases[0].feature_axis)
        base = {"adapter": name, "case": spec_id, "step": f"{spec_id}/precise"}
        judge = accumulation_dtype(compute_dtype(adapter, cases[0]))
        _compare(res, base, "variants", "running_mean", rm, pm, cases[0], precise_bound[0], judge)
        _compare(res, base, "variants", "running_var", rv, pv, cases[0], precise_bound[1], judge)
    return res


def _fed(out: dict[str, Any], key: str, exp: dict[str, Any]) -> Any:
    """The state the next step starts from: the adapter's own, the reference's when it returned none."""
    a = out.get(key)
    if a is None or exp[key] is None:  # none returned, or none exists (tracking off): the reference's
        return exp[key]
    return np.asarray(a, dtype=np.float64).reshape(-1)


def _private_copy_variant(case: Case, private_copy: Any) -> Case:
    c = private_copy(case)
    return dataclasses.replace(c, **{k: (None if getattr(case, k) is None else np.array(getattr(case, k), copy=True))
                                     for k in ("renorm_mean", "renorm_stat")})
