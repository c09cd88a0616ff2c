"""The d2l book's LeNet with Batch Normalization in PyTorch, with bn-ref's layer, PyTorch's, or none (application code).

Layers (input (N, 1, 28, 28), output (N, 10) logits)::

    index  layer                         output shape
    0      Conv2d(1, 6, kernel_size=5)   (N, 6, 24, 24)
    1      BN(6)                         (N, 6, 24, 24)
    2      Sigmoid
    3      AvgPool2d(2, stride=2)        (N, 6, 12, 12)
    4      Conv2d(6, 16, kernel_size=5)  (N, 16, 8, 8)
    5      BN(16)
    6      Sigmoid
    7      AvgPool2d(2, stride=2)        (N, 16, 4, 4)
    8      Flatten                       (N, 256)
    9      Linear(256, 120)              (N, 120)
    10     BN(120)
    11     Sigmoid
    12     Linear(120, 84)               (N, 84)
    13     BN(84)
    14     Sigmoid
    15     Linear(84, 10)                (N, 10)

``bn="ref"`` and ``bn="native"`` have the same indices, so their ``state_dict`` keys agree and
one loads into the other. ``bn="none"`` drops the BN layers (indices shift).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..conventions import Convention, ConventionLike, get_convention
from ..torch import BatchNorm1d, BatchNorm2d
from ..variants import Variant

__all__ = ["lenet", "native_batch_norm_kwargs"]

BN_CHOICES = ("ref", "native", "none")


def native_batch_norm_kwargs(convention: ConventionLike) -> dict[str, Any]:
    """``eps`` and ``momentum`` for ``torch.nn.BatchNorm*d`` that reproduce ``convention`` (§3.5).

    PyTorch weights the batch term (§3.1), so a convention with ``momentum_on="running"`` and
    momentum ``m`` maps to PyTorch momentum ``1 - m``; ``momentum=None`` (cumulative average,
    §3.3) maps to None.

    Raises:
        ValueError: ``running_var="biased"``: torch.nn BN always stores the unbiased running
            variance (§3.4), so such a convention cannot be expressed.

    ``single_value`` is not a numerical rule but an error check (§7.1): torch.nn BN always
    raises for n = 1 in training, so under ``single_value="allow"`` the native layer refuses
    inputs that bn-ref's layer accepts; the numbers of every other input agree. The feature axis
    is not mapped: torch.nn BN is always channels-first.
    """
    conv: Convention = get_convention(convention)
    if conv.running_var != "unbiased":
        raise ValueError(
            f"convention {conv.name!r} stores the {conv.running_var} running variance; torch.nn.BatchNorm "
            "always stores the unbiased one (spec §3.4), so bn='native' cannot express it (use bn='ref')"
        )
    return {"eps": conv.eps, "momentum": conv.momentum_spelled("batch")}


def lenet(
    bn: str = "ref",
    convention: ConventionLike = "pytorch",
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    variant: Variant | None = None,
) -> nn.Sequential:
    """The d2l LeNet-BN (see the module docstring for the layer table).

    Args:
        bn: ``"ref"``: :class:`bn_ref.torch.BatchNorm2d`/``BatchNorm1d`` under ``convention``
            with the feature axis forced to 1 (the network is NCHW whatever the convention);
            ``"native"``: ``torch.nn.BatchNorm2d``/``BatchNorm1d`` configured from the convention
            by :func:`native_batch_norm_kwargs` (the book's concise version); ``"none"``: the
            plain LeNet without BN.
        convention: preset name or :class:`bn_ref.Convention` (ignored for ``bn="none"``).
        dtype, device: of every parameter and buffer.
        variant: a :class:`bn_ref.variants.Variant` for every BN layer (Batch Renormalization,
            ghost batches, ...: ``docs/spec.md`` §13-§17), ``bn="ref"`` only; None is plain BN.
            Its extra buffers, if any, are part of the ``state_dict``.

    Weights are initialized as in the book's ``train_ch6``: ``xavier_uniform_`` on every Conv2d
    and Linear weight; their biases keep PyTorch's defaults. Seed ``torch.manual_seed`` first for
    reproducible weights.

    Raises:
        ValueError: unknown ``bn``; ``bn="native"`` with a convention torch.nn BN cannot express;
            a ``variant`` with ``bn`` other than ``"ref"``.
    """
    if bn not in BN_CHOICES:
        raise ValueError(f"bn must be one of {BN_CHOICES}; got {bn!r}")
    if variant is not None and bn != "ref":
        raise ValueError(f"variant needs bn='ref' (bn-ref's layers); got bn={bn!r}")
    factory: dict[str, Any] = {"dtype": dtype, "device": device}
    if bn == "ref":
        conv = get_convention(convention)

        def bn2d(c: int) -> nn.Module:
            return BatchNorm2d(c, convention=conv, feature_axis=1, variant=variant, **factory)

        def bn1d(c: int) -> nn.Module:
            return BatchNorm1d(c, convention=conv, feature_axis=1, variant=variant, **factory)

    elif bn == "native":
        kwargs = native_batch_norm_kwargs(convention)

        def bn2d(c: int) -> nn.Module:
            return nn.BatchNorm2d(c, **kwargs, **factory)

        def bn1d(c: int) -> nn.Module:
            return nn.BatchNorm1d(c, **kwargs, **factory)

    layers: list[nn.Module] = [nn.Conv2d(1, 6, kernel_size=5, **factory)]
    if bn != "none":
        layers.append(bn2d(6))
    layers += [nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2), nn.Conv2d(6, 16, kernel_size=5, **factory)]
    if bn != "none":
        layers.append(bn2d(16))
    layers += [nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(), nn.Linear(256, 120, **factory)]
    if bn != "none":
        layers.append(bn1d(120))
    layers += [nn.Sigmoid(), nn.Linear(120, 84, **factory)]
    if bn != "none":
        layers.append(bn1d(84))
    layers += [nn.Sigmoid(), nn.Linear(84, 10, **factory)]

    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    return net
