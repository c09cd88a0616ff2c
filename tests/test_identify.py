"""identify (issue 15 item 4): probing an implementation through the adapter contract recovers every
preset from bn-ref's own layers, names the framework rows' conventions (torch.nn, Flax, Keras 3, ONNX,
the d2l layer), flags Flax's fast variance, and pins each deliberately broken adapter's mistake."""

from __future__ import annotations

import dataclasses
import os

import pytest

import bn_ref
from bn_ref.conformance import identify as I

os.environ.setdefault("KERAS_BACKEND", "jax")


def _same(found: bn_ref.Convention, preset: bn_ref.Convention) -> bool:
    """Equal as conventions: the batch weight, not the spelling, decides the momentum (§3.5)."""
    return (found.eps == preset.eps and found.update_weights(0) == pytest.approx(preset.update_weights(0), abs=1e-6)
            and found.running_var == preset.running_var and found.feature_axis == preset.feature_axis
            and found.single_value == preset.single_value)


@pytest.mark.parametrize("preset", list(bn_ref.PRESETS))
def test_recovers_each_preset_from_bn_ref_torch(preset: str) -> None:
    pytest.importorskip("torch")
    from bn_ref.conformance.adapters.bnref_torch import FunctionalAdapter

    p = bn_ref.PRESETS[preset]
    ident = I.identify(FunctionalAdapter(p, "function", "cpu"))
    assert ident.explained, ident.unexplained
    assert dataclasses.replace(ident.convention, name=p.name) == p, str(ident)
    assert preset in ident.closest and ident.differences[preset] == []
    assert ident.findings["variance"].value == "two-pass"
    assert ident.cumulative is not None and ident.cumulative.value == "yes"
    assert ident.findings["feature_axis"].evidence.count("normalizes over it") == 2
    text = str(ident)
    assert "every field matches" in text and "NOT EXPLAINED" not in text


def test_preset_count() -> None:
    assert len(bn_ref.PRESETS) == 6


@pytest.mark.parametrize("preset", ["flax", "pytorch"])
def test_recovers_presets_from_bn_ref_jax(preset: str) -> None:
    pytest.importorskip("jax")
    from bn_ref.conformance.adapters import bnref_jax

    a = next(a for a in bnref_jax.factory() if isinstance(a, bnref_jax.JaxFunctionAdapter)
             and a.convention.name == preset)
    ident = I.identify(a, check_float64=False)
    assert ident.explained, ident.unexplained
    assert _same(ident.convention, bn_ref.PRESETS[preset])


def test_torch_nn() -> None:
    pytest.importorskip("torch")
    from bn_ref.conformance.adapters.frameworks_torch import TorchModuleAdapter

    ident = I.identify(TorchModuleAdapter("cpu"))
    assert ident.explained and ident.closest == ["pytorch"]
    assert _same(ident.convention, bn_ref.PRESETS["pytorch"])
    assert "declined" in ident.findings["feature_axis"].evidence  # axis -1 is not accepted
    assert ident.findings["single_value"].evidence.startswith("training on n = 1 raises")


@pytest.mark.parametrize("fast", [False, True])
def test_flax_linen(fast: bool) -> None:
    pytest.importorskip("flax")
    import jax

    from bn_ref.conformance.adapters.frameworks_flax import FlaxLinenAdapter

    ident = I.identify(FlaxLinenAdapter(fast, "cpu", jax.devices("cpu")[0]), check_float64=False)
    assert ident.closest == ["flax"] and _same(ident.convention, bn_ref.PRESETS["flax"])
    if fast:
        assert ident.findings["variance"].value == "one-pass" and not ident.explained
        assert any("one-pass" in u for u in ident.unexplained)
    else:
        assert ident.findings["variance"].value == "two-pass" and ident.explained, ident.unexplained


def test_keras() -> None:
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("keras imported with another backend")
    from bn_ref.conformance.adapters.keras_adapter import KerasAdapter

    ident = I.identify(KerasAdapter(), check_float64=False)
    assert ident.closest == ["keras"] and _same(ident.convention, bn_ref.PRESETS["keras"]), str(ident)
    assert ident.explained
    assert ident.cumulative.value == "no"


def test_onnx_reference_and_d2l() -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("torch")
    from bn_ref.conformance.adapters.d2l import D2LAdapter
    from bn_ref.conformance.adapters.onnx_adapter import OnnxReferenceAdapter

    for a, name in ((OnnxReferenceAdapter(), "onnx"), (D2LAdapter(), "d2l")):
        ident = I.identify(a)
        assert ident.explained, ident.unexplained
        assert _same(ident.convention, bn_ref.PRESETS[name])
        assert set(ident.closest) == {"onnx", "d2l"}  # identical conventions


def _broken(bug: str):
    import broken_adapters

    return broken_adapters.NumpyBN(bn_ref.PRESETS["pytorch"], bug)


def test_broken_adapters_are_pinned() -> None:
    ident = I.identify(_broken("momentum_wrong_term"))
    assert ident.convention.momentum_on == "running" and ident.convention.update_weights(0)[1] == pytest.approx(0.9)
    assert any("batch weight 0.9 vs 0.1" in d for d in ident.claim_differences)

    ident = I.identify(_broken("biased_running_var"))
    assert ident.convention.running_var == "biased" and ident.explained
    assert "pytorch" in ident.closest and ident.differences["pytorch"] == ["running variance biased vs unbiased"]

    for bug, words in (("eps_outside_sqrt", "eps"), ("unbiased_normalize", "unbiased variance"),
                       ("eval_batch_stats", "batch statistics")):
        ident = I.identify(_broken(bug))
        assert not ident.explained, bug
        assert any(words in u for u in ident.unexplained), (bug, ident.unexplained)

    ident = I.identify(_broken(None))
    assert ident.explained and ident.closest == ["pytorch"]


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert I.main(["--adapter", "broken_adapters:correct"]) == 0
    out = capsys.readouterr().out
    assert out.count("follows:") == 2 and "closest preset: pytorch" in out and "closest preset: flax" in out
    assert I.main(["--adapter", "broken_adapters:eps_outside_sqrt"]) == 1
    assert "NOT EXPLAINED" in capsys.readouterr().out
    assert I.main(["--adapter", "no_such_module:factory"]) == 2
