"""Model-agnostic PyTorch <-> Flax weight porting (issue 15 item 1): per-layer converters, the flatten
permutation, layer pairing, and whole models (a conv-BN-ReLU x2 + dense net and a ResNet-style
block) ported both ways with eval logits equal within docs/spec.md §8.4."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import porting_models as pm  # noqa: E402

from bn_ref.porting import convert  # noqa: E402
from bn_ref.tolerances import assert_close, error_units  # noqa: E402


def _x(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.3, 1.2, shape).astype(np.float32)


# -- per-layer converters against the frameworks' own layers -----------------------------------


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_kernel_round_trip_and_equal_outputs(nd: int) -> None:
    import flax.linen as nn
    import jax.numpy as jnp

    conv_t = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[nd](4, 6, 3, groups=2)
    k = convert.conv_kernel_to_flax(conv_t.weight)
    assert k.shape == (3,) * nd + (2, 6)
    np.testing.assert_array_equal(convert.conv_kernel_to_torch(k), conv_t.weight.detach().numpy())
    x = _x((2, 4) + (5,) * nd)
    y_t = conv_t(torch.from_numpy(x)).detach().numpy()
    conv_f = nn.Conv(6, (3,) * nd, padding="VALID", feature_group_count=2)
    y_f = conv_f.apply({"params": {"kernel": jnp.asarray(k), "bias": jnp.asarray(conv_t.bias.detach().numpy())}},
                       jnp.asarray(np.moveaxis(x, 1, -1)))
    assert_close(np.moveaxis(np.asarray(y_f), -1, 1), y_t, "float32", what=f"conv{nd}d")


def test_flatten_permutation_matches_moveaxis() -> None:
    x = _x((2, 3, 4, 5))
    perm = convert.flatten_permutation((3, 4, 5))
    np.testing.assert_array_equal(np.moveaxis(x, 1, -1).reshape(2, -1), x.reshape(2, -1)[:, perm])
    # only C and the product of the spatial sizes matter
    np.testing.assert_array_equal(perm, convert.flatten_permutation((3, 20)))
    with pytest.raises(ValueError, match="positive"):
        convert.flatten_permutation((3, 0))


def test_dense_after_flatten_round_trip_and_equal_outputs() -> None:
    lin = torch.nn.Linear(3 * 4 * 5, 7)
    w = lin.weight.detach().numpy()
    k = convert.dense_kernel_to_flax(w, flatten_from=(3, 4, 5))
    np.testing.assert_array_equal(convert.dense_kernel_to_torch(k, flatten_from=(3, 4, 5)), w)
    x = _x((2, 3, 4, 5))
    y_t = lin(torch.from_numpy(x).reshape(2, -1)).detach().numpy()
    y_f = np.moveaxis(x, 1, -1).reshape(2, -1) @ k + lin.bias.detach().numpy()
    assert_close(y_f, y_t, "float32", what="dense after flatten")
    # without the permutation the outputs differ far beyond round-off
    assert error_units(np.moveaxis(x, 1, -1).reshape(2, -1) @ w.T + lin.bias.detach().numpy(), y_t, "float32") > 100
    with pytest.raises(ValueError, match="takes 60 inputs"):
        convert.dense_kernel_to_flax(w, flatten_from=(3, 4, 4))


def test_convert_running_var_estimators() -> None:
    import dataclasses

    import bn_ref
    from bn_ref import oracle

    # A PyTorch (unbiased) and a Flax-like (biased, same momentum) layer fed the same batches of one n:
    pt = bn_ref.PRESETS["pytorch"]
    fb = dataclasses.replace(pt, name="biased", running_var="biased")
    rng = np.random.default_rng(0)
    state = {c.name: (np.zeros(3), np.ones(3)) for c in (pt, fb)}
    for _ in range(30):
        x = rng.normal(0.0, 2.0, (5, 3))
        for c in (pt, fb):
            out = oracle.forward(x, None, None, *state[c.name], training=True, convention=c)
            state[c.name] = (out.running_mean, out.running_var)
    notes: list[str] = []
    conv = convert.convert_running_var(state["pytorch"][1], pt, fb, n=5, notes=notes)
    # off by at most w_r^k var_0 / n (spec §3.5): 0.9^30 / 5
    diff = np.abs(conv - state["biased"][1]).max()
    assert diff <= 0.9**30 / 5 * (1 + 1e-9) and diff > 0.9**30 / 5 * 0.99
    assert "approximate" in notes[0]
    back = convert.convert_running_var(conv, fb, pt, n=5)
    np.testing.assert_allclose(back, state["pytorch"][1], rtol=1e-12)
    np.testing.assert_array_equal(convert.convert_running_var(state["pytorch"][1], pt, pt), state["pytorch"][1])
    with pytest.raises(ValueError, match="needs n"):
        convert.convert_running_var(state["pytorch"][1], "pytorch", "flax")


# -- whole models ----------------------------------------------------------------------------


def _linen_eval(model, variables, x_nhwc):
    import jax.numpy as jnp

    return np.asarray(model.apply(variables, jnp.asarray(x_nhwc), train=False))


def test_convnet_torch_to_linen_and_back() -> None:
    import jax.numpy as jnp

    tm = pm.trained_torch(pm.torch_convnet(), (6, 3, 8, 8))
    fm = pm.linen_convnet(convention="pytorch")
    x = _x((4, 3, 8, 8))
    template = fm.init(jax.random.PRNGKey(0), jnp.asarray(pm.nchw_to_nhwc(x)))
    report = convert.PortReport()
    variables = convert.torch_to_flax(tm, template, report=report)
    assert [k for _, _, k in report.pairs] == ["conv", "bn", "conv", "bn", "dense"]
    assert any("flatten" in n for n in report.notes)
    # bn-ref's Flax layers keep a step counter only for momentum=None, so the counter is not carried.
    assert "count" not in variables["batch_stats"]["BatchNorm_0"]
    assert any("no counter" in n for n in report.notes)
    with torch.no_grad():
        y_t = tm(torch.from_numpy(x)).numpy()
    y_f = _linen_eval(fm, variables, pm.nchw_to_nhwc(x))
    assert_close(y_f, y_t, "float32", what="linen logits")
    assert np.abs(y_t).max() > 0.1  # not a trivial comparison

    # and back, into a fresh PyTorch model (strict load), same logits
    tm2 = pm.torch_convnet()
    sd = convert.flax_to_torch(variables, tm2)
    tm2.load_state_dict(sd, strict=True)
    tm2.eval()
    for k, v in tm.state_dict().items():
        if k.endswith("num_batches_tracked"):  # not carried through a layer without a counter (see above)
            assert int(sd[k]) == 0 and int(v) == 3
            continue
        np.testing.assert_array_equal(sd[k].numpy(), v.numpy(), err_msg=k)
    with torch.no_grad():
        assert_close(tm2(torch.from_numpy(x)).numpy(), y_t, "float32", what="round trip")


def test_convnet_into_flax_own_batchnorm_converts_statistics() -> None:
    """flax.linen.BatchNorm stores the biased variance: porting PyTorch statistics converts them (§3.5)
    with the batch's n, and the eval logits then follow the converted statistics."""
    import jax.numpy as jnp

    tm = pm.trained_torch(pm.torch_convnet(), (6, 3, 8, 8))
    fm = pm.linen_convnet(bn="flax", momentum=0.9, epsilon=1e-5)
    x = _x((4, 3, 8, 8))
    template = fm.init(jax.random.PRNGKey(0), jnp.asarray(pm.nchw_to_nhwc(x)))
    with pytest.raises(ValueError, match="needs n"):
        convert.torch_to_flax(tm, template, source_convention="pytorch", target_convention="flax")
    report = convert.PortReport()
    variables = convert.torch_to_flax(tm, template, source_convention="pytorch", target_convention="flax",
                                      n=6 * 64, report=report)
    rv = tm[1].running_var.numpy()
    np.testing.assert_allclose(variables["batch_stats"]["BatchNorm_0"]["var"], rv * (6 * 64 - 1) / (6 * 64), rtol=1e-6)
    assert any("num_batches_tracked=3 dropped" in n for n in report.notes)
    # copying unchanged (no conventions) gives the same logits as PyTorch, exactly the §3.5 choice
    same = convert.torch_to_flax(tm, template)
    with torch.no_grad():
        y_t = tm(torch.from_numpy(x)).numpy()
    assert_close(_linen_eval(fm, same, pm.nchw_to_nhwc(x)), y_t, "float32", what="flax BN, copied stats")


def test_convnet_torch_to_nnx_and_back() -> None:
    import jax.numpy as jnp

    tm = pm.trained_torch(pm.torch_convnet(bn="bnref"), (6, 3, 8, 8))
    fm = pm.nnx_convnet(convention="pytorch")
    fm.eval()
    convert.torch_to_flax(tm, fm)
    assert not hasattr(fm.bn2, "count")  # a counter exists only for momentum=None
    x = _x((4, 3, 8, 8))
    with torch.no_grad():
        y_t = tm(torch.from_numpy(x)).numpy()
    assert_close(np.asarray(fm(jnp.asarray(pm.nchw_to_nhwc(x)))), y_t, "float32", what="nnx logits")
    tm2 = pm.torch_convnet(bn="bnref")
    tm2.load_state_dict(convert.flax_to_torch(fm, tm2))
    tm2.eval()
    with torch.no_grad():
        assert_close(tm2(torch.from_numpy(x)).numpy(), y_t, "float32", what="nnx round trip")


def test_resblock_torch_to_linen_and_back() -> None:
    import jax.numpy as jnp

    tm = pm.trained_torch(pm.torch_resblock(), (6, 3, 6, 6))
    fm = pm.linen_resblock(convention="pytorch")
    x = _x((4, 3, 6, 6))
    template = fm.init(jax.random.PRNGKey(0), jnp.asarray(pm.nchw_to_nhwc(x)))
    report = convert.PortReport()
    variables = convert.torch_to_flax(tm, template, report=report)
    assert ("proj", "proj", "conv") in report.pairs and ("bn_proj", "bn_proj", "bn") in report.pairs
    with torch.no_grad():
        y_t = tm(torch.from_numpy(x)).numpy()
    assert_close(_linen_eval(fm, variables, pm.nchw_to_nhwc(x)), y_t, "float32", what="resblock logits")
    tm2 = pm.torch_resblock()
    tm2.load_state_dict(convert.flax_to_torch(variables, tm2))
    tm2.eval()
    with torch.no_grad():
        assert_close(tm2(torch.from_numpy(x)).numpy(), y_t, "float32", what="resblock round trip")


def test_state_dict_source_and_explicit_mapping() -> None:
    import jax.numpy as jnp

    tm = pm.trained_torch(pm.torch_resblock(), (6, 3, 6, 6))
    fm = pm.linen_resblock(convention="pytorch")
    template = fm.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3), jnp.float32))
    mapping = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2", "proj": "proj",
               "bn_proj": "bn_proj", "fc": "fc"}
    a = convert.torch_to_flax(tm.state_dict(), template, mapping)
    b = convert.torch_to_flax(tm, template)
    for leaf_a, leaf_b in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(leaf_a, leaf_b)


def test_pairing_refuses_ambiguity_and_mismatch() -> None:
    import jax.numpy as jnp

    # A block whose main-path convs share a shape, listed in a different order on the Flax side:
    t = [convert.Layer("a", "conv", {}, (4, 4, 3, 3)), convert.Layer("b", "bn", {}, (4,)),
         convert.Layer("c", "conv", {}, (4, 4, 3, 3)), convert.Layer("d", "bn", {}, (4,))]
    f = [convert.Layer("x", "conv", {}, (4, 4, 3, 3)), convert.Layer("y", "conv", {}, (4, 4, 3, 3)),
         convert.Layer("z", "bn", {}, (4,)), convert.Layer("w", "bn", {}, (4,))]
    with pytest.raises(ValueError, match="ambiguous pairing"):
        convert.pair_layers(t, f)
    pairs = convert.pair_layers(t, f, {"a": "x", "b": "z", "c": "y", "d": "w"})
    assert [(p.name, q.name) for p, q in pairs] == [("a", "x"), ("b", "z"), ("c", "y"), ("d", "w")]
    # different orders but unique shapes: the shapes decide
    t2 = [convert.Layer("a", "conv", {}, (4, 3, 3, 3)), convert.Layer("b", "dense", {}, (2, 4))]
    f2 = [convert.Layer("q", "dense", {}, (2, 4)), convert.Layer("p", "conv", {}, (4, 3, 3, 3))]
    assert [(p.name, q.name) for p, q in convert.pair_layers(t2, f2)] == [("a", "p"), ("b", "q")]
    # a model that is not the same network is refused with both layer lists
    tm = pm.torch_convnet()
    other = pm.linen_resblock(convention="pytorch")
    template = other.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3), jnp.float32))
    with pytest.raises(ValueError, match="cannot pair"):
        convert.torch_to_flax(tm, template)
    with pytest.raises(ValueError, match="does not exist"):
        convert.pair_layers(t, f, {"nope": "x"})
    with pytest.raises(ValueError, match="kinds or shapes differ"):
        convert.pair_layers(t, f, {"a": "z"})


def test_unsupported_layers_are_named() -> None:
    m = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="1: LayerNorm"):
        convert.torch_layers(m)
    with pytest.raises(ValueError, match="transposed"):
        convert.torch_layers(torch.nn.Sequential(torch.nn.ConvTranspose2d(2, 2, 3)))


def test_cli_any_state_dict_both_ways(tmp_path, capsys) -> None:
    import json
    import pickle

    import jax.numpy as jnp

    tm = pm.trained_torch(pm.torch_resblock(), (6, 3, 6, 6))
    fm = pm.linen_resblock(convention="pytorch")
    x = _x((4, 3, 6, 6))
    template = fm.init(jax.random.PRNGKey(0), jnp.asarray(pm.nchw_to_nhwc(x)))
    torch.save(tm.state_dict(), tmp_path / "src.pt")
    np.savez(tmp_path / "tmpl.npz", **convert.flatten_variables(jax.tree_util.tree_map(np.asarray, template)))
    (tmp_path / "map.json").write_text(json.dumps({"proj": "proj"}))
    assert convert.main(["--from", "torch", str(tmp_path / "src.pt"), "--to", "flax", str(tmp_path / "out.msgpack"),
                         "--template", str(tmp_path / "tmpl.npz"), "--mapping", str(tmp_path / "map.json")]) == 0
    assert "bn_proj" in capsys.readouterr().out
    from flax import serialization

    variables = serialization.msgpack_restore((tmp_path / "out.msgpack").read_bytes())
    with torch.no_grad():
        y_t = tm(torch.from_numpy(x)).numpy()
    assert_close(_linen_eval(fm, variables, pm.nchw_to_nhwc(x)), y_t, "float32", what="CLI torch->flax")
    # and back, with a state_dict template
    torch.save(pm.torch_resblock().state_dict(), tmp_path / "tmpl.pt")
    assert convert.main(["--from", "flax", str(tmp_path / "out.msgpack"), "--to", "torch", str(tmp_path / "back.pt"),
                         "--template", str(tmp_path / "tmpl.pt")]) == 0
    tm2 = pm.torch_resblock()
    tm2.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True))
    tm2.eval()
    with torch.no_grad():
        assert_close(tm2(torch.from_numpy(x)).numpy(), y_t, "float32", what="CLI flax->torch")
    # errors are one line, exit 2
    assert convert.main(["--from", "torch", str(tmp_path / "nope.pt"), "--to", "flax", str(tmp_path / "o"),
                         "--template", str(tmp_path / "tmpl.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    # the .npz output reads back the same as the msgpack one
    assert convert.main(["--from", "torch", str(tmp_path / "src.pt"), "--to", "flax", str(tmp_path / "out.npz"),
                         "--template", str(tmp_path / "tmpl.npz"), "--mapping", str(tmp_path / "map.json")]) == 0
    again = convert._load(str(tmp_path / "out.npz"), "flax")
    for (k1, a), (k2, b) in zip(sorted(convert.flatten_variables(again).items()), sorted(convert.flatten_variables(variables).items())):
        assert k1 == k2 and np.array_equal(a, b)

    # A pickle crafted to run code is refused without running it (as a template and as a source).
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"params": Payload()}))
    capsys.readouterr()
    for args in (["--from", "torch", str(tmp_path / "src.pt"), "--to", "flax", str(tmp_path / "o.npz"),
                  "--template", str(tmp_path / "evil.pkl")],
                 ["--from", "flax", str(tmp_path / "evil.pkl"), "--to", "torch", str(tmp_path / "o.pt"),
                  "--template", str(tmp_path / "tmpl.pt")]):
        assert convert.main(args) == 2
        err = capsys.readouterr().err
        assert "pickles are refused" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    evil_pt = tmp_path / "evil.pt"
    torch.save({"w": Payload()}, evil_pt)
    assert convert.main(["--from", "torch", str(evil_pt), "--to", "flax", str(tmp_path / "o.npz"),
                         "--template", str(tmp_path / "tmpl.npz")]) == 2
    assert not marker.exists()


@pytest.mark.parametrize("bn", ["ref", "none"])
def test_lenet_is_one_use_of_the_generic_port(bn: str) -> None:
    """The LeNet-specific bn_ref.apps.port and the generic converter give the same variables (LeNet's
    flatten of a (16, 4, 4) map is inferred), and the generic reverse equals bn_ref.apps.port's."""
    import jax.numpy as jnp

    from bn_ref.apps import port
    from bn_ref.apps.lenet_flax import LeNet
    from bn_ref.apps.lenet_torch import lenet

    tm = lenet(bn=bn, convention="pytorch")
    if bn == "ref":
        tm = pm.trained_torch(tm, (8, 1, 28, 28))
    fm = LeNet(bn=bn, convention="pytorch")
    template = fm.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)
    ours = convert.torch_to_flax(tm, template)
    theirs = port.torch_to_flax(tm.state_dict())
    flat_ours = jax.tree_util.tree_leaves_with_path(ours)
    flat_theirs = dict(jax.tree_util.tree_leaves_with_path(theirs))
    # The LeNet port also carries num_batches_tracked as `count` (the linen layer keeps counting a count
    # the variables hold); the generic converter follows the template, whose layers have no counter.
    extra = {k for k in flat_theirs if str(k[-1]) == "['count']"}
    assert extra == {k for k in flat_theirs if k not in dict(flat_ours)}
    flat_theirs = {k: v for k, v in flat_theirs.items() if k not in extra}
    assert len(flat_ours) == len(flat_theirs) > 0
    for path, leaf in flat_ours:
        np.testing.assert_array_equal(leaf, flat_theirs[path], err_msg=str(path))
    sd = convert.flax_to_torch(ours, tm)
    ref = port.flax_to_torch(theirs)
    assert list(sd) == list(ref)
    for k in sd:
        if k.endswith("num_batches_tracked"):  # only the LeNet port's variables held the counter
            assert int(sd[k]) == 0
            continue
        assert torch.equal(sd[k], ref[k]), k
