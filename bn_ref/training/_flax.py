"""The Flax training loop of :func:`bn_ref.training.train` (``bn_ref.flax.LeNet``, NHWC).

An epoch runs as a few ``lax.scan`` calls over its batches (one, when no progress bar is shown):
the step gathers its batch from the device-resident dataset by index, so the host only sends the
epoch's permutation.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..flax import LeNet

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


class Trainer:
    """SGD (optax) on the Flax LeNet-BN; images ``(N, 28, 28, 1)`` float32."""

    def __init__(self, config) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.device_name = f"{self.device.platform}:{getattr(self.device, 'device_kind', '')}"
        self.model = LeNet(bn=config.bn, convention=config.effective_convention)
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
        logits = self.model.apply(variables, xb, train=False)
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

    def get_state(self) -> dict[str, Any]:
        return jax.device_get({"params": self.params, "stats": self.stats, "opt": self.opt_state})

    def load_state(self, state: dict[str, Any]) -> None:
        put = partial(jax.device_put, device=self.device)
        self.params = jax.tree_util.tree_map(put, state["params"])
        self.stats = jax.tree_util.tree_map(put, state["stats"])
        self.opt_state = jax.tree_util.tree_map(put, state["opt"])
