"""The engine: run adapters on cases, compare with the oracle, apply the ledger.

For every adapter and case spec the engine instantiates the steps under the adapter's convention
(:func:`~bn_ref.conformance.cases.instantiate`), calls ``adapter.run`` once per step -- feeding
back the running statistics the adapter returned and incrementing ``count`` after each training
step -- and compares each returned array with the oracle evaluated on exactly the inputs the
adapter was given (one-step semantics: each step checks one application of the formulas of
``docs/spec.md``, so an error is reported at the step that makes it). Errors are measured per
element against :func:`bn_ref.tolerances.element_bounds` (§8.4) in the dtype the adapter computes
in: the case's dtype, or the lower precision the adapter declares with ``compute_dtype`` (a row
that computes in float32 whatever its input is judged at float32 tolerance on float64 cases, and
the report records that as a *finding* of the row, not as an excused deviation).

Check groups (the columns of the matrix):

* ``forward``  -- ``y`` of a training step (§2);
* ``running``  -- ``running_mean``/``running_var`` after a step (§3; eval must leave them as they were);
* ``eval``     -- ``y`` of an eval step (§4);
* ``backward`` -- ``dx``, ``dgamma``, ``dbeta`` of ``sum(y * dy)`` (§5);
* ``errors``   -- cases where a conforming implementation must raise (§7.1);
* ``defaults`` -- the framework's layer built from its *own defaults* (no eps or momentum passed;
  the adapter's ``defaults()``) on the cases of :data:`DEFAULTS_CASES`, compared with the oracle
  under the preset that claims to reproduce it: the preset is checked against the framework;
* ``random``   -- hypothesis-generated cases (shrunk to a minimal failing one);
* ``variants`` -- the BN variants of §13-§17 (renorm, ghost batches, frozen, no tracking, precise
  BN) on the cases that name a ``Variant``, against :mod:`bn_ref.variants`; only adapters that
  declare ``variant_skip`` run them (:mod:`~bn_ref.conformance.variant_checks`).

The ledger (``conformance/ledger.toml``, :func:`load_ledger`) turns a failing check into an
*expected deviation* only when an entry names it and its error is within the entry's bound
(``max_units`` in tolerance units, or ``max_rel`` relative); a larger error stays a failure.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from .. import oracle
from ..tolerances import accumulation_dtype, element_bounds, element_units, tolerance
from .cases import Case, CaseSpec, instantiate, make_case

__all__ = [
    "GROUPS",
    "OUTPUT_KEYS",
    "CheckResult",
    "LedgerEntry",
    "AdapterResult",
    "check_steps",
    "run_adapter",
    "load_ledger",
    "adapter_skip",
    "applies",
    "compute_dtype",
    "DEFAULTS_CASES",
]

GROUPS = ("forward", "running", "eval", "backward", "errors", "defaults", "random", "variants")
DEFAULTS_CASES = ("rank2-float64", "rank4-float64", "sequence-float32", "dtype-float16")
"""The catalogue cases a framework's defaults-built layer runs on (group ``defaults``): ranks 2 and
4, a running-statistics sequence, and a half-precision case -- enough to see every default (eps,
momentum and its spelling, the variance estimator, the dtype handling) without doubling the run."""
_PRECISION = {"float64": 3, "float32": 2, "bfloat16": 1, "float16": 1}
OUTPUT_KEYS = ("y", "running_mean", "running_var", "dx", "dgamma", "dbeta")
STATUS_ORDER = ("error", "fail", "xfail", "pass", "skip")

Status = Literal["pass", "fail", "error", "skip", "xfail"]
"""The verdict of one check (``xfail``: a failure the ledger expects)."""


@dataclass
class CheckResult:
    """One comparison (or one skipped / failed call)."""

    adapter: str
    case: str  # catalogue id
    step: str  # step id (case id or case/stepK-mode)
    group: str
    key: str
    status: Status
    units: float | None = None
    message: str = ""
    reason: str = ""  # ledger reason for xfail
    rel: float | None = None  # max |actual - expected| / max |expected| over finite elements

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("units", "rel"):
            if d[k] is not None and not np.isfinite(d[k]):
                d[k] = "inf"
        return d


def _glob(text: str, pattern: str) -> bool:
    """Shell-style match where only ``*`` and ``?`` are wildcards (adapter names contain brackets)."""
    rx = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(rx, text) is not None


LEDGER_KEYS = {"adapter", "case", "check", "reason", "max_units", "max_rel"}


@dataclass
class LedgerEntry:
    """An expected deviation, bounded: adapter/case/check glob patterns, the reason, and the
    largest error it excuses -- ``max_units`` (in units of the §8.4 bound) or ``max_rel``
    (``max|actual - expected| / max|expected|``). A matching failure within the bound becomes an
    expected deviation; one above it stays a failure (counted in ``exceeded``)."""

    adapter: str
    case: str
    check: str
    reason: str
    max_units: float | None = None
    max_rel: float | None = None
    matched: int = 0  # failing checks it turned into expected deviations
    passed: int = 0  # matching checks that passed (the deviation did not occur)
    exceeded: int = 0  # matching failures larger than the bound (left as failures)
    worst_units: float | None = None  # the largest error it excused
    worst_rel: float | None = None

    def matches(self, adapter: str, case: str, step: str, group: str, key: str) -> bool:
        return (
            _glob(adapter, self.adapter)
            and (_glob(case, self.case) or _glob(step, self.case))
            and (_glob(group, self.check) or _glob(key, self.check))
        )

    def bound_text(self) -> str:
        return f"max_units = {self.max_units:g}" if self.max_units is not None else f"max_rel = {self.max_rel:g}"

    def within(self, r: CheckResult) -> bool:
        """Whether the failing check ``r`` is within this entry's bound (an exception, a missing
        raise or a NaN/Inf mismatch has no finite size and is never within)."""
        if self.max_units is not None:
            return r.units is not None and np.isfinite(r.units) and r.units <= self.max_units
        return r.rel is not None and np.isfinite(r.rel) and r.rel <= float(self.max_rel)

    @property
    def state(self) -> str:
        """"deviation" (seen), "exceeded" (seen above its bound), "xpass" (exercised, never
        deviated) or "unexercised"."""
        if self.exceeded:
            return "exceeded"
        if self.matched:
            return "deviation"
        return "xpass" if self.passed else "unexercised"


def load_ledger(path: str | None) -> list[LedgerEntry]:
    """Read and validate the ``[[deviation]]`` tables of a TOML ledger.

    Each needs ``adapter``, ``case``, ``check``, ``reason`` (non-empty strings) and exactly one of
    ``max_units`` / ``max_rel`` (a finite number > 0); any other key, a missing bound, both bounds,
    or another top-level table is a ``ValueError`` naming the entry.
    """
    if path is None:
        return []
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        data = tomllib.load(f)
    extra = set(data) - {"deviation"}
    if extra:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(extra)}; only [[deviation]] tables are allowed")
    entries = []
    for i, e in enumerate(data.get("deviation", [])):
        where = f"{path}: deviation #{i + 1} ({e.get('adapter', '?')} / {e.get('case', '?')} / {e.get('check', '?')})"
        unknown = set(e) - LEDGER_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(LEDGER_KEYS)}")
        missing = [k for k in ("adapter", "case", "check", "reason") if not isinstance(e.get(k), str) or not e[k]]
        if missing:
            raise ValueError(f"{where}: lacks {', '.join(missing)} (non-empty strings)")
        bounds = [k for k in ("max_units", "max_rel") if k in e]
        if len(bounds) != 1:
            raise ValueError(f"{where}: needs exactly one bound, max_units (tolerance units) or max_rel "
                             f"(relative error); got {bounds or 'none'} -- an entry may not excuse an unbounded error")
        v = e[bounds[0]]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"{where}: {bounds[0]} must be a finite number > 0, got {v!r}")
        entries.append(LedgerEntry(e["adapter"], e["case"], e["check"], e["reason"], **{bounds[0]: float(v)}))
    return entries


@dataclass
class AdapterResult:
    """Everything one adapter produced."""

    name: str
    convention: Any
    description: str = ""
    checks: list[CheckResult] = field(default_factory=list)
    random: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    build_error: str | None = None
    build_skip: str | None = None
    findings: list[str] = field(default_factory=list)  # declared properties the report shows (not deviations)


def adapter_skip(adapter: Any, case: Case) -> str | None:
    """The adapter's reason to decline ``case`` (optional ``skip`` method), else None."""
    fn = getattr(adapter, "skip", None)
    if fn is None:
        return None
    reason = fn(case)
    return None if reason is None else str(reason)


def applies(adapter: Any, spec: CaseSpec) -> bool:
    """Whether ``spec`` is run on ``adapter`` at all.

    Ordinary adapters (no ``world_size`` attribute) run every case; a cross-replica case is then
    computed on its global batch unchanged. A *distributed* adapter (``world_size: int``) runs only
    the cross-replica cases whose number of replicas is its world size -- or all of them, each
    on its single replica, when ``world_size == 1``; the single-process catalogue and the random
    searches do not apply to it and are not run (nor counted).
    """
    ws = getattr(adapter, "world_size", None)
    if ws is None:
        return True
    if spec.replicas is None:
        return False
    return int(ws) == 1 or len(spec.replicas) == int(ws)


def compute_dtype(adapter: Any, case: Case) -> str:
    """The dtype ``adapter`` is judged in on ``case``: the case's dtype, or the adapter's declared
    ``compute_dtype`` (a dtype name, or a callable of the case) when that has *less* precision --
    a row that computes in float32 whatever its input is judged at float32 tolerance (§8.4)."""
    decl = getattr(adapter, "compute_dtype", None)
    if callable(decl):
        decl = decl(case)
    if decl is None:
        return case.dtype
    decl = tolerance(decl).dtype
    return decl if _PRECISION[decl] < _PRECISION[case.dtype] else case.dtype


def _private_copy(case: Case) -> Case:
    """The case with its own arrays: an adapter that writes into them cannot change the reference."""
    return dataclasses.replace(case, **{
        k: (None if getattr(case, k) is None else np.array(getattr(case, k), dtype=np.float64, copy=True))
        for k in ("x", "gamma", "beta", "running_mean", "running_var", "dy")
    })


def _kappa(case: Case) -> float:
    """Array-level condition number of the former §8.4 bound (batch statistics in training, running
    ones in eval); kept for :mod:`~bn_ref.conformance.vectors`, no longer used to judge the matrix."""
    if case.training:
        return oracle.condition_number(case.x, convention=case.convention, axis=case.feature_axis)
    bshape = tuple(-1 if i == case.feature_axis else 1 for i in range(case.x.ndim))
    with np.errstate(invalid="ignore"):
        spread = np.sqrt(case.running_var + case.eps).reshape(bshape)
        k = np.abs(case.x) / spread
    k = k[np.isfinite(k)]
    return float(max(1.0, k.max())) if k.size else 1.0


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    if len(first) > 300:
        first = first[:300] + "..."
    return f"{type(exc).__name__}: {first}"


def _where(tb: BaseException) -> str:
    frames = traceback.extract_tb(tb.__traceback__)
    return f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""


def _describe_error(actual: np.ndarray, expected: np.ndarray, key: str, units: float, ax: int) -> str:
    """A clear failure message: where the worst error is and what it looks like."""
    if actual.shape != expected.shape:
        return f"{key}: shape {actual.shape}, expected {expected.shape}"
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    if not np.array_equal(nan_a, nan_e):
        chans = sorted({int(i) for i in np.argwhere(nan_a != nan_e)[:, ax if actual.ndim > 1 else 0]})
        extra = " (NaN crossed channels)" if (nan_a & ~nan_e).any() and nan_e.any() else ""
        return f"{key}: NaN where the oracle has none (or the reverse) in channel(s) {chans}{extra}"
    inf_e = np.isinf(expected)
    if not np.array_equal(inf_e, np.isinf(actual)) or not np.array_equal(expected[inf_e], actual[inf_e]):
        return f"{key}: infinities differ from the oracle"
    with np.errstate(invalid="ignore"):
        diff = np.where(nan_e | inf_e, 0.0, np.abs(actual - expected))
    idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
    ch = idx[ax] if actual.ndim > 1 else idx[0]
    return (
        f"{key}: error {units:.3g} x tolerance; worst at index {tuple(int(i) for i in idx)} (channel {int(ch)}): "
        f"got {actual[idx]:.9g}, oracle {expected[idx]:.9g}"
    )


def _compare(
    res: list[CheckResult], base: dict[str, str], group: str, key: str, actual: Any, expected: Any,
    case: Case, bound: Any, judge: str,
) -> None:
    if expected is None:
        if actual is not None:
            res.append(CheckResult(**base, group=group, key=key, status="fail",
                                   message=f"{key}: returned an array where none exists (affine off?)"))
        return
    if actual is None:
        res.append(CheckResult(**base, group=group, key=key, status="skip", message=f"{key}: not returned"))
        return
    try:
        a = np.asarray(actual, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is the adapter's
        res.append(CheckResult(**base, group=group, key=key, status="fail", message=f"{key}: not an array ({_short(exc)})"))
        return
    e = np.asarray(expected, dtype=np.float64)
    units = element_units(a, e, bound, judge)
    rel = _rel(a, e)
    ax = case.feature_axis if e.ndim > 1 else 0
    if units <= 1.0:
        res.append(CheckResult(**base, group=group, key=key, status="pass", units=units, rel=rel))
    else:
        res.append(CheckResult(**base, group=group, key=key, status="fail", units=units, rel=rel,
                               message=_describe_error(a, e, key, units, ax)))


def _rel(a: np.ndarray, e: np.ndarray) -> float:
    """max|a - e| / max|e| over the elements finite in both (inf when shapes or finiteness differ)."""
    if a.shape != e.shape or not np.array_equal(np.isfinite(a), np.isfinite(e)):
        return float("inf")
    ok = np.isfinite(e)
    if not ok.any():
        return 0.0
    scale = float(np.max(np.abs(e[ok])))
    err = float(np.max(np.abs(a[ok] - e[ok])))
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def check_steps(adapter: Any, name: str, spec_id: str, cases: Sequence[Case], *,
                group: str | None = None) -> list[CheckResult]:
    """Run one case (all its steps) on one adapter; return its check results.

    ``group`` puts every check in one group (``"defaults"``) instead of forward/running/eval/...
    """
    if cases and cases[0].variant is not None and group is None:
        from .variant_checks import check_variant_steps

        return check_variant_steps(adapter, name, spec_id, cases)
    res: list[CheckResult] = []
    rm, rv, count = cases[0].running_mean, cases[0].running_var, cases[0].count
    for proto in cases:
        case = proto.with_state(rm, rv, count)
        base = {"adapter": name, "case": spec_id, "step": case.id}
        grp_y = group or ("forward" if case.training else "eval")
        grp_run, grp_bwd, grp_err = (group,) * 3 if group else ("running", "backward", "errors")
        reason = adapter_skip(adapter, case)
        if reason is not None:
            res.append(CheckResult(**base, group="case", key="*", status="skip", message=reason))
            return res
        if case.expect_error:
            try:
                adapter.run(_private_copy(case))
            except Exception as exc:  # noqa: BLE001 - raising is the expected outcome
                res.append(CheckResult(**base, group=grp_err, key="raises", status="pass",
                                       message=f"raised {_short(exc)}"))
            else:
                res.append(CheckResult(
                    **base, group=grp_err, key="raises", status="fail",
                    message=(f"n = 1 value per channel in training (x.shape {case.x.shape}) must raise under "
                             f"single_value='error' (spec §7.1); the adapter returned normally")))
            return res
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # NaN/Inf cases warn in NumPy-based adapters
                out = adapter.run(_private_copy(case))
            if not isinstance(out, dict):
                raise TypeError(f"run(case) must return a dict, got {type(out).__name__}")
        except Exception as exc:  # noqa: BLE001 - an adapter error is a result, not a crash
            res.append(CheckResult(**base, group=grp_y, key="run", status="error", message=_short(exc) + _where(exc)))
            return res
        unknown = set(out) - set(OUTPUT_KEYS)
        if unknown:
            res.append(CheckResult(**base, group=grp_y, key="keys", status="fail",
                                   message=f"run(case) returned unknown keys {sorted(unknown)}; allowed: {OUTPUT_KEYS}"))
        conv = case.convention
        with np.errstate(all="ignore"):
            ref = oracle.forward(case.x, case.gamma, case.beta, case.running_mean, case.running_var,
                                 training=case.training, convention=conv, axis=case.feature_axis, count=case.count)
            dx, dg, db = (None, None, None)
            if case.dy is not None:
                dx, dg, db = oracle.backward(case.dy, case.x, case.gamma, training=case.training, convention=conv,
                                             axis=case.feature_axis, running_mean=case.running_mean,
                                             running_var=case.running_var)
            judge = compute_dtype(adapter, case)
            expected = {"y": ref.y, "running_mean": ref.running_mean, "running_var": ref.running_var,
                        "dx": dx, "dgamma": dg, "dbeta": db if case.beta is not None else None}
            bounds = element_bounds(
                case.x, expected={k: v for k, v in expected.items() if v is not None}, dtype=judge,
                training=case.training, eps=case.eps, axis=case.feature_axis, gamma=case.gamma, beta=case.beta,
                running_mean=case.running_mean, running_var=case.running_var, dy=case.dy,
                update_weights=conv.update_weights(case.count) if case.training else (1.0, 0.0),
                variance_correction=conv.variance_correction(case.n))
        for grp, key in ((grp_y, "y"), (grp_run, "running_mean"), (grp_run, "running_var")) + (
                ((grp_bwd, "dx"), (grp_bwd, "dgamma"), (grp_bwd, "dbeta")) if case.dy is not None else ()):
            # y and dx are in T; statistics and parameter gradients are held in the accumulation dtype (§8.4)
            kdt = judge if key in ("y", "dx") else accumulation_dtype(judge)
            _compare(res, base, grp, key, out.get(key), expected[key], case, bounds.get(key), kdt)
        # Feed back the adapter's own statistics (the reference's when it returned none).
        nrm, nrv = out.get("running_mean"), out.get("running_var")
        rm = ref.running_mean if nrm is None else np.asarray(nrm, dtype=np.float64).reshape(-1)
        rv = ref.running_var if nrv is None else np.asarray(nrv, dtype=np.float64).reshape(-1)
        count = count + 1 if case.training else count
    return res


def _worst(results: Iterable[CheckResult]) -> str:
    st = {r.status for r in results}
    for s in STATUS_ORDER:
        if s in st:
            return s
    return "skip"


# -- hypothesis search -----------------------------------------------------------------------

_RANDOM_SHAPES = ((6, 3), (4, 3, 5), (2, 3, 4, 3), (2, 2, 3, 2, 3), (1, 3, 3, 3))


def random_search(adapter: Any, name: str, dtype: str, *, max_examples: int = 12) -> dict[str, Any]:
    """Hypothesis search for a failing random case (derandomized; database=None).

    Returns a dict with ``status`` (pass/fail/skip/error), ``examples`` run, and for a failure
    the minimal (shrunk) case parameters, the messages, and a reproduction snippet.
    """
    from hypothesis import HealthCheck, Phase, assume, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable

    state: dict[str, Any] = {"examples": 0, "last": None, "skipped": 0}
    strategy = st.fixed_dictionaries(
        {
            "shape": st.sampled_from(_RANDOM_SHAPES),
            "feature_axis": st.sampled_from((None, 1, -1)),
            "seed": st.integers(0, 2**16),
            "loc": st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False),
            "log_scale": st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False),
            "training": st.booleans(),
            "affine": st.booleans(),
            "count": st.integers(0, 5),
            "cumulative": st.booleans(),
        }
    )

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              phases=(Phase.explicit, Phase.generate, Phase.shrink), print_blob=False)
    @given(params=strategy)
    def search(params: dict[str, Any]) -> None:
        p = dict(params)
        scale = float(10.0 ** p.pop("log_scale"))
        p["loc"] = float(p["loc"]) * scale
        p["scale"] = scale
        if p.pop("cumulative"):
            p["momentum"] = None  # §3.3: the cumulative average, where count matters
        case = make_case(convention=adapter.convention, dtype=dtype, **p)
        if case.expect_error or adapter_skip(adapter, case) is not None:
            state["skipped"] += 1
            assume(False)
        state["examples"] += 1
        results = check_steps(adapter, name, f"random-{dtype}", [case])
        bad = [r for r in results if r.status in ("fail", "error")]
        if bad:
            state["last"] = (p, bad)
            raise AssertionError("; ".join(r.message for r in bad))

    try:
        search()
    except Unsatisfiable:
        return {"status": "skip", "examples": state["examples"], "message": "the adapter declined every drawn case"}
    except AssertionError:
        p, bad = state["last"]
        sized = [r for r in bad if r.units is not None]
        return {
            "status": "error" if all(r.status == "error" for r in bad) else "fail",
            "units": max((r.units for r in sized), default=None),
            "rel": max((r.rel for r in sized if r.rel is not None), default=None),
            "examples": state["examples"],
            "params": p,
            "message": "; ".join(r.message for r in bad),
            "keys": sorted({r.key for r in bad}),
            "repro": _repro(name, adapter, dtype, p),
        }
    except Exception as exc:  # noqa: BLE001
        return {"status": "error", "examples": state["examples"], "message": _short(exc) + _where(exc)}
    if state["examples"] == 0:
        return {"status": "skip", "examples": 0, "message": "the adapter declined every drawn case"}
    return {"status": "pass", "examples": state["examples"], "message": ""}


def _repro(name: str, adapter: Any, dtype: str, p: dict[str, Any]) -> str:
    conv = adapter.convention
    args = ", ".join(f"{k}={v!r}" for k, v in p.items())
    return (
        "import dataclasses\n"
        "from bn_ref.conventions import Convention\n"
        "from bn_ref.conformance.cases import make_case\n"
        "from bn_ref.conformance.engine import check_steps\n"
        f"conv = Convention{dataclasses.astuple(conv)!r}\n"
        f"case = make_case(convention=conv, dtype={dtype!r}, {args})\n"
        f"adapter = ...  # the adapter named {name!r}\n"
        f"for r in check_steps(adapter, {name!r}, 'repro', [case]):\n"
        "    print(r.status, r.key, r.message)\n"
    )


# -- one adapter over everything ----------------------------------------------------------------


def run_adapter(
    adapter: Any,
    specs: Sequence[CaseSpec],
    randoms: Sequence[str],
    *,
    ledger: Sequence[LedgerEntry] = (),
    progress: Callable[[str], None] | None = None,
    max_examples: int = 12,
) -> AdapterResult:
    """All selected cases and random searches for one adapter; the ledger applied."""
    name = str(adapter.name)
    t0 = time.perf_counter()
    out = AdapterResult(name=name, convention=adapter.convention, description=str(getattr(adapter, "description", "")))
    unavailable = getattr(adapter, "unavailable", None)
    if unavailable:  # e.g. a CUDA-only layer on a machine without CUDA: the row is shown as skipped
        out.build_skip = str(unavailable)
        if progress:
            progress(f"  {name}: skipped: {unavailable}")
        return out
    if getattr(adapter, "world_size", None) is not None:
        specs = [s for s in specs if applies(adapter, s)]
        randoms = ()
    declared: set[tuple[str, str]] = set()
    for spec in specs:
        try:
            steps = instantiate(spec, adapter.convention)
        except Exception as exc:  # noqa: BLE001 - e.g. a convention the spec cannot use
            out.checks.append(CheckResult(name, spec.id, spec.id, "case", "*", "error", message=_short(exc)))
            continue
        for st in steps:
            if (judge := compute_dtype(adapter, st)) != st.dtype:
                declared.add((st.dtype, judge))
        out.checks.extend(check_steps(adapter, name, spec.id, steps))
    out.findings.extend(f"computes in {j} on {d} input (declared by the adapter; judged at {j} tolerance)"
                        for d, j in sorted(declared))
    make_defaults = getattr(adapter, "defaults", None)
    if callable(make_defaults):  # a plain ``defaults`` flag (a row built from defaults) is not the hook
        _run_defaults(out, adapter, make_defaults, specs)
    for rid in randoms:
        dtype = rid.split("-", 1)[1]
        r = random_search(adapter, name, dtype, max_examples=max_examples)
        r["case"] = rid
        out.random.append(r)
        status = r["status"]
        msg = r.get("message", "")
        out.checks.append(CheckResult(name, rid, rid, "random", ",".join(r.get("keys", [])) or "*",
                                      status, message=msg, units=r.get("units"), rel=r.get("rel")))
    _apply_ledger(out, ledger)
    for r in out.random:  # the search result carries the verdict of its (possibly ledgered) check
        chk = next(c for c in out.checks if c.group == "random" and c.case == r["case"])
        r["status"], r["reason"] = chk.status, chk.reason
    out.wall_s = time.perf_counter() - t0
    if progress:
        progress(f"  {name}: {summary_line(out)} ({out.wall_s:.1f}s)")
    return out


def _run_defaults(out: AdapterResult, adapter: Any, make_defaults: Callable[[], Any], specs: Sequence[CaseSpec]) -> None:
    """Group ``defaults``: the layer built from the framework's own defaults on :data:`DEFAULTS_CASES`
    (those selected), judged under the adapter's preset."""
    name = out.name
    chosen = [s for s in specs if s.id in DEFAULTS_CASES]
    if not chosen:
        return
    try:
        runner = make_defaults()
    except Exception as exc:  # noqa: BLE001 - a defaults layer that cannot be built is an error cell
        for spec in chosen:
            out.checks.append(CheckResult(name, spec.id, spec.id, "defaults", "build", "error",
                                          message=_short(exc) + _where(exc)))
        return
    try:
        for spec in chosen:
            steps = instantiate(spec, adapter.convention)
            out.checks.extend(check_steps(runner, name, spec.id, steps, group="defaults"))
    finally:
        _close(runner)


def _close(obj: Any) -> None:
    fn = getattr(obj, "close", None)
    if callable(fn):
        try:
            fn()
        except Exception:  # noqa: BLE001 - cleanup only
            pass


def _apply_ledger(out: AdapterResult, ledger: Sequence[LedgerEntry]) -> None:
    """Each non-skipped check against the first entry that names it: a failure within the entry's
    bound becomes ``xfail``; one above it stays a failure, its message saying so."""
    for r in out.checks:
        if r.status == "skip":
            continue
        for entry in ledger:
            if entry.matches(r.adapter, r.case, r.step, r.group, r.key):
                if r.status in ("fail", "error"):
                    if entry.within(r):
                        r.status = "xfail"
                        r.reason = entry.reason
                        entry.matched += 1
                        if r.units is not None:
                            entry.worst_units = max(entry.worst_units or 0.0, r.units)
                        if r.rel is not None:
                            entry.worst_rel = max(entry.worst_rel or 0.0, r.rel)
                    else:
                        entry.exceeded += 1
                        r.message += (f" [above the ledger bound {entry.bound_text()} of the entry "
                                      f"{entry.adapter!r} / {entry.case!r} / {entry.check!r}]")
                elif r.status == "pass":
                    entry.passed += 1
                break


def summary_line(res: AdapterResult) -> str:
    counts: dict[str, int] = {}
    for r in res.checks:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if s in counts) or "no checks"


def group_cells(res: AdapterResult) -> dict[str, dict[str, Any]]:
    """Per check group: the worst status, worst error (units) and counts."""
    cells: dict[str, dict[str, Any]] = {}
    for g in GROUPS:
        rs = [r for r in res.checks if r.group == g]
        if not rs:
            cells[g] = {"status": "none", "worst": None, "counts": {}}
            continue
        status = _worst(rs)
        considered = [r for r in rs if r.status == status] if status != "pass" else rs
        units = [r.units for r in considered if r.units is not None]
        counts: dict[str, int] = {}
        for r in rs:
            counts[r.status] = counts.get(r.status, 0) + 1
        cells[g] = {"status": status, "worst": max(units) if units else None, "counts": counts}
    skipped_cases = sorted({r.case for r in res.checks if r.group == "case" and r.status == "skip"})
    cells["_skipped_cases"] = {"status": "skip", "worst": None, "counts": {"skip": len(skipped_cases)}}
    return cells


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
