"""The meta-test of the §8.4 bound: every wrong answer of the table fails, every correct
implementation passes, in every dtype and data scenario.

Wrong outputs are built from the oracle (on the same T-rounded inputs) and rounded to T like a real
implementation's; each is judged with :func:`bn_ref.tolerances.element_bounds` through the
conformance engine (:func:`bn_ref.conformance.engine.check_steps`), exactly as the matrix judges a
framework. Every step of every combination is judged and must fail: there is no exception list.

The scenarios fix the conditioning (kappa = |mean| / std) and the size of eps against the variance;
BN is scale-invariant apart from eps, so the absolute scale only decides how much eps matters. The
large-mean scenario is mean 1, std 0.01 (kappa = 100, variance 1e-4 = 10 eps): on 100 + N(0, 1),
the same kappa, eps x 10 moves y by 9 eps / (2 var) = 4.5e-5 relative, below float16's unit
round-off (4.9e-4), 90 times below bfloat16's (3.9e-3), and within the rounding error of a float32
mean of values near 100 -- no implementation in those dtypes can show it, so it is no wrong answer of
realistic size there. The issue's own example, an all-zero output on float16 100 + N(0, 1), is kept
as a separate test below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest

from bn_ref import oracle
from bn_ref.conformance.cases import CaseSpec, instantiate
from bn_ref.conformance.engine import check_steps
from bn_ref.conventions import PRESETS
from bn_ref.tolerances import round_to

DTYPES = ("float16", "bfloat16", "float32", "float64")
SCENARIOS = {
    # name: (loc, scale): data chan_loc + scale * N(0, 1) with chan_loc = loc + scale/2 * N(0, 1)
    "centred": (0.0, 0.01),  # var ~1e-4: eps (1e-5) is a visible part of var + eps
    "large-mean": (1.0, 0.01),  # kappa ~ 100, var ~1e-4 (eps x 10 visible; see the module docstring)
    "tiny-variance": (0.01, 1e-3),  # var ~1e-6 << eps
}
CONV = PRESETS["pytorch"]


def _cases(dtype: str, scenario: str, loc_scale: tuple[float, float] | None = None):
    """A training step then eval; momentum=None at count 0 makes the new running statistics the batch
    ones (weight 1), so an estimator error is not diluted by the old running variance; n = 36. The
    eval step normalizes with the statistics a correct training step stored (rounded to T, as the
    catalogue's are), i.e. with the scale of the scenario's data, as eval after training does."""
    loc, scale = SCENARIOS[scenario] if loc_scale is None else loc_scale
    spec = CaseSpec(f"meta-{scenario}-{dtype}", (4, 4, 3, 3), dtype=dtype, loc=loc, scale=scale,
                    momentum=None, modes=("train", "eval"))
    train, ev = instantiate(spec, CONV)
    ref = _oracle(train)
    return [train, ev.with_state(round_to(ref["running_mean"], dtype), round_to(ref["running_var"], dtype), 1)]


def _oracle(case, *, conv=None, x_shift=None) -> dict[str, Any]:
    conv = conv or case.convention
    x = case.x if x_shift is None else case.x + x_shift
    ref = oracle.forward(x, case.gamma, case.beta, case.running_mean, case.running_var, training=case.training,
                         convention=conv, axis=case.feature_axis, count=case.count)
    dx, dg, db = oracle.backward(case.dy, x, case.gamma, training=case.training, convention=conv,
                                 axis=case.feature_axis, running_mean=case.running_mean,
                                 running_var=case.running_var)
    return {"y": ref.y, "running_mean": ref.running_mean, "running_var": ref.running_var, "dx": dx,
            "dgamma": dg, "dbeta": db}


def _rounded(out: dict[str, Any], dtype: str) -> dict[str, Any]:
    acc = "float32" if dtype in ("float16", "bfloat16") else dtype
    return {k: round_to(v, dtype if k in ("y", "dx") else acc) for k, v in out.items()}


def _mean_not_subtracted(case):
    """y = gamma * x / s + beta: the statistics right, the subtraction of the mean forgotten."""
    out = _oracle(case)
    bshape = [-1 if i == case.feature_axis else 1 for i in range(case.x.ndim)]
    ax = tuple(i for i in range(case.x.ndim) if i != case.feature_axis)
    if case.training:
        mu, var = case.x.mean(axis=ax), case.x.var(axis=ax)
    else:
        mu, var = case.running_mean, case.running_var
    shift = case.gamma * mu / np.sqrt(var + case.eps)
    return out | {"y": out["y"] + shift.reshape(bshape)}


def _scale(case):
    out = _oracle(case)
    b = case.beta.reshape([-1 if i == case.feature_axis else 1 for i in range(case.x.ndim)])
    return out | {"y": (out["y"] - b) * 1.01 + b}


def _nan_channel(case):
    out = _oracle(case)
    y = out["y"].copy()
    np.moveaxis(y, case.feature_axis, 0)[1] = np.nan
    return out | {"y": y}


WRONG: dict[str, tuple[Callable[[Any], dict[str, Any]], str]] = {
    # name: (outputs of the step, the key that carries the error)
    "all-zeros": (lambda c: {k: np.zeros_like(v) for k, v in _oracle(c).items()}, "y"),
    "mean-not-subtracted": (_mean_not_subtracted, "y"),
    "scale-1pct": (_scale, "y"),
    "eps-x10": (lambda c: _oracle(c, conv=dataclasses.replace(c.convention, eps=10 * c.eps)), "y"),
    "sign-flip": (lambda c: {k: -v for k, v in _oracle(c).items()}, "y"),
    "one-channel-nan": (_nan_channel, "y"),
    "estimator-swapped": (lambda c: _oracle(c, conv=dataclasses.replace(c.convention, running_var="biased")),
                          "running_var"),
    "dx-sign-flip": (lambda c: _oracle(c) | {"dx": -_oracle(c)["dx"]}, "dx"),
}

class _Fixed:
    """An 'implementation' returning precomputed outputs for each step (keyed by the step id)."""

    convention = CONV

    def __init__(self, make: Callable[[Any], dict[str, Any]], dtype: str) -> None:
        self.make, self.dtype = make, dtype

    def run(self, case):
        return _rounded(self.make(case), self.dtype)


def _effect(case, make, key: str) -> float:
    good, bad = _oracle(case)[key], make(case)[key]
    with np.errstate(invalid="ignore"):
        if np.isnan(bad).any() or (bad == 0).all():
            return np.inf
        return float(np.max(np.abs(bad - good)) / np.max(np.abs(good)))


def _table():
    rows = []
    for wname in WRONG:
        for dt in DTYPES:
            for sc in SCENARIOS:
                rows.append(pytest.param(wname, dt, sc, id=f"{wname}-{dt}-{sc}"))
    return rows


TABLE = _table()


def test_table_size():
    assert len(TABLE) == len(WRONG) * len(DTYPES) * len(SCENARIOS) == 96


@pytest.mark.parametrize("wname,dtype,scenario", TABLE)
def test_wrong_output_fails(wname: str, dtype: str, scenario: str) -> None:
    """Every judged step fails on the key that carries the error (eval leaves the running
    statistics alone, so the estimator row is judged on its training step only)."""
    make, key = WRONG[wname]
    judged = 0
    for case in _cases(dtype, scenario):
        if key == "running_var" and not case.training:
            continue
        results = check_steps(_Fixed(make, dtype), "wrong", case.spec_id, [case])
        bad = [r for r in results if r.key == key and r.status == "fail"]
        assert bad, (f"{wname} passed on {scenario} {dtype} ({case.id}; effect {_effect(case, make, key):.2g} "
                     "relative): " + ", ".join(f"{r.key} {r.status} {r.units}" for r in results))
        judged += 1
    assert judged == (1 if key == "running_var" else 2)


# -- correct implementations pass ------------------------------------------------------------

def _correct_adapters():
    from bn_ref.conformance.adapters import _jax_util as ju
    from bn_ref.conformance.adapters.frameworks_flax import FlaxLinenAdapter
    from bn_ref.conformance.adapters.frameworks_torch import TorchModuleAdapter

    return {
        "oracle-rounded": lambda dt: _Fixed(_oracle, dt),
        "torch.nn": lambda dt: TorchModuleAdapter("cpu"),
        "flax-two-pass": lambda dt: FlaxLinenAdapter(False, "cpu", ju.devices()[0][1]),
    }


CORRECT = ("oracle-rounded", "torch.nn", "flax-two-pass")


@pytest.mark.parametrize("impl", CORRECT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", tuple(SCENARIOS))
def test_correct_implementation_passes(impl: str, dtype: str, scenario: str) -> None:
    adapter = _correct_adapters()[impl](dtype)
    loc, scale = SCENARIOS[scenario]
    spec = CaseSpec(f"meta-{scenario}-{dtype}", (16, 4, 3, 3), dtype=dtype, loc=loc, scale=scale,
                    modes=("train", "train", "eval"))
    results = check_steps(adapter, impl, spec.id, instantiate(spec, adapter.convention))
    judged = [r for r in results if r.status in ("pass", "fail", "error")]
    assert len(judged) >= 3 * 5, [(r.key, r.status, r.message) for r in results]
    bad = [(r.step, r.key, r.status, r.units, r.message) for r in judged if r.status != "pass"]
    assert not bad, bad


def test_issue_example_all_zero_float16_large_mean():
    """The issue's example: float16, x = 100 + N(0, 1), an all-zero output must fail (it scored 0.59
    units under the old array-level bound); a 1 % scale error and the mean not subtracted fail too."""
    case = _cases("float16", "large-mean", loc_scale=(100.0, 1.0))[0]
    for wname, least in (("all-zeros", 100), ("scale-1pct", 1), ("mean-not-subtracted", 100)):
        make, key = WRONG[wname]
        res = check_steps(_Fixed(make, "float16"), wname, case.spec_id, [case])
        y = next(r for r in res if r.key == "y")
        assert y.status == "fail" and y.units > least, (wname, y.status, y.units)


ISSUE_DATA_ROWS = [pytest.param(w, dt, id=f"{w}-{dt}") for w in WRONG if w != "eps-x10" for dt in DTYPES]


def test_issue_data_row_count():
    assert len(ISSUE_DATA_ROWS) == 7 * 4


@pytest.mark.parametrize("wname,dtype", ISSUE_DATA_ROWS)
def test_wrong_output_fails_on_the_issue_data(wname: str, dtype: str) -> None:
    """The issue's data, 100 + N(0, 1): every wrong answer but eps x 10 (4.5e-5 relative there, see
    the module docstring) fails on the training step and on the eval step."""
    make, key = WRONG[wname]
    for case in _cases(dtype, "large-mean", loc_scale=(100.0, 1.0)):
        if key == "running_var" and not case.training:
            continue
        res = check_steps(_Fixed(make, dtype), wname, case.spec_id, [case])
        r = next(r for r in res if r.key == key)
        assert r.status == "fail", (wname, dtype, case.id, r.status, r.units)
