"""Conventions: preset values, validation, lookup, and the shared update rules (docs/spec.md §3, §9)."""

from __future__ import annotations

import dataclasses
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bn_ref
from bn_ref.conventions import DEFAULT, PRESETS, Convention, get_convention, resolve

# The preset values exactly as issue 2 lists them: (eps, momentum, momentum_on, running_var, feature_axis, single_value).
EXPECTED_PRESETS = {
    "pytorch": (1e-5, 0.1, "batch", "unbiased", 1, "error"),
    "flax": (1e-5, 0.99, "running", "biased", -1, "allow"),
    "keras": (1e-3, 0.99, "running", "biased", -1, "allow"),
    "tf_fused": (1e-3, 0.99, "running", "unbiased", -1, "allow"),
    "onnx": (1e-5, 0.9, "running", "biased", 1, "allow"),
    "d2l": (1e-5, 0.9, "running", "biased", 1, "allow"),
}
FIELDS = ("eps", "momentum", "momentum_on", "running_var", "feature_axis", "single_value")
assert len(EXPECTED_PRESETS) == 6


def test_field_names_are_the_public_ones():
    assert [f.name for f in dataclasses.fields(Convention)] == ["name", *FIELDS]


def test_presets_are_exactly_the_listed_ones():
    assert list(PRESETS) == list(EXPECTED_PRESETS)


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_preset_values(name):
    conv = PRESETS[name]
    assert conv.name == name
    got = tuple(getattr(conv, f) for f in FIELDS)
    assert got == EXPECTED_PRESETS[name]
    # Exact types too: eps/momentum are floats, feature_axis an int.
    assert type(conv.eps) is float and type(conv.momentum) is float and type(conv.feature_axis) is int


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_preset_description(name):
    desc = PRESETS[name].description
    assert isinstance(desc, str) and len(desc) > 20 and "\n" not in desc
    assert "custom" not in desc


def test_preset_descriptions_name_their_framework():
    words = {
        "pytorch": "PyTorch",
        "flax": "Flax",
        "keras": "Keras 3",
        "tf_fused": "fused",
        "onnx": "ONNX",
        "d2l": "d2l",
    }
    assert set(words) == set(PRESETS)
    for name, word in words.items():
        assert word in PRESETS[name].description, name


def test_custom_description():
    conv = dataclasses.replace(PRESETS["pytorch"], name="mine")
    assert "mine" in conv.description and "custom" in conv.description


def test_presets_mapping_is_read_only_and_conventions_frozen():
    with pytest.raises(TypeError):
        PRESETS["x"] = PRESETS["pytorch"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["pytorch"].eps = 1.0  # type: ignore[misc]


# -- dataclasses.replace ----------------------------------------------------------------------


def test_replace_derives_variants():
    base = PRESETS["pytorch"]
    cma = dataclasses.replace(base, name="pytorch-cma", momentum=None)
    assert cma.momentum is None and cma.eps == base.eps and cma.running_var == "unbiased"
    assert base.momentum == 0.1  # the preset is untouched
    nhwc = dataclasses.replace(base, feature_axis=-1)
    assert nhwc.feature_axis == -1 and nhwc.name == "pytorch"
    assert dataclasses.replace(base) == base


@pytest.mark.parametrize(
    "changes, exc, word",
    [
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": -1e-5}, ValueError, "eps"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"momentum_on": "both"}, ValueError, "momentum_on"),
        ({"running_var": "sample"}, ValueError, "running_var"),
        ({"single_value": "warn"}, ValueError, "single_value"),
        ({"feature_axis": "1"}, TypeError, "feature_axis"),
    ],
)
def test_replace_validates(changes, exc, word):
    with pytest.raises(exc, match=word):
        dataclasses.replace(PRESETS["flax"], **changes)


# -- get_convention ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_get_convention_by_name(name):
    assert get_convention(name) is PRESETS[name]
    assert bn_ref.get_convention(name) is PRESETS[name]


def test_get_convention_name_spelling():
    assert get_convention("PyTorch") is PRESETS["pytorch"]
    assert get_convention(" tf-fused ") is PRESETS["tf_fused"]


def test_get_convention_passes_conventions_through():
    custom = Convention("custom", 1e-4, None, "batch", "biased", 2, "allow")
    assert get_convention(custom) is custom
    assert get_convention(PRESETS["onnx"]) is PRESETS["onnx"]


def test_get_convention_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_convention("caffe")
    msg = str(info.value)
    assert "'caffe'" in msg
    for name in PRESETS:
        assert name in msg


@pytest.mark.parametrize("bad", [None, 3, 1.0, ["pytorch"], {"name": "pytorch"}])
def test_get_convention_wrong_type(bad):
    with pytest.raises(TypeError, match="convention") as info:
        get_convention(bad)
    assert type(bad).__name__ in str(info.value)


# -- Convention validation ------------------------------------------------------------------


def _make(**changes):
    fields = dict(
        name="t",
        eps=1e-5,
        momentum=0.1,
        momentum_on="batch",
        running_var="unbiased",
        feature_axis=1,
        single_value="error",
    )
    fields.update(changes)
    return Convention(**fields)


@pytest.mark.parametrize("eps", [0.0, -0.0, -1e-5, -math.inf, math.inf, math.nan])
def test_bad_eps_value(eps):
    with pytest.raises(ValueError, match="eps"):
        _make(eps=eps)


@pytest.mark.parametrize("eps", ["1e-5", None, True, 1e-5j])
def test_bad_eps_type(eps):
    with pytest.raises(TypeError, match="eps"):
        _make(eps=eps)


@pytest.mark.parametrize("momentum", [-1e-9, -0.1, 1.0000001, 2.0, math.nan, math.inf, -math.inf])
def test_bad_momentum_value(momentum):
    with pytest.raises(ValueError, match="momentum"):
        _make(momentum=momentum)


@pytest.mark.parametrize("momentum", ["0.1", True, False, 0.1j])
def test_bad_momentum_type(momentum):
    with pytest.raises(TypeError, match="momentum"):
        _make(momentum=momentum)


@pytest.mark.parametrize("momentum", [0, 0.0, 1, 1.0, 0.5, np.float32(0.25), None])
def test_good_momentum(momentum):
    assert _make(momentum=momentum).momentum == momentum


def test_good_eps_numpy_scalar():
    assert _make(eps=np.float64(1e-3)).eps == 1e-3


@pytest.mark.parametrize(
    "field, value",
    [
        ("momentum_on", "Batch"),
        ("momentum_on", None),
        ("running_var", "unbiased "),
        ("running_var", True),
        ("single_value", "raise"),
        ("single_value", None),
    ],
)
def test_bad_literals(field, value):
    with pytest.raises(ValueError, match=field) as info:
        _make(**{field: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("axis", [1.0, "1", None, True])
def test_bad_feature_axis(axis):
    with pytest.raises(TypeError, match="feature_axis"):
        _make(feature_axis=axis)


def test_bad_name():
    with pytest.raises(TypeError, match="name"):
        _make(name=None)


# -- update_weights -------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 7])
def test_update_weights_presets(count):
    # Hand-derived: PyTorch r <- 0.9 r + 0.1 b; Flax/Keras r <- 0.99 r + 0.01 b; ONNX/d2l r <- 0.9 r + 0.1 b.
    expected = {
        "pytorch": (0.9, 0.1),
        "flax": (0.99, 0.01),
        "keras": (0.99, 0.01),
        "tf_fused": (0.99, 0.01),
        "onnx": (0.9, 0.1),
        "d2l": (0.9, 0.1),
    }
    assert set(expected) == set(PRESETS)
    for name, (w_r, w_b) in expected.items():
        got = PRESETS[name].update_weights(count)
        assert got == pytest.approx((w_r, w_b), abs=1e-15), name


@given(m=st.floats(0.0, 1.0), steps=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_batch_momentum_m_equals_running_momentum_one_minus_m(m, steps, seed):
    """§3.5: momentum m on the batch term is momentum 1 - m on the running term."""
    on_batch = _make(momentum=m, momentum_on="batch")
    on_running = _make(momentum=1.0 - m, momentum_on="running")
    rng = np.random.default_rng(seed)
    r1 = r2 = rng.normal()
    for k in range(steps):
        b = rng.normal()
        a1, c1 = on_batch.update_weights(k)
        a2, c2 = on_running.update_weights(k)
        assert a1 == pytest.approx(a2, abs=1e-15) and c1 == pytest.approx(c2, abs=1e-15)
        r1, r2 = a1 * r1 + c1 * b, a2 * r2 + c2 * b
    assert r1 == pytest.approx(r2, rel=1e-14, abs=1e-14)


def test_pytorch_point_one_is_onnx_point_nine():
    """The spec's named example: PyTorch 0.1 and ONNX/d2l 0.9 give identical running sequences."""
    rng = np.random.default_rng(0)
    batches = rng.normal(size=(8, 4))
    seqs = {}
    for name in ("pytorch", "onnx", "d2l"):
        r = np.zeros(4)
        out = []
        for k, b in enumerate(batches):
            w_r, w_b = PRESETS[name].update_weights(k)
            r = w_r * r + w_b * b
            out.append(r)
        seqs[name] = np.array(out)
    np.testing.assert_allclose(seqs["pytorch"], seqs["onnx"], rtol=1e-15, atol=1e-16)
    np.testing.assert_array_equal(seqs["onnx"], seqs["d2l"])


@pytest.mark.parametrize("momentum_on", ["batch", "running"])
def test_update_weights_cumulative(momentum_on):
    conv = _make(momentum=None, momentum_on=momentum_on)
    for count in range(6):
        w_r, w_b = conv.update_weights(count)
        k = count + 1
        assert w_b == pytest.approx(1.0 / k) and w_r + w_b == pytest.approx(1.0)
    assert conv.update_weights(0) == (0.0, 1.0)  # the first step discards the initial value
    # Applying the weights step by step gives the plain mean of the batch statistics (§3.3).
    rng = np.random.default_rng(1)
    bs = rng.normal(size=9)
    r = rng.normal()
    for k, b in enumerate(bs):
        w_r, w_b = conv.update_weights(k)
        r = w_r * r + w_b * b
        assert r == pytest.approx(bs[: k + 1].mean(), rel=1e-13, abs=1e-14)


def test_update_weights_cumulative_array_count():
    conv = _make(momentum=None)
    counts = np.array([0, 1, 4, 9])
    w_r, w_b = conv.update_weights(counts)
    np.testing.assert_allclose(w_b, [1.0, 0.5, 0.2, 0.1])
    np.testing.assert_allclose(w_r, [0.0, 0.5, 0.8, 0.9])


@pytest.mark.parametrize("count", [-1, 1.0, True])
def test_update_weights_bad_count(count):
    with pytest.raises((ValueError, TypeError), match="count"):
        _make(momentum=None).update_weights(count)


def test_update_weights_momentum_returns_python_floats():
    w = _make(momentum=np.float32(0.25)).update_weights(3)
    assert all(type(v) is float for v in w)
    assert w == (0.75, 0.25)


# -- variance_correction --------------------------------------------------------------------


@given(n=st.integers(2, 50), seed=st.integers(0, 2**32 - 1))
def test_variance_correction_matches_ddof1(n, seed):
    """Unbiased correction times the biased variance is np.var(ddof=1); biased leaves it as is."""
    x = np.random.default_rng(seed).normal(size=n)
    unbiased, biased = PRESETS["pytorch"], PRESETS["flax"]
    assert np.var(x) * unbiased.variance_correction(n) == pytest.approx(np.var(x, ddof=1), rel=1e-13)
    assert biased.variance_correction(n) == 1.0


@pytest.mark.parametrize("n", [0, 1])
def test_variance_correction_small_n(n):
    assert PRESETS["tf_fused"].variance_correction(n) == 1.0
    assert PRESETS["keras"].variance_correction(n) == 1.0


def test_variance_correction_array_n():
    np.testing.assert_allclose(PRESETS["pytorch"].variance_correction(np.array([1, 2, 5])), [1.0, 2.0, 1.25])
    assert PRESETS["onnx"].variance_correction(np.array([1, 2, 5])) == 1.0


# -- resolve and DEFAULT --------------------------------------------------------------------


def test_resolve_overrides():
    base = PRESETS["pytorch"]
    assert resolve("pytorch") is base
    assert resolve(base, momentum=DEFAULT) is base
    assert resolve("pytorch", momentum=None).momentum is None
    r = resolve("flax", eps=1e-3, momentum=0.9, feature_axis=1)
    assert (r.eps, r.momentum, r.feature_axis, r.momentum_on, r.name) == (1e-3, 0.9, 1, "running", "flax")
    with pytest.raises(ValueError, match="eps"):
        resolve("flax", eps=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        resolve("flax", momentum=1.5)


def test_default_sentinel():
    assert repr(DEFAULT) == "DEFAULT"
    assert pickle.loads(pickle.dumps(DEFAULT)) is DEFAULT
    assert type(DEFAULT)() is DEFAULT


def test_conventions_pickle_and_hash():
    for conv in PRESETS.values():
        assert pickle.loads(pickle.dumps(conv)) == conv
    assert len({hash(c) for c in PRESETS.values()}) == len(PRESETS)


def test_import_bn_ref_needs_no_framework():
    code = (
        "import sys, bn_ref, bn_ref.oracle, bn_ref.tolerances\n"
        "bad = [m for m in ('torch', 'jax', 'flax', 'onnx', 'tensorflow', 'keras') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
