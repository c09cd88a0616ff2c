"""The framework-family machinery: the family table, merging family reports, rows for families that
cannot run, and one light framework row (stax, which ships with JAX) run through the engine.

The heavy frameworks (TensorFlow, Paddle, MLX, ...) are not needed here: their rows are exercised
by ``nox -s conformance`` in their own environments.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bn_ref.conformance import families, merge
from bn_ref.conformance.cases import ALL_SPECS, instantiate
from bn_ref.conformance.cli import run as cli_run
from bn_ref.conventions import FAMILY_PRESETS, PRESETS

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "bn_ref" / "conformance" / "adapters"


# -- the family table ------------------------------------------------------------------------


def test_family_names_unique_and_core_first():
    names = [f.name for f in families.FAMILIES]
    assert len(names) == len(set(names)) >= 10
    assert names[0] == "core" and families.FAMILIES[0].core


@pytest.mark.parametrize("fam", [f for f in families.FAMILIES if not f.core], ids=lambda f: f.name)
def test_every_family_names_existing_adapters_and_an_install(fam):
    assert fam.adapters and fam.steps and fam.what
    for spec in fam.adapters:
        mod, _, attr = spec.partition(":")
        assert attr == "factory"
        assert (ADAPTERS / (mod.rsplit(".", 1)[-1] + ".py")).is_file(), spec


def test_families_that_share_an_env_install_the_same_steps():
    by_env: dict[str, set] = {}
    for f in families.FAMILIES:
        if not f.core:
            by_env.setdefault(f.env_name, set()).add(f.steps)
    assert by_env["tensorflow"] == {families.TF_STEPS}  # keras-tensorflow shares tensorflow's venv
    assert all(len(steps) == 1 for steps in by_env.values())


def test_keras_backend_families_fix_their_backend():
    backends = {f.name: dict(f.variables).get("KERAS_BACKEND") for f in families.FAMILIES if f.name.startswith("keras-")}
    assert backends == {"keras-tensorflow": "tensorflow", "keras-torch": "torch", "keras-numpy": "numpy",
                        "keras-jax": "jax"}


def test_select():
    assert [f.name for f in families.select(["tensorflow"])] == ["tensorflow"]
    assert [f.name for f in families.select(["mlx,paddle"])] == ["mlx", "paddle"]
    assert len(families.select(None)) == len(families.FAMILIES)
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        families.select(["nope"])


def test_requirement_key_changes_with_the_steps():
    tf = families.get("tensorflow")
    other = families.Family("tensorflow", tf.adapters, (("tensorflow-cpu==2.20.*",),))
    assert tf.requirement_key() != other.requirement_key()
    assert tf.requirement_key() == families.get("keras-tensorflow").requirement_key()


def test_family_presets_are_documented_and_distinct_from_presets():
    assert set(FAMILY_PRESETS) == {"haiku", "equinox", "stax", "mlx", "paddle", "mindspore"}
    assert not set(FAMILY_PRESETS) & set(PRESETS)
    for name, conv in FAMILY_PRESETS.items():
        assert conv.name == name and "custom" not in conv.description
    # Each preset states the framework's own numbers, as read from its source and run in its row.
    assert (FAMILY_PRESETS["paddle"].momentum, FAMILY_PRESETS["paddle"].momentum_on) == (0.9, "running")
    assert (FAMILY_PRESETS["mlx"].running_var, FAMILY_PRESETS["mlx"].feature_axis) == ("unbiased", -1)
    assert FAMILY_PRESETS["equinox"].feature_axis == 1 and FAMILY_PRESETS["haiku"].eps == 1e-5


# -- rows for families that cannot run ----------------------------------------------------------


def test_missing_report_has_a_row_per_adapter_with_the_reason():
    fam = families.get("jax-libraries")
    rep = families.missing_report(fam, "no wheel for this Python")
    assert [a["build_skip"] for a in rep["adapters"]] == ["no wheel for this Python"] * 3
    assert rep["unexpected"] == 0 and rep["totals"]["build_errors"] == 0
    err = families.missing_report(fam, "harness crashed", error=True)
    assert err["unexpected"] == 3 and all(a["build_error"] == "harness crashed" for a in err["adapters"])


def test_a_family_whose_env_cannot_be_built_yields_a_reasoned_row(tmp_path):
    fam = families.Family("broken", ("bn_ref.conformance.adapters.stax_adapter:factory",),
                          (("--no-index", "--find-links", str(tmp_path), "bn-ref-no-such-package"),))
    report = families.run_family(fam, tmp_path / "out", root=ROOT, envs=tmp_path / "envs", log=lambda m: None)
    rep = json.loads(report.read_text())
    (row,) = rep["adapters"]
    assert row["build_skip"].startswith("environment not built: `pip install")
    assert "bn-ref-no-such-package" in row["build_skip"]
    meta = json.loads((tmp_path / "out" / "broken.meta.json").read_text())
    assert meta["reason"] == row["build_skip"] and meta["reused"] is False



def test_jobs_runs_families_concurrently_and_records_the_run(tmp_path, monkeypatch):
    """--jobs 2 on two families sharing one (unbuildable) venv: both get their reasoned report, the
    shared venv is built under a lock (one at a time), and _matrix.meta.json records the run."""
    steps = (("--no-index", "--find-links", str(tmp_path), "bn-ref-no-such-package"),)
    pair = (families.Family("broken-a", ("bn_ref.conformance.adapters.stax_adapter:factory",), steps, env="shared"),
            families.Family("broken-b", ("bn_ref.conformance.adapters.stax_adapter:factory",), steps, env="shared"))
    monkeypatch.setattr(families, "FAMILIES", pair)
    out = tmp_path / "out"
    assert families.main(["run", "--out", str(out), "--envs", str(tmp_path / "envs"), "--jobs", "2"]) == 0
    for name in ("broken-a", "broken-b"):
        (row,) = json.loads((out / f"{name}.json").read_text())["adapters"]
        assert "bn-ref-no-such-package" in row["build_skip"]
    run = json.loads((out / families.MATRIX_META).read_text())
    assert run["families"] == ["broken-a", "broken-b"] and run["jobs"] == 2 and run["wall_s"] >= 0


# -- merging -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle_report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("fam") / "core.json"
    status = cli_run(["--adapter", "bn_ref.conformance.adapters.oracle_check:factory", "-k", "rank2-float64",
                      "--json", str(path), "-q"])  # the shipped ledger bounds the finite-difference row
    assert status == 0
    return json.loads(path.read_text())


def test_merge_joins_rows_totals_and_reasons(oracle_report):
    missing = families.missing_report(families.get("mindspore"), "mindspore has no wheel for Python 3.11")
    merged = merge.merge_reports([("core", oracle_report), ("mindspore", missing)],
                                 meta={"core": {"harness_s": 1.5, "env": "core"},
                                       "mindspore": {"env": ".nox/family-mindspore", "reason": "no wheel"}})
    assert len(merged["adapters"]) == len(oracle_report["adapters"]) + 1
    assert [a["family"] for a in merged["adapters"]][-1] == "mindspore"
    assert merged["totals"]["pass"] == oracle_report["totals"]["pass"] > 0
    assert merged["unexpected"] == 0
    md = merge.render(merged)
    assert "mindspore has no wheel for Python 3.11" in md
    n_core = len(oracle_report["adapters"])
    assert "## Framework families" in md and f"| core | {n_core} | {merged['totals']['pass']} | 1.5 |" in md
    assert "| mindspore | 1 | 0 | - | - | - | - | no wheel |" in md
    assert "Sum over the families: 1.5 s of harness time" in md


def test_family_table_reports_cpu_load_and_the_whole_run(oracle_report):
    merged = merge.merge_reports([("core", oracle_report)],
                                 meta={"core": {"harness_s": 9.0, "cpu_s": 4.5, "env": "core",
                                                "load_avg_start": [3.1, 2.0, 1.0], "load_avg_end": [4.2, 2.5, 1.1]}})
    merged["matrix"] = {"wall_s": 9.5, "jobs": 2, "cpu_count": 2, "load_avg_start": [3.1, 2.0, 1.0],
                        "load_avg_end": [4.2, 2.5, 1.1]}
    md = merge.family_table(merged)
    assert "| 9.0 | 4.5 | 3.1 / 4.2 | (core env) |" in md
    assert "9.5 s wall with `--jobs 2` on 2 CPUs" in md


def test_wait_measures_the_child_cpu_seconds():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                          "while time.process_time() - t < 0.3: pass"])
    rc, cpu = families._wait(p)
    assert rc == 0 and p.returncode == 0
    assert cpu is None or 0.25 <= cpu < 5


def test_merge_adds_ledger_counts_across_families(oracle_report):
    def with_entry(matched: int, passed: int, state: str) -> dict:
        rep = json.loads(json.dumps(oracle_report))
        rep["ledger"] = {"path": "conformance/ledger.toml", "entries": [
            {"adapter": "a*", "case": "*", "check": "*", "reason": "r", "max_units": 3.0,
             "matched": matched, "passed": passed, "state": state}]}
        rep["totals"]["xpass_entries"] = int(state == "xpass")
        return rep

    merged = merge.merge_reports([("one", with_entry(0, 4, "xpass")), ("two", with_entry(2, 1, "deviation")),
                                  ("three", with_entry(0, 0, "unexercised"))])
    (entry,) = merged["ledger"]["entries"]
    assert (entry["matched"], entry["passed"], entry["state"], entry["max_units"]) == (2, 5, "deviation", 3.0)
    assert merged["totals"]["xpass_entries"] == 0
    only_pass = merge.merge_reports([("one", with_entry(0, 4, "xpass")), ("three", with_entry(0, 0, "unexercised"))])
    assert only_pass["ledger"]["entries"][0]["state"] == "xpass" and only_pass["totals"]["xpass_entries"] == 1


def test_merge_cli_reads_a_directory(tmp_path, oracle_report):
    (tmp_path / "core.json").write_text(json.dumps(oracle_report))
    (tmp_path / "core.meta.json").write_text(json.dumps({"family": "core", "env": "core", "harness_s": 2.0}))
    (tmp_path / "paddle.json").write_text(json.dumps(families.missing_report(families.get("paddle"), "skipped here")))
    status = merge.main([str(tmp_path), "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "c.md")])
    assert status == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [f["family"] for f in rep["families"]] == ["core", "paddle"]
    assert "skipped here" in (tmp_path / "c.md").read_text()
    with pytest.raises(ValueError):
        merge.merge_reports([])


# -- one light framework row: stax (ships with JAX) -------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_stax_row_against_the_oracle():
    from bn_ref.conformance.adapters import stax_adapter
    from bn_ref.conformance.engine import check_steps

    adapter, defaults = stax_adapter.factory()
    assert defaults.defaults and defaults.name.endswith("(defaults)") and not adapter.defaults
    specs = {s.id: s for s in ALL_SPECS}
    res = check_steps(adapter, adapter.name, "rank4-float64", instantiate(specs["rank4-float64"], adapter.convention))
    status = {(r.step.rsplit("/", 1)[-1], r.key): r.status for r in res}
    # training: y and the gradients conform; eval is declined (stax keeps no running statistics)
    assert {k: v for k, v in status.items() if k[0] == "step0-train"} == {
        ("step0-train", "y"): "pass", ("step0-train", "running_mean"): "skip", ("step0-train", "running_var"): "skip",
        ("step0-train", "dx"): "pass", ("step0-train", "dgamma"): "pass", ("step0-train", "dbeta"): "pass"}
    assert status[("step1-eval", "*")] == "skip"
    # stax's one-pass variance (jax.nn.standardize's default) fails the large-mean float64 case
    res = check_steps(adapter, adapter.name, "large-mean-float64",
                      instantiate(specs["large-mean-float64"], adapter.convention))
    y = [r for r in res if r.key == "y"]
    assert y and y[0].status == "fail" and y[0].units > 100
    assert "jax" in sys.modules
