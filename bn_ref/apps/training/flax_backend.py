"""The Flax trainer of :func:`bn_ref.apps.training.train` (:class:`bn_ref.apps.lenet_flax.LeNet`, NHWC).

An epoch runs as a few ``lax.scan`` calls over its batches (one, when no progress bar is shown):
the step gathers its batch from the device-resident dataset by index, so the host only sends the
epoch's permutation.

:class:`ShardedTrainer` is the data-parallel version (``--devices N``): the same scans inside
``jax.shard_map`` over a 1-D mesh of N devices, BN statistics over ``axis_name`` with padded
samples masked out, gradients ``psum``'d; it gives the single-device result to float32 round-off.

The state for checkpoints is a flat dict of NumPy arrays: ``params/<layer>/<leaf>``,
``batch_stats/<layer>/<leaf>`` and ``opt/<path>`` (the optax state's leaves by their path; plain
SGD has none). Loading rebuilds each tree in the structure of the freshly built model's own.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..lenet_flax import LeNet

EVAL_BATCH = 2000
PROGRESS_CHUNKS = 8


def resolve_device(name: str) -> "jax.Device":
    if name == "auto":
        return jax.devices()[0]
    if name in ("cuda", "gpu"):
        try:
            return jax.devices("gpu")[0]
        except RuntimeError:
            raise ValueError(f"--device {name}: JAX sees no GPU") from None
    return jax.devices("cpu")[0]


def device_label(device: "jax.Device") -> str:
    """``cpu``, or ``gpu (NVIDIA H200)``: the device as plot titles and logs name it."""
    if device.platform == "cpu":
        return "cpu"
    kind = getattr(device, "device_kind", "")
    return f"{device.platform} ({kind})" if kind and kind != device.platform else device.platform


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def tree_arrays(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    """The leaves of a pytree as NumPy arrays named ``prefix/<path>``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join([prefix, *(_key_name(k) for k in path)]): np.array(jax.device_get(v)) for path, v in leaves}


def tree_from_arrays(prefix: str, template: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Inverse of :func:`tree_arrays`, in ``template``'s structure (names already checked)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(
        treedef, [arrays["/".join([prefix, *(_key_name(k) for k in path)])] for path, _ in leaves]
    )


class Trainer:
    """SGD (optax) on the Flax LeNet-BN; images ``(N, 28, 28, 1)`` float32.

    ``--bn-variant`` builds the model with ``config.variant()`` (spec §13-§14). The state the
    variant keeps lives in ``batch_stats`` (for LeNet's renorm, whose correction pair is the running
    pair, §13.3, that is just ``mean``/``var``; a layer with its own pair adds ``renorm_mean``/
    ``renorm_stat``), so the scan carries it and the checkpoint saves it like any running statistic.
    """

    def __init__(self, config) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.device_name = device_label(self.device)
        self.model = LeNet(bn=config.bn, convention=config.effective_convention, variant=config.variant())
        self.eval_model = self.model  # the data-parallel trainer evaluates without its axis_name
        with jax.default_device(self.device):
            variables = self.model.init(jax.random.PRNGKey(config.seed), jnp.zeros((2, 28, 28, 1), jnp.float32), train=False)
        self.params = variables["params"]
        self.stats = variables.get("batch_stats", {})
        self.tx = optax.sgd(config.lr)
        self.opt_state = self.tx.init(self.params)
        self._epoch_fn = jax.jit(self._scan_steps)
        self._eval_fn = jax.jit(self._eval_batch)

    # -- pure functions ------------------------------------------------------------------------

    def _loss(self, params, stats, xb, yb):
        variables = {"params": params}
        if stats:
            variables["batch_stats"] = stats
            logits, updated = self.model.apply(variables, xb, train=True, mutable=["batch_stats"])
            stats = updated["batch_stats"]
        else:
            logits = self.model.apply(variables, xb, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, (logits, stats)

    def _step(self, x_all, y_all, carry, idx):
        params, stats, opt_state, loss_sum, correct = carry
        xb, yb = x_all[idx], y_all[idx]
        (loss, (logits, stats)), grads = jax.value_and_grad(self._loss, has_aux=True)(params, stats, xb, yb)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        loss_sum = loss_sum + loss * idx.shape[0]
        correct = correct + jnp.sum(jnp.argmax(logits, -1) == yb)
        return (params, stats, opt_state, loss_sum, correct), None

    def _scan_steps(self, carry, x_all, y_all, batches):
        """Run the steps whose indices are the rows of ``batches`` (shape (steps, batch))."""
        carry, _ = jax.lax.scan(partial(self._step, x_all, y_all), carry, batches)
        return carry

    def _eval_batch(self, params, stats, xb, yb):
        variables = {"params": params, **({"batch_stats": stats} if stats else {})}
        logits = self.eval_model.apply(variables, xb, train=False)
        return jnp.sum(jnp.argmax(logits, -1) == yb)

    # -- the loop -----------------------------------------------------------------------------

    def setup(self, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> None:
        put = partial(jax.device_put, device=self.device)
        self.xtr, self.ytr = put(xtr[..., None]), put(ytr)
        self.xte, self.yte = put(xte[..., None]), put(yte)

    def train_epoch(self, perm: np.ndarray, progress: Callable[[int], None]) -> tuple[float, int]:
        bs = self.config.batch_size
        n_full = len(perm) // bs
        full = perm[: n_full * bs].reshape(n_full, bs).astype(np.int32)
        rest = perm[n_full * bs :].astype(np.int32)
        chunks = PROGRESS_CHUNKS if self.config.progress else 1
        per = max(1, -(-n_full // chunks))
        carry = (self.params, self.stats, self.opt_state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        done = 0
        for start in range(0, n_full, per):
            block = jax.device_put(full[start : start + per], self.device)
            carry = self._epoch_fn(carry, self.xtr, self.ytr, block)
            done += block.shape[0] * bs
            if chunks > 1:
                jax.block_until_ready(carry[3])
                progress(done)
        if len(rest) >= 2:  # a final partial batch, as the book's loader keeps it (spec §7.1: n > 1)
            carry = self._epoch_fn(carry, self.xtr, self.ytr, jax.device_put(rest[None], self.device))
        self.params, self.stats, self.opt_state, loss_sum, correct = carry
        return float(loss_sum), int(correct)

    def evaluate(self) -> float:
        correct = jnp.zeros((), jnp.int32)
        for start in range(0, self.xte.shape[0], EVAL_BATCH):
            sl = slice(start, start + EVAL_BATCH)
            correct = correct + self._eval_fn(self.params, self.stats, self.xte[sl], self.yte[sl])
        return int(correct) / self.xte.shape[0]

    def get_state(self) -> dict[str, np.ndarray]:
        return {
            **tree_arrays("params", self.params),
            **tree_arrays("batch_stats", self.stats),
            **tree_arrays("opt", self.opt_state),
        }

    def _trees(self, arrays: dict[str, np.ndarray]) -> tuple[Any, Any, Any]:
        return (
            tree_from_arrays("params", self.params, arrays),
            tree_from_arrays("batch_stats", self.stats, arrays),
            tree_from_arrays("opt", self.opt_state, arrays),
        )

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        put = partial(jax.device_put, device=self.device)
        self.params, self.stats, self.opt_state = jax.tree_util.tree_map(put, self._trees(arrays))


AXIS = "data"


def data_mesh(n: int, device: str) -> "jax.sharding.Mesh":
    """A 1-D mesh (axis ``"data"``) of the first ``n`` JAX devices of the kind ``device`` names.

    Raises:
        ValueError: fewer than ``n`` such devices (the message gives the XLA_FLAGS hint for host CPUs).
    """
    if device == "auto":
        devs = jax.devices()
    elif device in ("cuda", "gpu"):
        try:
            devs = jax.devices("gpu")
        except RuntimeError:
            raise ValueError(f"--device {device}: JAX sees no GPU") from None
    else:
        devs = jax.devices("cpu")
    if len(devs) < n:
        kind = devs[0].platform if devs else device
        hint = (
            f"; for host CPU devices use --device cpu with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            "set before JAX is imported (JAX is already initialised with fewer devices here)"
        )
        raise ValueError(f"--devices {n}: JAX sees only {len(devs)} {kind} device(s){hint}")
    return jax.sharding.Mesh(np.array(devs[:n]), (AXIS,))


def shard_layout(batches: np.ndarray, ndev: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad global batches to ``ndev`` equal device shards, with a mask of the real samples.

    ``batches`` (steps, B) of sample indices becomes ``(indices, mask)``, both (steps, ndev * s)
    with ``s = ceil(B / ndev)``: device ``d`` takes columns ``[d*s, (d+1)*s)``, which hold the
    contiguous shard :func:`bn_ref.apps.training.batches.shard_bounds` gives it, then padding (index 0,
    mask False) -- so the last devices hold fewer real samples, possibly none.
    """
    steps, b = batches.shape
    width = ndev * -(-b // ndev)
    idx = np.zeros((steps, width), np.int32)
    mask = np.zeros((steps, width), bool)
    idx[:, :b] = batches
    mask[:, :b] = True
    return idx, mask


class ShardedTrainer(Trainer):
    """Data-parallel SGD on ``config.devices`` JAX devices (``jax.shard_map`` over a 1-D mesh).

    Parameters, optimizer state and running statistics are replicated; each step, device ``d``
    gathers its shard of the global batch (see :func:`shard_layout`) from its copy of the
    dataset, the BN layers take count-weighted global statistics over ``axis_name="data"`` with
    ``mask`` hiding the padding (spec §11), the loss is the shard's sum of per-sample losses over
    the global batch size, and the gradients are ``psum``'d -- the gradient of the global batch's
    mean loss, as on one device. ``bn="native"`` uses ``flax.linen.BatchNorm(axis_name=...)``,
    which averages per-device statistics with equal weights: it is only exact, and therefore only
    accepted, when every batch splits evenly over the devices.
    """

    def __init__(self, config) -> None:
        self.config = config
        self.ndev = config.devices
        self.mesh = data_mesh(self.ndev, config.device)
        self.device = self.mesh.devices.flat[0]
        self.device_name = f"{self.ndev} x {device_label(self.device)}"
        self.model = LeNet(bn=config.bn, convention=config.effective_convention, axis_name=AXIS)
        self.eval_model = LeNet(bn=config.bn, convention=config.effective_convention)
        with jax.default_device(self.device):
            variables = self.eval_model.init(
                jax.random.PRNGKey(config.seed), jnp.zeros((2, 28, 28, 1), jnp.float32), train=False
            )
        self.tx = optax.sgd(config.lr)
        self.params = self._replicate(variables["params"])
        self.stats = self._replicate(variables.get("batch_stats", {}))
        self.opt_state = self._replicate(self.tx.init(variables["params"]))
        P = jax.sharding.PartitionSpec
        fn = jax.shard_map(
            self._scan_sharded,
            mesh=self.mesh,
            in_specs=(P(), P(), P(), P(None, AXIS), P(None, AXIS)),
            out_specs=P(),
            check_vma=False,  # BN's psum transposes to psum (pmap semantics); gradients psum'd by hand
        )
        self._epoch_fn = jax.jit(fn)
        self._eval_fn = jax.jit(self._eval_batch)

    def _replicate(self, tree: Any) -> Any:
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)

    def _sharded(self, a: np.ndarray) -> jax.Array:
        return jax.device_put(a, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, AXIS)))

    # -- pure functions (run per device inside shard_map) ----------------------------------------

    def _local_loss(self, params, stats, xb, yb, mask, total):
        variables = {"params": params}
        if stats:
            variables["batch_stats"] = stats
            logits, updated = self.model.apply(variables, xb, train=True, mask=mask, mutable=["batch_stats"])
            stats = updated["batch_stats"]
        else:
            logits = self.model.apply(variables, xb, train=True)
        per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        local = jnp.sum(jnp.where(mask, per_sample, 0.0))
        return local / total, (logits, stats, local)

    def _sharded_step(self, x_all, y_all, carry, inputs):
        params, stats, opt_state, loss_sum, correct = carry
        idx, mask = inputs
        xb, yb = x_all[idx], y_all[idx]
        total = jax.lax.psum(jnp.sum(mask.astype(jnp.int32)), AXIS).astype(jnp.float32)
        grad_fn = jax.value_and_grad(self._local_loss, has_aux=True)
        (_, (logits, stats, local)), grads = grad_fn(params, stats, xb, yb, mask, total)
        grads = jax.lax.psum(grads, AXIS)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        hits = jnp.sum((jnp.argmax(logits, -1) == yb) & mask)
        loss_sum = loss_sum + jax.lax.psum(local, AXIS)
        correct = correct + jax.lax.psum(hits, AXIS)
        return (params, stats, opt_state, loss_sum, correct), None

    def _scan_sharded(self, carry, x_all, y_all, idx, mask):
        carry, _ = jax.lax.scan(partial(self._sharded_step, x_all, y_all), carry, (idx, mask))
        return carry

    # -- the loop -----------------------------------------------------------------------------

    def setup(self, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> None:
        bs, n = self.config.batch_size, len(xtr)
        rest = n % bs
        if self.config.bn == "native" and (bs % self.ndev or (rest >= 2 and rest % self.ndev)):
            raise ValueError(
                f"--bn native --devices {self.ndev}: flax.linen.BatchNorm averages the devices' statistics with "
                f"equal weights, which is exact only when every batch splits evenly; batch {bs} and the last "
                f"batch of {rest} of {n} images do not split {self.ndev} ways (use --bn ref, whose statistics "
                "are count-weighted, or a batch size / --limit-train that divide evenly)"
            )
        self.xtr, self.ytr = self._replicate(xtr[..., None]), self._replicate(ytr)
        put = partial(jax.device_put, device=self.device)
        self.xte, self.yte = put(xte[..., None]), put(yte)

    def train_epoch(self, perm: np.ndarray, progress: Callable[[int], None]) -> tuple[float, int]:
        bs = self.config.batch_size
        n_full = len(perm) // bs
        full_idx, full_mask = shard_layout(perm[: n_full * bs].reshape(n_full, bs).astype(np.int32), self.ndev)
        rest = perm[n_full * bs :].astype(np.int32)
        chunks = PROGRESS_CHUNKS if self.config.progress else 1
        per = max(1, -(-n_full // chunks))
        zero_f, zero_i = self._replicate(jnp.zeros((), jnp.float32)), self._replicate(jnp.zeros((), jnp.int32))
        carry = (self.params, self.stats, self.opt_state, zero_f, zero_i)
        done = 0
        for start in range(0, n_full, per):
            sl = slice(start, start + per)
            carry = self._epoch_fn(carry, self.xtr, self.ytr, self._sharded(full_idx[sl]), self._sharded(full_mask[sl]))
            done += full_idx[sl].shape[0] * bs
            if chunks > 1:
                jax.block_until_ready(carry[3])
                progress(done)
        if len(rest) >= 2:  # the final partial batch, padded per device and masked
            idx, mask = shard_layout(rest[None], self.ndev)
            carry = self._epoch_fn(carry, self.xtr, self.ytr, self._sharded(idx), self._sharded(mask))
        self.params, self.stats, self.opt_state, loss_sum, correct = carry
        return float(loss_sum), int(correct)

    def evaluate(self) -> float:
        put = partial(jax.device_put, device=self.device)
        params, stats = jax.tree_util.tree_map(put, self.params), jax.tree_util.tree_map(put, self.stats)
        correct = jnp.zeros((), jnp.int32)
        for start in range(0, self.xte.shape[0], EVAL_BATCH):
            sl = slice(start, start + EVAL_BATCH)
            correct = correct + self._eval_fn(params, stats, self.xte[sl], self.yte[sl])
        return int(correct) / self.xte.shape[0]

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.params, self.stats, self.opt_state = self._replicate(self._trees(arrays))
