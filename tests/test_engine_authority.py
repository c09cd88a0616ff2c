"""Engine: a declared compute dtype is judged at its precision and reported as a finding; the
defaults group runs the framework-default layer against the preset; the element bound's NaN/Inf rules."""

from __future__ import annotations

import dataclasses

import numpy as np

from bn_ref import oracle
from bn_ref.conformance.cases import ALL_SPECS
from bn_ref.conformance.engine import DEFAULTS_CASES, GROUPS, compute_dtype, run_adapter
from bn_ref.conventions import PRESETS
from bn_ref.tolerances import element_units, round_to

SPECS = [s for s in ALL_SPECS if s.id in ("rank2-float64", "rank4-float64", "dtype-float16")]


class OracleIn:
    """The oracle, its outputs rounded to ``dtype`` (float32 mimics an implementation computing in float32)."""

    def __init__(self, conv, dtype=None, declare=None, eps_factor=1.0):
        self.convention = conv
        self.name = f"oracle-in[{dtype}, declare={declare}, eps x{eps_factor}]"
        self.dtype, self.eps_factor = dtype, eps_factor
        if declare:
            self.compute_dtype = declare

    def run(self, case):
        conv = dataclasses.replace(case.convention, eps=case.eps * self.eps_factor)
        dt = self.dtype or case.dtype
        x = round_to(case.x, dt)
        ref = oracle.forward(x, case.gamma, case.beta, case.running_mean, case.running_var, training=case.training,
                             convention=conv, axis=case.feature_axis, count=case.count)
        dx, dg, db = oracle.backward(case.dy, x, case.gamma, training=case.training, convention=conv,
                                     axis=case.feature_axis, running_mean=case.running_mean,
                                     running_var=case.running_var)
        out = {"y": ref.y, "running_mean": ref.running_mean, "running_var": ref.running_var, "dx": dx,
               "dgamma": dg, "dbeta": db}
        return {k: round_to(v, dt) for k, v in out.items()}


def test_float32_row_fails_at_float64_unless_declared_and_then_is_a_finding():
    conv = PRESETS["keras"]
    specs = [s for s in SPECS if s.dtype == "float64"]
    plain = run_adapter(OracleIn(conv, "float32"), specs, ())
    assert any(c.status == "fail" for c in plain.checks) and not plain.findings
    declared = run_adapter(OracleIn(conv, "float32", declare="float32"), specs, ())
    assert declared.checks and all(c.status in ("pass", "skip") for c in declared.checks), \
        [(c.step, c.key, c.units) for c in declared.checks if c.status == "fail"]
    assert declared.findings == ["computes in float32 on float64 input (declared by the adapter; judged at "
                                 "float32 tolerance)"]


def test_declared_dtype_never_loosens_below_the_case_dtype():
    class A:
        compute_dtype = "float32"

    from bn_ref.conformance.cases import instantiate

    (c16,) = [c for c in instantiate(SPECS[2], PRESETS["pytorch"])][:1]
    assert compute_dtype(A(), c16) == "float16"
    assert compute_dtype(object(), c16) == "float16"


def test_defaults_group_checks_the_preset_against_the_defaults_layer():
    assert "defaults" in GROUPS and len(DEFAULTS_CASES) == 4
    conv = PRESETS["pytorch"]

    class Row(OracleIn):
        def __init__(self, wrong):
            super().__init__(conv)
            self.wrong = wrong

        def defaults(self):  # a "framework default" layer whose eps differs from the preset's when wrong
            return OracleIn(conv, eps_factor=100.0 if self.wrong else 1.0)

    good = run_adapter(Row(False), SPECS, ())
    d = [c for c in good.checks if c.group == "defaults"]
    assert len({c.case for c in d}) == 3 and all(c.status == "pass" for c in d)
    bad = run_adapter(Row(True), SPECS, ())
    assert any(c.status == "fail" and c.group == "defaults" for c in bad.checks)
    assert all(c.status == "pass" for c in bad.checks if c.group != "defaults")


def test_overflow_to_inf_in_T_is_not_an_error():
    e = np.array([70000.0, 1.0, np.nan])  # 70000 overflows float16
    assert element_units(np.array([np.inf, 1.0, np.nan]), e, np.ones(3), "float16") == 0.0
    assert element_units(np.array([65504.0, 1.0, np.nan]), e, np.ones(3), "float16") == float("inf")
    assert element_units(np.array([-np.inf, 1.0, np.nan]), e, np.ones(3), "float16") == float("inf")
    assert element_units(np.array([np.inf, 1.0, 0.0]), e, np.ones(3), "float16") == float("inf")
