"""Cross-device statistics (``axis_name``, spec §11) on the 4 host CPU devices of tests/conftest.py.

The sharded layer must equal the oracle on the concatenated global batch: outputs, gradients
(taken outside ``shard_map`` of the global loss) and running statistics, whose unbiased
correction uses the global n. Unequal per-device batches are padded to one shape and marked with
``mask``; a device may hold no real sample at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bn_ref import PRESETS, oracle
from bn_ref.flax import BatchNorm as LinenBatchNorm
from bn_ref.jax import batch_norm
from bn_ref.tolerances import assert_close

try:  # jax >= 0.6 exports it at the top level; older releases only under experimental
    from jax import shard_map
except ImportError:  # pragma: no cover
    from jax.experimental.shard_map import shard_map

NDEV = 4


pytestmark = pytest.mark.usefixtures("x64")  # float64 for tight comparisons (tests/conftest.py)


@pytest.fixture(autouse=True, scope="module")
def _on_cpu():
    """Every array on the host CPU devices (also on a GPU machine)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _mesh() -> Mesh:
    cpus = jax.devices("cpu")
    assert len(cpus) >= NDEV, f"tests/conftest.py should give JAX {NDEV} host CPU devices; got {len(cpus)}"
    return Mesh(np.array(cpus[:NDEV]), ("d",))


def _sharded_bn(conv, *, masked: bool):
    """A global function (x, gamma, beta, rm, rv, mask) -> (y, rm', rv') computed by shard_map."""
    mesh = _mesh()

    def local(x, g, b, rm, rv, mask):
        y, nrm, nrv, _ = batch_norm(
            x, g, b, rm, rv, training=True, convention=conv, axis_name="d", mask=mask if masked else None
        )
        return y, nrm, nrv

    return jax.jit(
        shard_map(local, mesh=mesh, in_specs=(P("d"), P(), P(), P(), P(), P("d")), out_specs=(P("d"), P(), P()))
    )


def _global_check(conv, x, mask, dy, seed):
    """Run the sharded layer on padded x (mask marks real rows) and compare with the oracle."""
    rng = np.random.default_rng(seed)
    c = x.shape[conv.feature_axis]
    g, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    fn = _sharded_bn(conv, masked=not mask.all())
    (y, nrm, nrv), vjp = jax.vjp(lambda x, g, b: fn(x, g, b, rm, rv, mask), x, g, b)
    dx, dg, db = vjp((dy, np.zeros(c), np.zeros(c)))
    y, dx = np.asarray(y), np.asarray(dx)

    xr, dyr = x[mask], dy[mask]  # the concatenated global batch of real samples
    ref = oracle.forward(xr, g, b, rm, rv, training=True, convention=conv)
    rdx, rdg, rdb = oracle.backward(dyr, xr, g, training=True, convention=conv)
    kappa = oracle.condition_number(xr, convention=conv)
    assert_close(y[mask], ref.y, "float64", kappa=kappa, what="y")
    assert_close(dx[mask], rdx, "float64", kappa=kappa, what="dx")
    assert_close(np.asarray(dg), rdg, "float64", kappa=kappa, what="dgamma")
    assert_close(np.asarray(db), rdb, "float64", kappa=kappa, what="dbeta")
    assert_close(np.asarray(nrm), ref.running_mean, "float64", kappa=kappa, what="running_mean")
    assert_close(np.asarray(nrv), ref.running_var, "float64", kappa=kappa, what="running_var")
    if not mask.all():
        np.testing.assert_array_equal(y[~mask], 0.0)
        np.testing.assert_array_equal(dx[~mask], 0.0)
    return ref


CASES = [
    # (preset, per-device real counts, padded per-device size, trailing shape)
    ("pytorch", (2, 2, 2, 2), 2, (3, 2)),  # equal shards, NCL; unbiased running var needs the global n
    ("flax", (3, 3, 3, 3), 3, (2, 4)),  # equal shards, NLC
    ("pytorch", (3, 1, 0, 2), 3, (3, 2)),  # unequal, one device empty
    ("tf_fused", (1, 4, 2, 1), 4, (2, 3)),  # unequal, NHC with the unbiased running variance
    ("keras", (5, 0, 0, 1), 5, (3,)),  # unequal, rank 2
]
assert len(CASES) == 5


@pytest.mark.parametrize(("preset", "counts", "per_device", "trailing"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sharded_statistics_equal_the_oracle_on_the_global_batch(preset, counts, per_device, trailing):
    conv = PRESETS[preset]
    rng = np.random.default_rng(sum(counts))
    shape = (NDEV * per_device, *trailing)
    x = 3.0 + rng.standard_normal(shape) * 2.0
    dy = rng.standard_normal(shape)
    mask = np.zeros(NDEV * per_device, bool)
    for d, k in enumerate(counts):
        mask[d * per_device : d * per_device + k] = True
    x[~mask] = np.nan  # padding is garbage and must not leak
    dy[~mask] = 100.0  # cotangents of padded outputs must not leak either
    ref = _global_check(conv, x, mask, dy, seed=len(trailing))
    # The equal-weight average of per-device moments (what Flax/Haiku do) would differ here:
    if len(set(counts)) > 1:
        local = [x[d * per_device : d * per_device + k] for d, k in enumerate(counts) if k]
        ax = conv.feature_axis % x.ndim
        red = tuple(i for i in range(x.ndim) if i != ax)
        equal_weight = np.mean([part.mean(axis=red) for part in local], axis=0)
        assert not np.allclose(equal_weight, ref.batch_mean)


def test_pmap_with_axis_index_groups():
    """pmap over 4 devices with groups [[0, 1], [2, 3]]: each group normalizes over its own 2 shards."""
    conv = PRESETS["pytorch"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((NDEV, 3, 4, 2)) + 1.0  # (device, N, C, L)
    groups = [[0, 1], [2, 3]]

    def local(x):
        y, rm, rv, n = batch_norm(
            x,
            None,
            None,
            jnp.zeros(4),
            jnp.ones(4),
            training=True,
            convention=conv,
            axis_name="d",
            axis_index_groups=groups,
        )
        return y, rm, rv

    try:
        y, rm, rv = jax.pmap(local, axis_name="d", devices=jax.devices("cpu")[:NDEV])(x)
    except NotImplementedError as err:  # pragma: no cover - depends on the JAX release
        pytest.skip(f"this JAX release does not implement axis_index_groups under pmap: {err}")
    for group in groups:
        xg = np.concatenate([x[d] for d in group])
        ref = oracle.forward(xg, None, None, np.zeros(4), np.ones(4), training=True, convention=conv)
        got_y = np.concatenate([np.asarray(y[d]) for d in group])
        assert_close(got_y, ref.y, "float64", what=f"group {group} y")
        for d in group:
            assert_close(np.asarray(rm[d]), ref.running_mean, "float64", what="running_mean")
            assert_close(np.asarray(rv[d]), ref.running_var, "float64", what="running_var")


def test_single_value_check_uses_the_global_batch():
    """One sample per device is n = 4 globally: allowed under pytorch; a 1-device axis with n = 1 is not."""
    conv = PRESETS["pytorch"]
    x = np.random.default_rng(2).standard_normal((NDEV, 3))
    fn = _sharded_bn(conv, masked=False)
    y, rm, rv = fn(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), np.ones(NDEV, bool))
    ref = oracle.forward(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), training=True, convention=conv)
    assert_close(np.asarray(y), ref.y, "float64", what="y")
    assert_close(np.asarray(rv), ref.running_var, "float64", what="running_var")
    one = Mesh(np.array(jax.devices("cpu")[:1]), ("d",))
    f1 = shard_map(
        lambda x: batch_norm(x, None, None, None, None, training=True, convention=conv, axis_name="d")[0],
        mesh=one,
        in_specs=P("d"),
        out_specs=P("d"),
    )
    with pytest.raises(ValueError, match="n = 1"):
        jax.eval_shape(jax.jit(f1), jnp.ones((1, 3)))


def test_linen_layer_with_axis_name_under_shard_map():
    """The linen shell wires axis_name through: batch_stats equal the oracle's on the global batch."""
    conv = PRESETS["onnx"]
    mesh = _mesh()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((NDEV * 2, 3, 2)) * 3 + 1
    layer = LinenBatchNorm(convention=conv, axis_name="d", param_dtype=jnp.float64)
    variables = layer.init(jax.random.key(0), x[:2], use_running_average=False)

    def local(v, x):
        y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    fn = jax.jit(shard_map(local, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P("d"), P())))
    y, stats = fn(variables, jax.device_put(x, NamedSharding(mesh, P("d"))))
    ref = oracle.forward(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), training=True, convention=conv)
    assert_close(np.asarray(y), ref.y, "float64", what="y")
    assert_close(np.asarray(stats["mean"]), ref.running_mean, "float64", what="mean")
    assert_close(np.asarray(stats["var"]), ref.running_var, "float64", what="var")
    assert set(stats) == {"mean", "var"}  # momentum 0.9: no step counter (Flax's variables)


def test_sharded_broadcast_mask_per_channel_counts():
    """Elementwise masks under shard_map: each channel's statistics are those of its own unmasked
    values over all devices, with its own global count in the unbiased running variance (pytorch
    preset, NCL); an (N, 1, L) mask (Flax's broadcastable form) broadcasts over the channels."""
    conv = PRESETS["pytorch"]
    rng = np.random.default_rng(21)
    x = rng.standard_normal((NDEV * 3, 2, 5)) * 2.0 + 1.0
    for m in (rng.uniform(size=(NDEV * 3, 2, 5)) < 0.5, rng.uniform(size=(NDEV * 3, 1, 5)) < 0.5):
        m[0, :, 0] = m[5, :, 1] = True
        _check_masked(conv, x.copy(), m)


def _check_masked(conv, x, m):
    mb = np.broadcast_to(m, x.shape)
    x[~mb] = np.nan  # masked values must not leak
    fn = _sharded_bn(conv, masked=True)
    rm, rv = np.full(2, 0.5), np.full(2, 2.0)
    y, nrm, nrv = fn(x, np.ones(2), np.zeros(2), rm, rv, jnp.asarray(m))
    y = np.asarray(y)
    for c in range(2):
        vals = x[:, c, :][mb[:, c, :]].reshape(-1, 1)
        ref = oracle.forward(vals, None, None, rm[c : c + 1], rv[c : c + 1], training=True, convention=conv)
        assert_close(y[:, c, :][mb[:, c, :]], ref.y[:, 0], "float64", what=f"y channel {c}")
        assert_close(np.asarray(nrv)[c : c + 1], ref.running_var, "float64", what=f"running_var {c}")
        assert_close(np.asarray(nrm)[c : c + 1], ref.running_mean, "float64", what=f"running_mean {c}")
    np.testing.assert_array_equal(y[~mb], 0.0)
