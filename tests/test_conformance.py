"""Meta-tests of the conformance harness: it must catch broken adapters, pass a correct one,
report errors and skips honestly, apply the ledger, and round-trip golden vectors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import broken_adapters as ba
import numpy as np
import pytest

from bn_ref.conformance import cases as cs
from bn_ref.conformance import engine, vectors
from bn_ref.conformance.adapters import load
from bn_ref.conformance.cli import default_ledger_path
from bn_ref.conventions import PRESETS

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# The catalogue and the bug list are asserted, so a parametrization cannot silently shrink.
assert len(cs.CATALOGUE) == 36, len(cs.CATALOGUE)
assert len(cs.RANDOM_SPECS) == 2
assert len(ba.BUGS) == 7

# A small but representative selection: every rank and axis, a sequence, eval, NaN, n = 1, affine off.
SUBSET = ("rank2-float64", "rank4-axislast-float64", "rank5-axis1-float64", "sequence-rank2-float64",
          "nan-channel-float64", "single-value-rank2-float64", "affine-off-float64",
          "momentum-none-sequence-float64", "dtype-float32")
SPECS = [s for s in cs.CATALOGUE if s.id in SUBSET]
assert len(SPECS) == len(SUBSET)


def _run(adapter, specs=SPECS, randoms=(), **kw):
    return engine.run_adapter(adapter, specs, randoms, **kw)


@pytest.mark.parametrize("conv", ["pytorch", "flax", "keras", "onnx"])
def test_correct_adapter_passes_everything(conv, bad_checks):
    res = _run(ba.NumpyBN(PRESETS[conv]), randoms=("random-float64",))
    assert not bad_checks(res), [c.message for c in bad_checks(res)]
    passed = [c for c in res.checks if c.status == "pass"]
    # Every case contributes checks; each group that the subset exercises is present.
    assert {c.case for c in passed} >= set(SUBSET) - {"single-value-rank2-float64"}
    assert {c.group for c in passed} >= {"forward", "running", "eval", "backward", "random"}
    assert len(passed) > 150


# bug -> (the check keys that must fail, a phrase the message must contain)
EXPECT = {
    "unbiased_normalize": ({"y"}, "x tolerance"),
    "momentum_wrong_term": ({"running_mean", "running_var"}, "running_mean"),
    "eps_outside_sqrt": ({"y"}, "x tolerance"),
    "backward_no_mean_dy": ({"dx"}, "dx"),
    "biased_running_var": ({"running_var"}, "running_var"),
    "eval_batch_stats": ({"y"}, "x tolerance"),
    "nan_leak": ({"y"}, "NaN"),
}
assert set(EXPECT) == set(ba.BUGS)


@pytest.mark.parametrize("bug", ba.BUGS)
def test_broken_adapter_is_caught(bug, bad_checks):
    res = _run(ba.NumpyBN(PRESETS["pytorch"], bug))
    bad = bad_checks(res)
    keys, phrase = EXPECT[bug]
    assert bad, f"{bug} was not caught"
    assert {c.key for c in bad} >= keys
    assert all(c.status == "fail" for c in bad)
    assert any(phrase in c.message for c in bad), [c.message for c in bad]
    if bug == "eval_batch_stats":
        assert {c.group for c in bad} == {"eval", "backward"}
    if bug == "nan_leak":
        assert all(c.case == "nan-channel-float64" for c in bad)
        assert any("crossed channels" in c.message for c in bad)
    if bug in ("momentum_wrong_term", "biased_running_var"):
        assert {c.group for c in bad} == {"running"}


@pytest.mark.parametrize("bug", ["eps_outside_sqrt", "backward_no_mean_dy"])
def test_random_search_shrinks_and_reproduces(bug):
    adapter = ba.NumpyBN(PRESETS["pytorch"], bug)
    r = engine.random_search(adapter, adapter.name, "float64", max_examples=10)
    assert r["status"] == "fail"
    assert r["examples"] >= 1
    p = r["params"]
    assert set(p) >= {"shape", "seed", "loc", "scale", "training", "affine"}
    # The snippet reproduces the failure when given the adapter.
    printed = []
    ns = {"print": lambda *a: printed.append(" ".join(map(str, a)))}
    exec(r["repro"].replace("adapter = ...", "adapter = ADAPTER"), ns | {"ADAPTER": adapter})
    assert any(line.startswith("fail") for line in printed), printed


def test_single_value_must_raise_under_error_convention():
    spec = [s for s in cs.CATALOGUE if s.id == "single-value-rank4-float64"]

    class NoCheck(ba.NumpyBN):
        def run(self, case):
            import dataclasses

            return super().run(dataclasses.replace(case, convention=PRESETS["flax"]))

    res = _run(NoCheck(PRESETS["pytorch"]), specs=spec)
    assert [(c.group, c.status) for c in res.checks] == [("errors", "fail")]
    assert "must raise" in res.checks[0].message
    ok = _run(ba.NumpyBN(PRESETS["pytorch"]), specs=spec)
    assert [(c.group, c.status) for c in ok.checks] == [("errors", "pass")]


def test_raising_adapter_is_an_error_per_case_and_the_run_goes_on():
    res = _run(ba.Raises())
    errs = [c for c in res.checks if c.status == "error"]
    # Every non-raising case reports an error; the n = 1 case (must raise) passes.
    assert {c.case for c in errs} == set(SUBSET) - {"single-value-rank2-float64"}
    assert all("RuntimeError: kernel exploded" in c.message for c in errs)


def test_missing_outputs_are_skipped_not_passed():
    res = _run(ba.NoGrads(PRESETS["pytorch"]), specs=SPECS[:1])
    back = [c for c in res.checks if c.group == "backward"]
    assert back and all(c.status == "skip" for c in back)
    cells = engine.group_cells(res)
    assert cells["backward"]["status"] == "skip"
    assert cells["forward"]["status"] == "pass"


def test_adapter_must_not_corrupt_the_reference_by_writing_into_inputs(bad_checks):
    class Writer(ba.NumpyBN):
        def run(self, case):
            out = super().run(case)
            case.running_mean[...] = 1e9  # scribble on the inputs it was given
            case.x[...] = 0.0
            return out

    res = _run(Writer(PRESETS["pytorch"]), specs=SPECS[:1])
    assert not bad_checks(res)


def test_ledger_turns_failures_into_deviations_and_reports_xpass(tmp_path, bad_checks):
    path = tmp_path / "ledger.toml"
    path.write_text(
        '[[deviation]]\nadapter = "numpy-bn[biased_running_var]*"\ncase = "*"\ncheck = "running_var"\n'
        'reason = "stores the biased variance"\nmax_rel = 0.5\n'
        '[[deviation]]\nadapter = "numpy-bn[correct]*"\ncase = "rank2-*"\ncheck = "y"\nreason = "never happens"\n'
        'max_units = 2\n'
    )
    ledger = engine.load_ledger(str(path))
    res = _run(ba.NumpyBN(PRESETS["pytorch"], "biased_running_var"), ledger=ledger)
    assert not bad_checks(res)
    xf = [c for c in res.checks if c.status == "xfail"]
    assert xf and all(c.reason == "stores the biased variance" for c in xf)
    _run(ba.NumpyBN(PRESETS["pytorch"]), ledger=ledger)
    assert [e.state for e in ledger] == ["deviation", "xpass"]


def test_ledger_rejects_incomplete_entries(tmp_path):
    path = tmp_path / "ledger.toml"
    path.write_text('[[deviation]]\nadapter = "x"\ncase = "*"\n')
    with pytest.raises(ValueError, match="check, reason"):
        engine.load_ledger(str(path))


def test_shipped_ledger_parses():
    entries = engine.load_ledger(default_ledger_path())
    assert len(entries) >= 1 and all(e.reason for e in entries)


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("rank4", {"rank4-float64", "rank4-axis1-float64", "rank4-axislast-float64", "single-value-rank4-float64"}),
        ("rank4 and not axis and not single", {"rank4-float64"}),
        ("(rank2 or rank3) and not (axis or single or sequence or dtype)", {"rank2-float64", "rank3-float64"}),
        ("bfloat16", {"dtype-bfloat16"}),
        ("sequence and float32", {"sequence-float32"}),
    ],
)
def test_k_selection(expr, expected):
    specs, _ = cs.select(expr)
    assert {s.id for s in specs} == expected


def test_k_selection_rejects_bad_expressions():
    for bad in ("rank4 and", "(rank4", "and rank4"):
        with pytest.raises(ValueError):
            cs.compile_k(bad)


def test_cases_are_deterministic_and_rounded_to_dtype():
    import ml_dtypes

    spec = next(s for s in cs.CATALOGUE if s.id == "dtype-bfloat16")
    a = cs.instantiate(spec, PRESETS["flax"])
    b = cs.instantiate(spec, PRESETS["flax"])
    assert len(a) == len(spec.modes) == 3
    for ca, cb in zip(a, b):
        np.testing.assert_array_equal(ca.x, cb.x)
        np.testing.assert_array_equal(ca.x, ca.x.astype(ml_dtypes.bfloat16).astype(np.float64))
    # Channel-last under flax, channel-first under pytorch: the same values, moved.
    p = cs.instantiate(spec, PRESETS["pytorch"])[0]
    assert a[0].feature_axis == 3 and p.feature_axis == 1
    np.testing.assert_array_equal(np.moveaxis(p.x, 1, 3), a[0].x)


SEL = "rank2-float64 or sequence-rank2 or nan-channel-float64"


def test_cli_exit_status_correct_adapter(tmp_path, conformance_cli):
    r = conformance_cli("--adapter", "broken_adapters:correct", "-k", SEL, "--no-ledger", "--json", str(tmp_path / "r.json"),
             "--markdown", str(tmp_path / "c.md"))
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [a["name"] for a in rep["adapters"]] == ["numpy-bn[correct] @pytorch", "numpy-bn[correct] @flax"]
    assert rep["unexpected"] == 0 and rep["totals"]["pass"] > 50
    md = (tmp_path / "c.md").read_text()
    assert "python -m bn_ref.conformance" in md and "numpy-bn[correct] @pytorch" in md
    assert "[bn_ref" not in r.stdout  # progress goes to stderr
    assert "numpy-bn[correct] @flax" in r.stderr


@pytest.mark.parametrize("bug", ["eps_outside_sqrt", "nan_leak"])
def test_cli_exit_status_broken_adapter(bug, conformance_cli):
    r = conformance_cli("--adapter", f"broken_adapters:{bug}", "-k", SEL, "--no-ledger", "-q")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "UNEXPECTED FAILURES" in r.stdout and bug in r.stdout


def test_cli_bad_adapter_spec_and_list(conformance_cli):
    r = conformance_cli("--adapter", "no_such_module_xyz:factory", "-k", "rank2-float64", "-q")
    assert r.returncode == 1 and "ERROR" in r.stdout
    r = conformance_cli("--list", "-k", "rank2 or random-float64")
    assert r.returncode == 0
    assert r.stdout.split()[0] == "rank2-float64" and "random-float64" in r.stdout
    r = conformance_cli("-k", "no-such-case-anywhere")
    assert r.returncode == 2


def test_vectors_round_trip_and_tamper_detection(tmp_path):
    d = tmp_path / "vec"
    m = vectors.export_vectors(d, k="rank3-float64 or single-value-rank2 or sequence-rank2",
                               conventions=("pytorch", "flax"))
    assert len(m["cases"]) == 2 * (2 + 1 + 7)
    assert vectors.check_vectors(d) == []
    man = json.loads((d / "manifest.json").read_text())
    assert man["format"] == vectors.FORMAT and man["tolerances"]["float32"]["rtol"] > 0
    # 1) a flipped byte in one file is caught by its hash
    victim = d / next(iter(man["files"]))
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    probs = vectors.check_vectors(d)
    assert any("SHA-256 mismatch" in p for p in probs)
    # 2) a wrong expected array with a matching hash is caught by the oracle
    d = tmp_path / "vec2"
    vectors.export_vectors(d, k="rank3-float64", conventions=("pytorch",))
    man = json.loads((d / "manifest.json").read_text())
    rel = man["cases"][0]["expected"]["y"]
    np.save(d / rel, np.load(d / rel) * (1 + 1e-6))
    man["files"][rel] = vectors._sha256(d / rel)
    (d / "manifest.json").write_text(json.dumps(man))
    probs = vectors.check_vectors(d)
    assert any("differs from the oracle" in p for p in probs), probs


def test_vectors_cli(tmp_path, conformance_cli):
    d = tmp_path / "v"
    r = conformance_cli("export-vectors", str(d), "-k", "rank2-float64", "--convention", "onnx")
    assert r.returncode == 0, r.stderr
    assert conformance_cli("check-vectors", str(d)).returncode == 0
    (d / "stray.npy").write_bytes(b"x")
    r = conformance_cli("check-vectors", str(d))
    assert r.returncode == 1 and "not listed" in r.stderr


def test_bn_ref_main_dispatcher():
    from bn_ref.__main__ import main

    r = subprocess.run([sys.executable, "-m", "bn_ref", "frobnicate"], capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "frobnicate" in r.stderr
    assert main(["conformance", "--list", "-k", "rank2-float64"]) == 0


def test_builtin_torch_nn_adapter_passes_a_small_selection(bad_checks):
    pytest.importorskip("torch")
    loaded = load("bn_ref.conformance.adapters.frameworks_torch:factory")
    assert loaded.error is None and loaded.adapters
    specs = [s for s in cs.CATALOGUE if s.id in ("rank4-float64", "sequence-rank2-float64", "dtype-bfloat16")]
    res = engine.run_adapter(loaded.adapters[0], specs, ())
    assert not bad_checks(res) and sum(c.status == "pass" for c in res.checks) > 30


def _has_cuda() -> bool:
    try:
        import torch
    except ModuleNotFoundError:
        return False
    return torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
def test_cuda_rows_pass_a_small_selection(bad_checks):
    specs = [s for s in cs.CATALOGUE if s.id in ("rank4-float64", "sequence-float32", "dtype-bfloat16",
                                                  "layout-channels-last-float32")]
    rows = []
    for f in ("bn_ref.conformance.adapters.bnref_torch:factory", "bn_ref.conformance.adapters.frameworks_torch:factory"):
        loaded = load(f)
        assert loaded.error is None, loaded.error
        rows += [a for a in loaded.adapters if "cuda" in a.name]
    assert len(rows) >= 6
    for a in rows:
        res = engine.run_adapter(a, specs, ())
        assert not bad_checks(res), (a.name, [c.message for c in bad_checks(res)][:3])


def _has_jax_gpu() -> bool:
    try:
        import jax
    except ModuleNotFoundError:
        return False
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not _has_jax_gpu(), reason="needs a JAX GPU")
def test_jax_gpu_rows_pass_a_small_selection(tmp_path, conformance_cli):
    # In a subprocess: the JAX adapters enable float64 process-wide, which must not leak into other tests.
    r = conformance_cli("--adapter", "bn_ref.conformance.adapters.bnref_jax:factory", "-k",
             "rank4-float64 or sequence-float32 or dtype-bfloat16", "-q", "--json", str(tmp_path / "r.json"),
             timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    rep = json.loads((tmp_path / "r.json").read_text())
    gpu = [a for a in rep["adapters"] if "[gpu]" in a["name"]]
    assert len(gpu) == 4
    assert all(a["groups"]["forward"]["status"] == "pass" for a in gpu)


def test_docs_example_adapter_conforms(tmp_path, conformance_cli):
    """The complete minimal adapter in docs/adapters.md must really conform (and skip non-float64)."""
    text = (ROOT / "docs" / "adapters.md").read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_bn_adapter.py").write_text(code)
    r = conformance_cli("--adapter", "my_bn_adapter:factory", "-k", SEL + " or dtype-float32 or single-value-rank2",
             "--no-ledger", "--json", str(tmp_path / "r.json"), env_extra={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    (a,) = rep["adapters"]
    assert a["name"] == "my-numpy-bn" and a["groups"]["backward"]["status"] == "pass"
    assert a["groups"]["errors"]["status"] == "pass"
    assert [s["case"] for s in a["skipped_cases"]] == ["dtype-float32"]


def test_missing_framework_skips_the_row_but_a_broken_backend_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "needs_keras_xyz.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'keras'\", name='keras')\ndef factory():\n    pass\n")
    (tmp_path / "buggy_backend_xyz.py").write_text("def factory():\n    raise AttributeError('half-written backend')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    skipped = load("needs_keras_xyz:factory")
    assert skipped.skip == "keras is not installed" and skipped.error is None
    broken = load("buggy_backend_xyz:factory")
    assert broken.error == "AttributeError: half-written backend" and broken.skip is None


def test_keras_imported_with_another_backend_is_skipped_with_the_reason(tmp_path, conformance_cli):
    pytest.importorskip("keras")
    (tmp_path / "keras_numpy_first.py").write_text(
        "import os\nos.environ['KERAS_BACKEND'] = 'numpy'\nimport keras  # noqa\n"
        "from bn_ref.conformance.adapters.keras_adapter import factory  # noqa\n")
    r = conformance_cli("--adapter", "keras_numpy_first:factory", "-k", "rank2-float64", "--json", str(tmp_path / "r.json"),
             "-q", env_extra={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    (a,) = json.loads((tmp_path / "r.json").read_text())["adapters"]
    assert a["skipped_cases"] and "backend 'numpy'" in a["skipped_cases"][0]["reason"]


def test_cli_ledger_deviation_exit_codes_and_strict_xpass(tmp_path, conformance_cli):
    led = tmp_path / "ledger.toml"
    led.write_text('[[deviation]]\nadapter = "numpy-bn[eps_outside_sqrt]*"\ncase = "*"\ncheck = "*"\n'
                   'reason = "eps outside the root"\nmax_rel = 1.0\n'
                   '[[deviation]]\nadapter = "numpy-bn[correct]*"\ncase = "*"\ncheck = "y"\nreason = "stale"\n'
                   'max_units = 2\n')
    r = conformance_cli("--adapter", "broken_adapters:eps_outside_sqrt", "-k", SEL, "--ledger", str(led), "-q")
    assert r.returncode == 0, r.stdout  # every failure is a recorded deviation
    assert "EXPECTED DEVIATIONS" in r.stdout and "eps outside the root" in r.stdout
    r = conformance_cli("--adapter", "broken_adapters:correct", "-k", SEL, "--ledger", str(led), "-q")
    assert r.returncode == 0 and "XPASS" in r.stdout
    r = conformance_cli("--adapter", "broken_adapters:correct", "-k", SEL, "--ledger", str(led), "-q", "--strict")
    assert r.returncode == 1


def test_builtin_jax_and_framework_rows_find_the_recorded_deviations(tmp_path, conformance_cli):
    """The real Flax fast-variance defect is caught and ledgered; the two-pass variants and bn-ref pass."""
    pytest.importorskip("flax")
    pytest.importorskip("keras")
    pytest.importorskip("onnx")
    args = []
    for m in ("frameworks_flax", "bnref_jax", "keras_adapter", "onnx_adapter"):
        args += ["--adapter", f"bn_ref.conformance.adapters.{m}:factory"]
    r = conformance_cli(*args, "-k", "rank4-float64 or large-mean-float32", "-q", "--json", str(tmp_path / "r.json"),
                        "--ledger", default_ledger_path(), timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    rows = {a["name"]: a for a in json.loads((tmp_path / "r.json").read_text())["adapters"]}
    assert len(rows) >= 11, sorted(rows)  # 4 Flax + 4 bn-ref JAX + Keras + 2 ONNX on CPU
    for name, a in rows.items():
        statuses = {g: c["status"] for g, c in a["groups"].items()}
        if "use_fast_variance=True" in name:
            assert statuses["running"] == "xfail" and statuses["forward"] == "xfail", (name, statuses)
        elif name.startswith(("bn_ref.", "flax.")):
            assert set(statuses.values()) <= {"pass", "none"}, (name, statuses)
        elif name.startswith("keras"):
            # float64 computed in float32: judged at float32 tolerance (declared), reported as a finding
            assert statuses["forward"] == "pass" and any("float32" in f for f in a["findings"]), (name, a)


def test_committed_golden_vectors_still_verify():
    """conformance/vectors (a small committed set) must match today's oracle and its own hashes."""
    d = ROOT / "conformance" / "vectors"
    man = json.loads((d / "manifest.json").read_text())
    assert len(man["cases"]) == 15 and len(man["files"]) > 100
    assert vectors.check_vectors(d) == []


# -- a harness that survives any adapter (issue 13, item 5) ---------------------------------------

MISBEHAVING = ("exits_on_sequence", "segfaults_on_nan", "hangs_on_sequence", "crashes_instead_of_raising",
               "exits_in_skip_on_nan", "empty",
               "needs_missing_framework", "exits_on_load", "hangs_on_load")
SURVIVE_SEL = "rank2-float64 or sequence-rank2 or nan-channel-float64 or single-value-rank2"


def test_isolated_adapters_crash_hang_or_build_nothing_and_the_run_goes_on(tmp_path, conformance_cli):
    args = [a for name in MISBEHAVING + ("correct",) for a in ("--adapter", f"broken_adapters:{name}")]
    r = conformance_cli(*args, "--timeout", "4", "-k", SURVIVE_SEL, "--no-ledger", "-q",
                        "--json", str(tmp_path / "r.json"), timeout=200)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    rows = {a["name"]: a for a in rep["adapters"]}
    assert len(rows) == len(MISBEHAVING) + 2, sorted(rows)  # 5 running rows, 4 load rows, correct x2
    errors = {(c["adapter"], c["step"]): c["message"] for c in rep["non_pass_checks"] if c["status"] == "error"}

    def only_error(name: str, step: str, phrase: str) -> None:
        mine = {s: m for (a, s), m in errors.items() if a == name}
        assert list(mine) == [step], mine
        assert phrase in mine[step], mine[step]
        n_pass = sum(c["counts"].get("pass", 0) for c in rows[name]["groups"].values())
        assert n_pass > 20, rows[name]  # the cases before and after the crash ran and passed

    only_error("numpy-bn[exit on sequence] @pytorch", "sequence-rank2-float64/step0-train", "exited with status 3")
    only_error("numpy-bn[segfault on nan-channel] @pytorch", "nan-channel-float64/step0-train", "SIGSEGV")
    only_error("numpy-bn[hang on sequence] @pytorch", "sequence-rank2-float64/step0-train",
               "did not answer within --timeout 4 s")
    # A crash on the case that must raise is an error, never a conforming "raise".
    only_error("numpy-bn[exit on single-value] @pytorch", "single-value-rank2-float64", "exited with status 3")
    assert rows["numpy-bn[exit on single-value] @pytorch"]["groups"]["errors"]["status"] == "error"
    only_error("numpy-bn[exit in skip on nan-channel] @pytorch", "nan-channel-float64/step0-train", "in skip(case)")
    assert "no adapter" in rows["broken_adapters:empty"]["build_error"]
    assert rows["broken_adapters:needs_missing_framework"]["build_error"] is None
    assert "not_installed_framework_xyz is not installed" in rows["broken_adapters:needs_missing_framework"]["build_skip"]
    assert "exited with status 7" in rows["broken_adapters:exits_on_load"]["build_error"]
    assert "did not answer within --timeout 4 s" in rows["broken_adapters:hangs_on_load"]["build_error"]
    for name in ("numpy-bn[correct] @pytorch", "numpy-bn[correct] @flax"):
        assert {c["status"] for c in rows[name]["groups"].values()} <= {"pass", "none"}, rows[name]
    t = rep["totals"]
    assert t["build_errors"] == 3 and t["build_skips"] == 1 and t["error"] == 5
    assert rep["unexpected"] == 8
    assert "8 errors (3 adapters failed to load)" in r.stdout  # 5 case errors + 3 rows that did not load


def test_a_row_that_fails_to_load_is_counted_and_an_empty_factory_is_an_error(conformance_cli):
    r = conformance_cli("--adapter", "broken_adapters:empty", "-k", "rank2-float64", "--no-ledger", "-q",
                        "--in-process")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "0 passed" in r.stdout and "1 error (1 adapter failed to load)" in r.stdout
    assert "0 errors" not in r.stdout


@pytest.mark.parametrize("args, phrase", [
    (("--adapter", "broken_adapters"), "expected package.module:factory"),
    (("--adapter", "broken_adapters:"), "expected package.module:factory"),
    (("--frobnicate",), "unrecognized arguments"),
    (("--timeout", "0"), "must be > 0"),
    (("--max-examples", "-1"), "--max-examples"),
    (("-k", "rank2 and"), "unexpected end"),
])
def test_usage_errors_exit_2_with_one_line(args, phrase, conformance_cli):
    r = conformance_cli(*args, "-q")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert phrase in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


# -- failures that explain themselves (issue 13, item 6) ------------------------------------------

EXPLAINED = {  # factory -> the neighbouring convention that explains every failure of the row
    "eps_1e_3": "eps=0.001",
    "momentum_wrong_term": "momentum_on='running'",
    "biased_running_var": "running_var='biased'",
    "eps_outside_sqrt": None,  # no convention produces eps outside the root
}


def test_failures_are_grouped_worst_first_with_ratio_and_explanation(tmp_path, conformance_cli):
    args = [a for name in EXPLAINED for a in ("--adapter", f"broken_adapters:{name}")]
    r = conformance_cli(*args, "-k", "rank2-float64 or sequence-rank2-float64", "--no-ledger",
                        "--json", str(tmp_path / "r.json"), "-q")
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    fails = [c for c in rep["non_pass_checks"] if c["status"] == "fail"]
    for factory, expected in EXPLAINED.items():
        bug = factory.replace("eps_1e_3", "eps_1e-3")
        mine = [c for c in fails if f"[{bug}]" in c["adapter"]]
        assert mine, factory
        assert {c.get("explained_by") for c in mine} == {expected}, (factory, {c.get("explained_by") for c in mine})
        assert all(isinstance(c.get("ratio"), float) for c in mine), factory
    # eps 1e-3 instead of 1e-5 shrinks y by about sqrt((var + 1e-5) / (var + 1e-3)): a ratio just below 1.
    eps_y = [c for c in fails if "[eps_1e-3]" in c["adapter"] and c["key"] == "y"]
    assert eps_y and all(0.99 < c["ratio"] < 1.0 for c in eps_y), [c["ratio"] for c in eps_y]
    # Console: one header per (adapter, check), worst first, each line with units, ratio and the explanation.
    out = r.stdout.split("UNEXPECTED FAILURES", 1)[1]
    heads = [ln for ln in out.splitlines() if ln.startswith("  ") and not ln.startswith("    ")]
    worst = [float(h.rsplit("worst ", 1)[1].split()[0]) for h in heads if "worst " in h]
    assert len(worst) == len(heads) >= 8 and worst == sorted(worst, reverse=True), heads
    assert "x tolerance" in out and "x oracle; behaves as if eps=0.001 --" in out
    assert "behaves as if momentum_on='running'" in out and "behaves as if running_var='biased'" in out


def test_a_printed_rerun_command_and_step_id_select_the_failure(conformance_cli):
    r = conformance_cli("--adapter", "broken_adapters:momentum_wrong_term", "-k", "sequence-rank2-float64",
                        "--no-ledger", "-q")
    assert r.returncode == 1
    rerun = next(ln.split("rerun: ", 1)[1] for ln in r.stdout.splitlines() if "rerun: " in ln)
    step = shlex.split(rerun)[shlex.split(rerun).index("-k") + 1]
    assert "/step" in step, rerun
    r2 = conformance_cli(*shlex.split(rerun)[3:])
    assert r2.returncode == 1 and f"FAIL {step}:" in r2.stdout, r2.stdout + r2.stderr
    listed = conformance_cli("--list", "-k", step)
    assert listed.returncode == 0 and listed.stdout.split()[0] == step.split("/")[0], listed.stdout


def test_printed_reproduction_snippet_runs_as_printed(conformance_cli):
    r = conformance_cli("--adapter", "broken_adapters:unbiased_normalize", "-k", "random-float64", "--no-ledger",
                        "-q")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.split("reproduce with:\n", 1)[1].splitlines()
    snippet = []
    for ln in lines:
        if ln and not ln.startswith("    "):
            break
        snippet.append(ln[4:])
    code = "\n".join(snippet)
    assert "adapter = next(a for a in load('broken_adapters:unbiased_normalize')" in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<printed snippet>", "exec"), {})
    assert "fail y" in out.getvalue(), out.getvalue()


# -- clean edges (issue 13, item 7) ---------------------------------------------------------------


def test_no_warnings_from_the_harness_itself(tmp_path, conformance_cli):
    sel = "nan-channel or inf-channel or zero-variance or single-value-rank2 or rank2-float64"
    r = conformance_cli("export-vectors", str(tmp_path / "v"), "-k", sel, python_flags=("-W", "error"))
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr[-3000:]
    r = conformance_cli("--adapter", "broken_adapters:correct", "--in-process", "-k", sel + " or random-float64",
                        "--no-ledger", "--json", str(tmp_path / "r.json"), python_flags=("-W", "error"))
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    err = tmp_path / "stderr.txt"
    env = dict(os.environ, PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(err, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "bn_ref.conformance", "--adapter", "broken_adapters:hangs_on_sequence",
                              "-k", "sequence-rank2-float64", "--no-ledger", "--timeout", "120"],
                             stdout=subprocess.PIPE, stderr=f, text=True, env=env, cwd=str(ROOT))
        try:
            deadline = time.monotonic() + 60
            while "[broken_adapters 1/1]" not in err.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.5)  # inside the hanging call
            p.send_signal(signal.SIGINT)
            out, _ = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
    text = err.read_text()
    assert p.returncode == 130, (p.returncode, text)
    assert "Traceback" not in text and out == ""
    assert text.strip().splitlines()[-1] == "interrupted (Ctrl-C): no report written", text
