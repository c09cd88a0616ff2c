"""LeNet with Batch Normalization (the d2l book's LeNet-BN) in ``flax.linen``, and a train step.

The architecture matches the PyTorch backend's LeNet, in Flax's NHWC layout::

    x (N, 28, 28, 1)
    conv1  Conv(6, 5x5, VALID)   -> bn1 -> sigmoid -> avg_pool 2x2/2     (N, 12, 12, 6)
    conv2  Conv(16, 5x5, VALID)  -> bn2 -> sigmoid -> avg_pool 2x2/2     (N, 4, 4, 16)
    flatten (in H, W, C order)                                           (N, 256)
    dense1 Dense(120) -> bn3 -> sigmoid
    dense2 Dense(84)  -> bn4 -> sigmoid
    dense3 Dense(10)                                                     (N, 10) logits

Submodule names are fixed (``conv1, bn1, conv2, bn2, dense1, bn3, dense2, bn4, dense3``) so
weights can be mapped to and from other frameworks. Note the flatten order: Flax flattens
(H, W, C) where PyTorch flattens (C, H, W); a port of ``dense1``'s kernel must permute its rows.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from ..conventions import ConventionLike, get_convention
from ..flax import BatchNorm
from ..variants import Variant

__all__ = ["LeNet", "native_batchnorm_kwargs", "TrainState", "create_train_state", "train_step", "loss_and_accuracy"]

BNKind = Literal["ref", "native", "none"]


def native_batchnorm_kwargs(convention: ConventionLike) -> dict[str, Any]:
    """Keyword arguments that make ``flax.linen.BatchNorm`` follow ``convention`` (§3.5, §9).

    Flax puts momentum on the running term (§3.2), so a convention with momentum ``m`` on the
    batch term (§3.1) maps to Flax momentum ``1 - m``. ``use_fast_variance=False`` makes Flax
    compute the variance in two passes (§8.1). Feature axis -1 (NHWC).

    Raises:
        ValueError: the convention cannot be expressed by Flax's BatchNorm: ``momentum=None``
            (Flax has no cumulative average, §3.3) or ``running_var="unbiased"`` (Flax stores the
            biased batch variance, §3.4).
    """
    conv = get_convention(convention)
    if conv.momentum is None:
        raise ValueError(
            f"convention {conv.name!r} has momentum=None (cumulative average, spec §3.3), which "
            "flax.linen.BatchNorm cannot express (it only has an exponential moving average); use bn='ref'"
        )
    if conv.running_var == "unbiased":
        raise ValueError(
            f"convention {conv.name!r} stores the unbiased running variance (spec §3.4), but "
            "flax.linen.BatchNorm always stores the biased batch variance; use bn='ref'"
        )
    return {"momentum": conv.momentum_spelled("running"), "epsilon": float(conv.eps), "axis": -1, "use_fast_variance": False}


class LeNet(nn.Module):
    """LeNet-BN for (N, 28, 28, 1) NHWC inputs; returns (N, 10) logits.

    Attributes:
        bn: ``"ref"`` -- :class:`bn_ref.flax.BatchNorm` with ``convention`` (feature axis forced
            to -1 for the NHWC layout); ``"native"`` -- ``flax.linen.BatchNorm`` configured from
            the convention by :func:`native_batchnorm_kwargs` (raises ``ValueError`` where Flax
            cannot express it); ``"none"`` -- no normalization.
        convention: a preset name or a :class:`bn_ref.Convention`.
        param_dtype: dtype of every parameter and running statistic (float32; float64 under x64).
        axis_name: None (default), or a named axis of ``jax.shard_map``/``pmap`` over which every
            BN layer takes its training statistics (data parallelism, spec §11): bn-ref's layer
            count-weighted and exact; ``flax.linen.BatchNorm`` (``bn="native"``) averages the
            devices' statistics with equal weights, exact only when every device holds the same
            number of real samples.
        variant: None (plain BN), or a :class:`bn_ref.variants.Variant` every bn-ref layer trains
            with -- Batch Renormalization (spec §13), ghost batches (§14), ... (``bn="ref"`` only;
            no ``axis_name`` or ``mask`` with it). The ghost batches of a conv layer are groups of
            images (axis 0), their statistics over the images' positions too (§6).

    Initialisation: Xavier-uniform kernels and zero biases for every Conv/Dense (the book's
    classic init); BN scale ones, bias zeros, running mean/var zeros/ones.
    """

    bn: BNKind = "ref"
    convention: ConventionLike = "flax"
    param_dtype: Any = jnp.float32
    axis_name: Any = None
    variant: Variant | None = None

    def _norm(self, name: str, mask: jax.Array | None) -> Callable[[jax.Array, bool], jax.Array]:
        if self.variant is not None and self.bn != "ref":
            raise ValueError(f"LeNet variant= needs bn='ref' (bn-ref's layers); got bn={self.bn!r}")
        if self.bn == "none":
            return lambda h, train: h
        if self.bn == "ref":
            layer = BatchNorm(
                convention=self.convention,
                axis=-1,
                param_dtype=self.param_dtype,
                axis_name=self.axis_name,
                variant=self.variant,
                name=name,
            )
            return lambda h, train: layer(h, use_running_average=not train, mask=mask)
        if self.bn == "native":
            kw = native_batchnorm_kwargs(self.convention)
            layer = nn.BatchNorm(param_dtype=self.param_dtype, axis_name=self.axis_name, name=name, **kw)

            def native(h: jax.Array, train: bool) -> jax.Array:
                m = None if mask is None else mask.reshape(mask.shape + (1,) * (h.ndim - 1))
                return layer(h, use_running_average=not train, mask=m)

            return native
        raise ValueError(f"bn must be 'ref', 'native' or 'none'; got {self.bn!r}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """x: (N, 28, 28, 1); ``train`` selects batch statistics (True) or running ones (False).

        ``mask``: optional (N,) bool, True for real samples; padded samples (False) add nothing
        to the BN statistics (their logits are still computed and should be ignored).
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != (28, 28, 1):
            raise ValueError(f"LeNet expects NHWC inputs shaped (N, 28, 28, 1); got shape {tuple(x.shape)}")
        if mask is not None and tuple(jnp.shape(mask)) != (x.shape[0],):
            raise ValueError(f"LeNet mask must have shape (N,) = ({x.shape[0]},); got {tuple(jnp.shape(mask))}")
        init = {"kernel_init": nn.initializers.xavier_uniform(), "bias_init": nn.initializers.zeros}
        pd = {"param_dtype": self.param_dtype}
        x = nn.Conv(6, (5, 5), padding="VALID", name="conv1", **init, **pd)(x)
        x = nn.sigmoid(self._norm("bn1", mask)(x, train))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(16, (5, 5), padding="VALID", name="conv2", **init, **pd)(x)
        x = nn.sigmoid(self._norm("bn2", mask)(x, train))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(120, name="dense1", **init, **pd)(x)
        x = nn.sigmoid(self._norm("bn3", mask)(x, train))
        x = nn.Dense(84, name="dense2", **init, **pd)(x)
        x = nn.sigmoid(self._norm("bn4", mask)(x, train))
        return nn.Dense(10, name="dense3", **init, **pd)(x)


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step changes, plus the (static) model and optimizer.

    Fields: ``params`` and ``batch_stats`` (the model's variable collections; ``batch_stats`` is
    ``{}`` for ``bn="none"``), ``opt_state`` (optax state), ``step`` (int32 scalar).
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def create_train_state(
    model: nn.Module,
    key: jax.Array,
    sample_x: jax.Array,
    *,
    learning_rate: float = 0.1,
    tx: optax.GradientTransformation | None = None,
) -> TrainState:
    """Initialise ``model`` on ``sample_x`` and pair it with optax SGD (or ``tx``).

    Args:
        model: a linen module called as ``model(x, train=...)`` (e.g. :class:`LeNet`).
        key: PRNG key for the parameter initialisers.
        sample_x: an input batch of the right shape, e.g. (N, 28, 28, 1).
        learning_rate: SGD step size when ``tx`` is None.
        tx: any optax transformation to use instead of ``optax.sgd(learning_rate)``.
    """
    variables = jax.jit(functools.partial(model.init, train=False))(key, sample_x)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    tx = optax.sgd(learning_rate) if tx is None else tx
    return TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        apply_fn=model.apply,
        tx=tx,
    )


def loss_and_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy of (N, 10) logits against (N,) integer labels, and accuracy."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, acc


@jax.jit
def train_step(state: TrainState, x: jax.Array, labels: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One jitted SGD step on a batch (training mode: batch statistics, running update §3.6).

    Args:
        state: from :func:`create_train_state`.
        x: (N, 28, 28, 1) inputs; labels: (N,) integer classes.

    Returns:
        ``(new_state, metrics)`` with updated ``params``, ``batch_stats``, ``opt_state`` and
        ``step``; ``metrics = {"loss", "accuracy"}`` of this batch *before* the update.
    """

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, jax.Array]]:
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
            logits, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            logits = state.apply_fn(variables, x, train=True)
            new_stats = state.batch_stats
        loss, acc = loss_and_accuracy(logits, labels)
        return loss, (new_stats, acc)

    (loss, (new_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(params=params, batch_stats=new_stats, opt_state=opt_state, step=state.step + 1)
    return new_state, {"loss": loss, "accuracy": acc}
