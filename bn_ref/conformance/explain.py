"""Failures that explain themselves: the ratio to the oracle and the convention field to blame.

While the engine runs an adapter, :class:`Recorder` keeps the inputs and outputs of every
catalogue step. For each failing step :func:`explain_step` then re-runs the comparison under the
*neighbouring conventions* of the adapter's own (:func:`neighbours`): momentum on the other term
(§3.1/§3.2), ``momentum=None`` (§3.3), the other running-variance estimator (§3.4), eps ×10 and
÷10 and the presets' eps values (§2.2), and the other feature axis. The first neighbour under
which every failing check of the step passes is the finding: "the adapter behaves as if
``momentum_on='running'``". The comparison is the engine's own (:func:`.engine.check_steps`), so
"passes" means exactly what it means in the matrix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..conventions import PRESETS, Convention
from .cases import Case
from .engine import CheckResult, check_steps

__all__ = ["Explanation", "Recorder", "neighbours", "explain_step", "ratio_to_oracle", "explain_failures"]


@dataclass(frozen=True)
class Explanation:
    """Why one step failed: the neighbouring convention under which it passes, if any."""

    step: str
    keys: tuple[str, ...]  # the failing checks of the step
    field: str | None  # e.g. "momentum_on='running'"; None when no neighbour explains the step


def _snapshot(case: Case) -> Case:
    arrays: dict[str, Any] = {
        k: None if getattr(case, k) is None else np.array(getattr(case, k), dtype=np.float64, copy=True)
        for k in ("x", "gamma", "beta", "running_mean", "running_var", "dy")
    }
    return dataclasses.replace(case, **arrays)


class Recorder:
    """Wraps an adapter; keeps ``(case, outputs)`` of every catalogue step it runs (not the random ones)."""

    def __init__(self, adapter: Any) -> None:
        self._adapter = adapter
        self.steps: dict[str, tuple[Case, dict[str, Any]]] = {}

    def __getattr__(self, name: str) -> Any:  # name, convention, skip, world_size, close, ...
        return getattr(self._adapter, name)

    def run(self, case: Case) -> Any:
        before = _snapshot(case)
        out = self._adapter.run(case)
        if isinstance(out, dict) and not case.id.startswith("random-"):
            kept: dict[str, Any] = {}
            for k, v in out.items():
                try:
                    kept[k] = None if v is None else _to_numpy(v)
                except Exception:  # noqa: BLE001 - the engine reports it; nothing to explain
                    kept[k] = v
            self.steps[case.id] = (before, kept)
        return out


def _to_numpy(v: Any) -> np.ndarray:
    from .adapters.base import numpy_out

    a = numpy_out(v)
    assert a is not None
    return a


def neighbours(conv: Convention, feature_axis: int, ndim: int) -> list[tuple[str, Convention, int]]:
    """``(label, convention, feature_axis)`` for each convention one field away from ``conv``.

    >>> from bn_ref.conventions import PRESETS
    >>> [label for label, _, _ in neighbours(PRESETS["pytorch"], 1, 4)][:3]
    ["momentum_on='running'", 'momentum=None', "running_var='biased'"]
    """
    out: list[tuple[str, Convention, int]] = []

    def add(label: str, axis: int = feature_axis, **change: Any) -> None:
        try:
            out.append((label, dataclasses.replace(conv, **change), axis))
        except (TypeError, ValueError):
            pass

    if conv.momentum is not None:
        other = "running" if conv.momentum_on == "batch" else "batch"
        add(f"momentum_on={other!r}", momentum_on=other)
        add("momentum=None", momentum=None)
    other_var = "biased" if conv.running_var == "unbiased" else "unbiased"
    add(f"running_var={other_var!r}", running_var=other_var)
    eps_values = [conv.eps * 10, conv.eps / 10] + sorted({p.eps for p in PRESETS.values()})
    seen = {conv.eps}
    for eps in eps_values:
        if not any(np.isclose(eps, s, rtol=1e-9, atol=0) for s in seen):
            seen.add(eps)
            add(f"eps={eps:g}", eps=eps)
    if ndim > 2:
        other_axis = ndim - 1 if feature_axis == 1 else 1
        if other_axis != feature_axis:
            add(f"feature axis {other_axis} (not {feature_axis})", axis=other_axis)
    return out


class _Replay:
    """An adapter that returns recorded outputs (to judge them against another convention)."""

    def __init__(self, name: str, convention: Convention, out: dict[str, Any]) -> None:
        self.name, self.convention, self._out = name, convention, out

    def run(self, case: Case) -> dict[str, Any]:
        return dict(self._out)


def explain_step(name: str, case: Case, out: dict[str, Any], failing: Sequence[str]) -> str | None:
    """The first neighbouring convention under which every check in ``failing`` passes, or None."""
    if case.expect_error or not failing:
        return None
    for label, conv, axis in neighbours(case.convention, case.feature_axis, case.x.ndim):
        try:
            alt = dataclasses.replace(case, convention=dataclasses.replace(conv, feature_axis=axis),
                                      eps=conv.eps, momentum=conv.momentum, feature_axis=axis)
            with np.errstate(all="ignore"):
                results = check_steps(_Replay(name, alt.convention, out), name, case.spec_id or case.id, [alt])
        except Exception:  # noqa: BLE001 - a neighbour the inputs do not fit (e.g. the other axis)
            continue
        verdict = {r.key: r.status for r in results}
        if all(verdict.get(k) == "pass" for k in failing):
            return label
    return None


def ratio_to_oracle(actual: Any, expected: Any) -> float | None:
    """Least-squares scale s minimizing ||actual - s * oracle|| over the finite elements (1 is exact).

    >>> ratio_to_oracle([2.0, 4.0], [1.0, 2.0])
    2.0
    """
    try:
        a = np.asarray(actual, dtype=np.float64).ravel()
        e = np.asarray(expected, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    if a.shape != e.shape:
        return None
    ok = np.isfinite(a) & np.isfinite(e)
    den = float(np.dot(e[ok], e[ok]))
    if den == 0.0:
        return None
    return float(np.dot(a[ok], e[ok]) / den)


def _oracle_value(case: Case, key: str) -> Any:
    from .. import oracle

    with np.errstate(all="ignore"):
        if key in ("y", "running_mean", "running_var"):
            ref = oracle.forward(case.x, case.gamma, case.beta, case.running_mean, case.running_var,
                                 training=case.training, convention=case.convention, axis=case.feature_axis,
                                 count=case.count)
            return getattr(ref, key)
        if case.dy is None:
            return None
        dx, dg, db = oracle.backward(case.dy, case.x, case.gamma, training=case.training,
                                     convention=case.convention, axis=case.feature_axis,
                                     running_mean=case.running_mean, running_var=case.running_var)
        return {"dx": dx, "dgamma": dg, "dbeta": db}.get(key)


def explain_failures(recorder: Recorder, checks: Sequence[CheckResult], *, limit: int = 200) -> dict[str, Any]:
    """For the failing checks of one adapter: ``{"step|key": {"ratio": r, "explained_by": label}}``.

    At most ``limit`` failing steps are explained (worst first); the rest carry no explanation.
    """
    by_step: dict[str, list[CheckResult]] = {}
    for c in checks:
        if c.status == "fail" and c.units is not None and c.step in recorder.steps:
            by_step.setdefault(c.step, []).append(c)
    order = sorted(by_step, key=lambda s: -max(float(c.units or 0.0) for c in by_step[s]))
    found: dict[str, Any] = {}
    for step in order[:limit]:
        case, out = recorder.steps[step]
        keys = [c.key for c in by_step[step]]
        label = explain_step(str(getattr(recorder, "name", "")), case, out, keys)
        for c in by_step[step]:
            try:
                ratio = ratio_to_oracle(out.get(c.key), _oracle_value(case, c.key))
            except Exception:  # noqa: BLE001 - no ratio is better than no report
                ratio = None
            found[f"{step}|{c.key}"] = {"ratio": ratio, "explained_by": label}
    return found
