"""The framework facts of docs/spec.md, executed against the installed frameworks.

A core cell of the spec's §9 table that no longer matches what the installed framework does fails
here (executed); a family row (frameworks run in their own venvs, not installed in CI) fails when it
differs from the committed facts `conformance/facts/NAME.json` that `nox -s conformance` regenerates
by running the family's probes; so does a spec whose version is not the package's. The d2l row's layer is checked against the seed's own code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import bn_ref
from bn_ref import oracle
from bn_ref.conformance import facts, families
from bn_ref.conformance.facts_families import FAMILY_PROBES

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
SEED = ROOT.parent / "shared" / "seed" / "d2l-batch-norm-notes.txt"

KEYS = list(facts.PROBES)


FAMILY_ROWS = 15
"""Committed family rows: tf.keras ×2, Keras 3 ×3, Haiku ×2, Equinox ×2, stax, tinygrad, Paddle, MLX, MindSpore,
OpenVINO — one per implementation the families run (keras-jax's is the core Keras row)."""


def test_every_row_is_probed():
    assert len(KEYS) == 7
    rows = facts.spec_table(SPEC.read_text(encoding="utf-8")).splitlines()
    assert rows[:2] == facts.HEADER.splitlines()
    committed = facts.load_family_facts()
    assert sum(len(r) for _, r in committed) == FAMILY_ROWS
    assert len(rows) - 2 == len(KEYS) + FAMILY_ROWS, "the §9 table and the probes list different rows"


def test_every_family_with_probes_has_committed_rows_of_those_probes():
    """conformance/facts/NAME.json holds one row per probe of the family, in probe order, with the
    framework version it ran (so a new framework version shows up as a diff)."""
    order = facts.family_order()
    assert order == [f.name for f in families.FAMILIES if f.name in FAMILY_PROBES]
    assert set(order) == set(FAMILY_PROBES)
    for fam, rows in facts.load_family_facts():
        doc = json.loads((facts.FACTS_DIR / f"{fam}.json").read_text(encoding="utf-8"))
        assert [r["key"] for r in doc["rows"]] == list(FAMILY_PROBES[fam]), fam
        for p in rows:
            assert re.search(r"\d+\.\d+", p.version), (fam, p.version)
            assert all(getattr(p, f).strip() for f in p.__dataclass_fields__), (fam, p)


def test_spec_family_rows_are_the_committed_facts():
    """(b) The §9 rows after the core ones are exactly what the committed family facts render to."""
    rows = facts.spec_table(SPEC.read_text(encoding="utf-8")).splitlines()[2 + len(KEYS):]
    want = [p.row() for _, prof in facts.load_family_facts() for p in prof]
    assert rows == want, "docs/spec.md §9 family rows are stale; regenerate with " \
        "`python -m bn_ref.conformance facts --write docs/spec.md`"


def test_family_runner_writes_the_facts_file(tmp_path):
    """run_family's fact step runs `facts --family NAME --json OUT/NAME.facts.json` in the family's
    process: keras-jax (no probes of its own: the core Keras row is its backend) writes an empty
    document; an unknown family is a usage error."""
    import sys

    fam = families.get("keras-jax")
    meta = families._run_facts(fam, Path(sys.executable), tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               root=ROOT, log=lambda m: None)
    assert meta["facts_exit_status"] == 0 and "facts_reason" not in meta, meta
    doc = json.loads((tmp_path / "keras-jax.facts.json").read_text(encoding="utf-8"))
    assert doc == {"schema": facts.SCHEMA, "family": "keras-jax", "rows": []}
    with pytest.raises(SystemExit) as exc:
        facts.main(["--family", "no-such-family"])
    assert exc.value.code == 2


def test_table_generation_round_trip(tmp_path):
    """collect → load → render → write into a spec: a changed family cell changes the table; a family
    whose run wrote nothing keeps its committed rows; a missing committed file is an error."""
    fdir = tmp_path / "facts"
    fdir.mkdir()
    for fam in facts.family_order():
        (fdir / f"{fam}.json").write_text((facts.FACTS_DIR / f"{fam}.json").read_text(encoding="utf-8"), encoding="utf-8")
    core = [facts.Profile("X", "x 1.0", "1e-5", "0.1 B", "unbiased", "1", "`ValueError`", "n0", "two-pass",
                          "bfloat16", "`pytorch`")]
    before = facts.full_table(core, fdir)
    runs = tmp_path / "runs"
    runs.mkdir()
    doc = json.loads((fdir / "mlx.json").read_text(encoding="utf-8"))
    doc["rows"][0]["version"] = "mlx 99.0"
    (runs / "mlx.facts.json").write_text(json.dumps(doc), encoding="utf-8")
    (runs / "paddle.facts.json").write_text(json.dumps({"schema": facts.SCHEMA, "family": "paddle", "rows": []}))
    assert facts.collect(runs, fdir, only=["paddle"]) == []  # a file of a family not run now is left alone
    assert facts.collect(runs, fdir) == ["mlx"]
    after = facts.full_table(core, fdir)
    diff = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(diff) == 1 and "(mlx 99.0)" in diff[0][1]
    spec = "intro\n" + facts.BEGIN + "\nold\n" + facts.END + "\nrest\n"
    new = facts.write_spec_table(spec, after)
    assert facts.spec_table(new) == after and new.startswith("intro\n") and new.endswith("rest\n")
    assert facts.Profile.from_dict(facts.Profile.from_dict(doc["rows"][0]).to_dict()) == facts.Profile.from_dict(doc["rows"][0])
    (fdir / "mlx.json").unlink()
    with pytest.raises(FileNotFoundError, match="mlx"):
        facts.load_family_facts(fdir)


@pytest.mark.parametrize("key", KEYS)
def test_spec_row_matches_the_installed_framework(key):
    rows = facts.spec_table(SPEC.read_text(encoding="utf-8")).splitlines()[2:]
    observed = facts.profile(key).row()
    assert rows[KEYS.index(key)] == observed, (
        f"docs/spec.md §9 row for {key} is stale; regenerate with `python -m bn_ref.conformance.facts`"
    )


def test_probe_classifies_a_wrong_estimator_and_term():
    """The step classifier is not a rubber stamp: it tells the four update rules apart."""
    x = np.random.default_rng(0).normal(size=(8, 3))
    n = 8
    b, v = x.mean(0), x.var(0)
    for m, term in ((0.1, "B"), (0.9, "R")):
        w_b = m if term == "B" else 1 - m
        for c, est in ((n / (n - 1), "unbiased"), (1.0, "biased")):
            rm, rv = w_b * b, (1 - w_b) + w_b * c * v
            assert facts._classify_step(x, 1, rm, rv, m) == (term, est)
    # A running mean updated with neither m nor 1 - m is named as such.
    got, _ = facts._classify_step(x, 1, 0.3 * b, 0.7 + 0.3 * v, 0.1)
    assert got.startswith("batch weight 0.3")


def test_spec_and_citation_carry_the_package_spec_version():
    text = SPEC.read_text(encoding="utf-8")
    assert re.search(r"\*\*Version (\S+)\*\*", text).group(1) == bn_ref.SPEC_VERSION
    assert f"### {bn_ref.SPEC_VERSION}" in text  # its changelog entry
    assert f"Specification version {bn_ref.SPEC_VERSION}" in (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    for anchor in ("conformance", "allowed-variations", "changelog", "§7.3", "§9", "§9.1"):
        assert f'<a id="{anchor}"></a>' in text, anchor


def test_onnx_reference_float16_accumulation():
    """§8.3: the onnx reference evaluator accumulates float16 in float16 (its variance overflows);
    onnxruntime accumulates in float32 as the schema asks."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    x = (300 + np.random.default_rng(0).normal(size=(1024, 4))).astype(np.float16)
    t = TensorProto.FLOAT16
    ins = [helper.make_tensor_value_info("X", t, [1024, 4])] + [
        helper.make_tensor_value_info(n, t, [4]) for n in ("s", "b", "m", "v")]
    outs = [helper.make_tensor_value_info(n, t, None) for n in ("Y", "rm", "rv")]
    node = helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["Y", "rm", "rv"], training_mode=1)
    model = helper.make_model(helper.make_graph([node], "bn", ins, outs), opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    feeds = {"X": x, "s": np.ones(4, np.float16), "b": np.zeros(4, np.float16), "m": np.zeros(4, np.float16),
             "v": np.ones(4, np.float16)}
    want = oracle.forward(x, None, None, np.zeros(4), np.ones(4), training=True, convention="onnx")

    with np.errstate(all="ignore"):
        y_ref, _, rv_ref = ReferenceEvaluator(model).run(None, feeds)
    assert np.isinf(rv_ref).all()
    assert np.max(np.abs(y_ref.astype(np.float64) - want.y)) > 1.0

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y_ort, _, rv_ort = sess.run(None, feeds)
    assert np.max(np.abs(y_ort.astype(np.float64) - want.y)) < 1e-2
    np.testing.assert_allclose(rv_ort.astype(np.float64), want.running_var, rtol=1e-2)


def _seed_namespace() -> dict:
    """The seed notes' batch_norm function and BatchNorm class, executed as written."""
    if not SEED.exists():
        pytest.skip(f"the seed notes are not beside the checkout ({SEED})")
    import torch
    from torch import nn

    text = SEED.read_text(encoding="utf-8")
    fn = text[text.index("def batch_norm("):text.index("return Y, moving_mean.data, moving_var.data")]
    fn += "return Y, moving_mean.data, moving_var.data\n"
    cls = text[text.index("class BatchNorm(nn.Module):"):text.index("### 简洁实现")]
    ns: dict = {"torch": torch, "nn": nn}
    exec(compile(fn + "\n" + cls, str(SEED), "exec"), ns)  # noqa: S102 - the book's own code, from the repo's notes
    return ns


@pytest.mark.parametrize("shape", [(16, 5), (6, 3, 4, 4)])
def test_d2l_scratch_is_the_seed_code(shape):
    """bn_ref.d2l_scratch (the d2l row of §9 and of the matrix) equals the seed's code, bit for bit,
    over training steps and eval; the seed's own forward returns None (its transcription omits the
    book's `return Y`), so Y is compared through the seed's batch_norm function."""
    import torch

    from bn_ref import d2l_scratch

    ns = _seed_namespace()
    num_dims = len(shape)
    seed_layer = ns["BatchNorm"](shape[1], num_dims)
    ours = d2l_scratch.BatchNorm(shape[1], num_dims=num_dims)
    rng = np.random.default_rng(3)
    for step in range(3):
        x = torch.from_numpy(rng.normal(size=shape).astype(np.float32) * 2 + 1)
        y_seed, _, _ = ns["batch_norm"](x, seed_layer.gamma, seed_layer.beta, seed_layer.moving_mean,
                                        seed_layer.moving_var, eps=1e-5, momentum=0.9)
        assert seed_layer(x) is None
        y_ours = ours(x)
        assert torch.equal(y_ours, y_seed), step
        assert torch.equal(ours.moving_mean, seed_layer.moving_mean)
        assert torch.equal(ours.moving_var, seed_layer.moving_var)
    with torch.no_grad():  # the book's eval switch
        x = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
        y_seed, _, _ = ns["batch_norm"](x, seed_layer.gamma, seed_layer.beta, seed_layer.moving_mean,
                                        seed_layer.moving_var, eps=1e-5, momentum=0.9)
        assert torch.equal(ours(x), y_seed)
