"""The divergence finder (issue 15 item 2): a correct port agrees layer by layer in eval, in a
training forward, after one SGD step and in eval after it; a deliberately broken conversion is named
at the layer it breaks; a BN convention mismatch shows only after the training step."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import porting_models as pm  # noqa: E402

from bn_ref.porting import convert, divergence  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    import jax.numpy as jnp

    tm = pm.trained_torch(pm.torch_convnet(), (6, 3, 8, 8))
    x = np.random.default_rng(1).normal(0.3, 1.2, (4, 3, 8, 8)).astype(np.float32)
    fm = pm.linen_convnet(convention="pytorch")
    template = fm.init(jax.random.PRNGKey(0), jnp.asarray(pm.nchw_to_nhwc(x)))
    return tm, fm, template, x


def test_correct_port_agrees_everywhere(setup) -> None:
    tm, fm, template, x = setup
    variables = convert.torch_to_flax(tm, template)
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    rep = divergence.find_divergence(tm, fm, variables, x)
    assert rep.agree, str(rep)
    phases = {c.phase for c in rep.comparisons}
    assert phases == set(divergence.PHASES)
    # 5 layer outputs per forward phase; 2 conv x 2 + 2 BN x 4 (scale, bias, mean, var) + dense 2 leaves
    # after the step
    assert sum(c.phase == "eval" for c in rep.comparisons) == 5
    assert sum(c.phase == "after-step" for c in rep.comparisons) == 2 * 2 + 2 * 4 + 2
    # the source model is untouched by the training step
    for k, v in tm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_missing_flatten_permutation_is_named(setup) -> None:
    tm, fm, template, x = setup
    variables = convert.torch_to_flax(tm, template, flatten={"7": None})  # the flatten permutation left out
    rep = divergence.find_divergence(tm, fm, variables, x, train_step=False)
    first = rep.first("eval")
    assert first is not None and first.torch_name == "7" and first.flax_name == "Dense_0"
    assert first.units > 10
    assert "FIRST DIVERGENCE" in str(rep) and "7 -> Dense_0" in str(rep)


def test_flipped_conv_kernel_is_named(setup) -> None:
    tm, fm, template, x = setup
    variables = convert.torch_to_flax(tm, template)
    k = variables["params"]["Conv_1"]["kernel"]
    variables["params"]["Conv_1"]["kernel"] = k[::-1, ::-1].copy()  # a cross-correlation/convolution mix-up
    rep = divergence.find_divergence(tm, fm, variables, x, train_step=False)
    first = rep.first("eval")
    assert first.torch_name == "3" and first.flax_name == "Conv_1" and first.kind == "conv"
    # the layers before it agree
    assert all(not c.diverges for c in rep.comparisons[:2])


def test_convention_mismatch_shows_after_the_step(setup) -> None:
    """Flax's own BatchNorm with momentum 0.9 (the right spelling of PyTorch's 0.1) stores the biased
    running variance: eval and the training forward agree, the updated running variance does not."""
    import jax.numpy as jnp

    tm, _, _, x = setup
    fm = pm.linen_convnet(bn="flax", momentum=0.9, epsilon=1e-5, use_fast_variance=False)
    template = fm.init(jax.random.PRNGKey(0), jnp.asarray(pm.nchw_to_nhwc(x)))
    variables = convert.torch_to_flax(tm, template)
    rep = divergence.find_divergence(tm, fm, variables, x)
    assert rep.first("eval") is None and rep.first("train") is None, str(rep)
    f = rep.first("after-step")
    assert f is not None and f.torch_name == "1" and f.what == "var", str(rep)
    assert f.torch_value > f.flax_value  # unbiased > biased
    mean_cmp = [c for c in rep.comparisons if c.phase == "after-step" and c.torch_name == "1" and c.what == "mean"]
    assert len(mean_cmp) == 1 and not mean_cmp[0].diverges  # the momentum itself was translated right
    assert rep.first("eval-after-step").torch_name == "1"


def test_wrong_momentum_spelling_shows_after_the_step(setup) -> None:
    import jax.numpy as jnp

    tm, _, _, x = setup
    fm = pm.linen_convnet(convention="pytorch", momentum=0.9)  # 0.9 on the batch term: a spelling mistake
    template = fm.init(jax.random.PRNGKey(0), jnp.asarray(pm.nchw_to_nhwc(x)))
    rep = divergence.find_divergence(tm, fm, convert.torch_to_flax(tm, template), x)
    f = rep.first("after-step")
    assert rep.first("eval") is None and f.torch_name == "1" and f.what == "mean"


def test_nnx_port(setup) -> None:
    """NNX models: outputs captured with nnx.capture; a broken kernel is named, a correct port agrees."""
    tm = pm.trained_torch(pm.torch_convnet(bn="bnref"), (6, 3, 8, 8))
    _, _, _, x = setup
    fm = pm.nnx_convnet(convention="pytorch")
    convert.torch_to_flax(tm, fm)
    before = np.asarray(fm.conv2.kernel[...]).copy()
    rep = divergence.find_divergence(tm, fm, None, x)
    assert rep.agree, str(rep)
    assert sum(c.phase == "after-step" for c in rep.comparisons) == 2 * 2 + 2 * 4 + 2
    np.testing.assert_array_equal(np.asarray(fm.conv2.kernel[...]), before)  # the model is not changed
    fm.conv2.kernel[...] = before[::-1, ::-1]
    first = divergence.find_divergence(tm, fm, None, x, train_step=False).first("eval")
    assert first.torch_name == "3" and first.flax_name == "conv2"
