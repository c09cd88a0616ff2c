"""The d2l book's classic from-scratch Batch Normalization layer, re-implemented faithfully.

The d2l book ("Dive into Deep Learning", classic 0.17 edition, PyTorch tab) builds Batch
Normalization by hand in its chapter on modern CNNs: a function ``batch_norm`` that does the
arithmetic and a module ``BatchNorm`` that holds the state. Many people learn BN from it, and
port models that use it, so bn-ref carries an executable copy of its *algorithm* (written anew
here, not the book's code) for the preset ``"d2l"`` (``docs/spec.md`` §9) and for the
conformance harness, which uses :class:`BatchNorm` as its "d2l" built-in adapter.

What the layer computes (preset ``d2l``: eps 1e-5, momentum 0.9 on the running term, biased
running variance, feature axis 1, n = 1 allowed)::

    training:  mean, var = two-pass batch mean and biased variance over (0,) or (0, 2, 3)  (§2.1, §8.1)
               y = gamma * (x - mean) / sqrt(var + eps) + beta                              (§2.2, §2.3)
               moving = momentum * moving + (1 - momentum) * batch                          (§3.2, §3.4)
    eval:      y = gamma * (x - moving_mean) / sqrt(moving_var + eps) + beta                (§4)

Behaviour kept as in the book (these are properties of the layer people actually run, and the
conformance harness reports them):

* **Mode switch by grad mode.** Training versus eval is chosen by ``torch.is_grad_enabled()``,
  not by ``Module.training``: ``model.eval()`` alone still normalizes with batch statistics and
  still updates the moving statistics; only ``torch.no_grad()`` (or ``torch.inference_mode()``)
  selects eval, and then it does so even under ``model.train()``.
* **Moving statistics are plain attributes**, not registered buffers: they are absent from
  ``state_dict()`` (so they are neither saved nor loaded with a checkpoint) and are not
  converted by ``Module.to(...)``, ``.double()``, ``.half()`` or ``.cuda()``. ``forward`` moves
  them to the input's device when the devices differ, but never changes their dtype; they start
  as float32 and follow PyTorch type promotion from the first update on (float64 input makes
  them float64).
* **Ranks.** Only 2-D (N, C) and 4-D (N, C, H, W) inputs, checked by an ``assert`` in the
  training path only; eval accepts whatever broadcasts against the (1, C) / (1, C, 1, 1) stats.
* **No n = 1 check.** One value per channel trains with var = 0, so the output is beta (§7.1).
* **Hard-coded hyper-parameters.** ``BatchNorm`` always uses eps = 1e-5 and momentum = 0.9.
* **Detached statistics.** The moving statistics are stored through ``.data``, so no autograd
  history reaches them; gradients flow through the batch mean and variance as usual (§5.1).

``forward`` returns ``Y``, as the book does in both its 0.17 and 1.0 editions. (The project's seed
notes transcribe the class without that ``return``; ``tests/test_facts.py`` executes the seed's code
and checks this module against it bit for bit.)

Importing this module imports PyTorch (``import bn_ref`` itself does not).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["batch_norm", "BatchNorm", "EPS", "MOMENTUM"]

EPS = 1e-5
"""The eps the book's :class:`BatchNorm` passes to :func:`batch_norm`."""

MOMENTUM = 0.9
"""The momentum the book's :class:`BatchNorm` passes; it multiplies the *running* term (§3.2)."""


def batch_norm(
    X: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    moving_mean: torch.Tensor,
    moving_var: torch.Tensor,
    eps: float,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the book's batch normalization, in training or eval as grad mode says.

    Args:
        X: (N, C) or (N, C, H, W) input. In training (grad mode enabled) any other rank fails an
            ``assert``.
        gamma, beta: scale and shift, shaped (1, C) for 2-D or (1, C, 1, 1) for 4-D input.
        moving_mean, moving_var: the moving statistics, same shapes as gamma.
        eps: added to the variance under the square root (§2.2, §4).
        momentum: weight of the *old* moving statistic: ``moving <- momentum * moving +
            (1 - momentum) * batch`` (§3.2); the batch variance fed in is the biased one (§3.4).

    Returns:
        ``(Y, new_moving_mean, new_moving_var)``: Y shaped like X; the moving statistics detached
        (through ``.data``). In eval they are the inputs, unchanged. In training with 2-D input
        they are (1, C), with 4-D input (1, C, 1, 1).

    Mode: ``torch.is_grad_enabled()`` True means training (batch statistics, moving statistics
    updated); False means eval (moving statistics used as they are).
    """
    if torch.is_grad_enabled():
        assert X.dim() in (2, 4), f"the d2l layer handles 2-D or 4-D input only; got rank {X.dim()}"
        dims = (0,) if X.dim() == 2 else (0, 2, 3)
        # §2.1 / §8.1: two passes, biased variance. The 2-D mean keeps no dims, as in the book.
        mu = X.mean(dim=dims, keepdim=X.dim() == 4)
        sigma2 = ((X - mu) ** 2).mean(dim=dims, keepdim=X.dim() == 4)
        X_hat = (X - mu) / torch.sqrt(sigma2 + eps)  # §2.2
        # §3.2: momentum on the running term; §3.4: the biased batch variance is stored.
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mu
        moving_var = momentum * moving_var + (1.0 - momentum) * sigma2
    else:
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)  # §4
    Y = gamma * X_hat + beta  # §2.3
    return Y, moving_mean.data, moving_var.data


class BatchNorm(nn.Module):
    """The book's from-scratch BN layer (preset ``"d2l"``), with ``forward`` returning its output.

    Args:
        num_features: C, the number of features (2-D input) or channels (4-D input).
        num_dims: 2 for fully-connected (N, C) input; anything else means 4-D (N, C, H, W).

    Attributes:
        gamma, beta: ``nn.Parameter`` of shape (1, C) or (1, C, 1, 1), initialised to 1 and 0.
        moving_mean, moving_var: plain tensor attributes (not buffers) of the same shape,
            initialised to 0 and 1 in float32; replaced (not updated in place) at every
            training step. ``moving_mean.reshape(-1)`` gives the (C,) statistic.

    Train/eval is chosen by grad mode, not by ``model.train()``/``model.eval()``; see the module
    docstring for this and the layer's other faithful quirks.
    """

    def __init__(self, num_features: int, num_dims: int) -> None:
        super().__init__()
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.moving_mean = torch.zeros(shape)
        self.moving_var = torch.ones(shape)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Normalize ``X`` ((N, C) or (N, C, H, W)); returns Y of the same shape.

        Under grad mode the moving statistics are replaced by their updated values (§3.2).
        """
        if self.moving_mean.device != X.device:  # device only; the dtype is left alone
            self.moving_mean = self.moving_mean.to(X.device)
            self.moving_var = self.moving_var.to(X.device)
        Y, self.moving_mean, self.moving_var = batch_norm(
            X, self.gamma, self.beta, self.moving_mean, self.moving_var, eps=EPS, momentum=MOMENTUM
        )
        return Y
