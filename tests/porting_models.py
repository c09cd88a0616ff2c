"""Small non-LeNet models for the porting tests: the same networks in PyTorch (NCHW), Flax linen
and Flax NNX (NHWC). Kept tiny so the tests run in seconds."""

from __future__ import annotations

from typing import Any

import numpy as np


def torch_convnet(bn: str = "native") -> Any:
    """conv(3->4, 3x3) - BN - ReLU - conv(4->6, 3x3, stride 2) - BN - ReLU - flatten - dense(6*3*3 -> 5).

    Input (N, 3, 8, 8). ``bn="native"``: torch.nn.BatchNorm2d; ``"bnref"``: bn_ref.torch.BatchNorm2d."""
    import torch.nn as nn

    if bn == "native":
        BN = nn.BatchNorm2d
    else:
        import bn_ref.torch as bt

        BN = bt.BatchNorm2d
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), BN(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=0), BN(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
    )


def linen_convnet(bn: str = "bnref", **bn_kwargs: Any) -> Any:
    """The Flax linen twin of :func:`torch_convnet` (NHWC). ``bn="bnref"``: bn_ref.flax.BatchNorm
    (``bn_kwargs`` e.g. ``convention="pytorch"``); ``"flax"``: flax.linen.BatchNorm."""
    import flax.linen as nn

    import bn_ref.flax as bf

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:
            def norm(h: Any) -> Any:
                if bn == "flax":
                    return nn.BatchNorm(use_running_average=not train, **bn_kwargs)(h)
                return bf.BatchNorm(use_running_average=not train, **{"axis": -1, **bn_kwargs})(h)

            x = nn.relu(norm(nn.Conv(4, (3, 3), padding=1)(x)))
            x = nn.relu(norm(nn.Conv(6, (3, 3), strides=2, padding="VALID")(x)))
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(5)(x)

    return ConvNet()


def nnx_convnet(**bn_kwargs: Any) -> Any:
    """The Flax NNX twin of :func:`torch_convnet` with bn_ref.flax.nnx.BatchNorm."""
    from flax import nnx

    import bn_ref.flax as bf

    bn_kwargs = {"axis": -1, **bn_kwargs}

    class ConvNet(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.conv1 = nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs)
            self.bn1 = bf.nnx.BatchNorm(4, **bn_kwargs)
            self.conv2 = nnx.Conv(4, 6, (3, 3), strides=2, padding="VALID", rngs=rngs)
            self.bn2 = bf.nnx.BatchNorm(6, **bn_kwargs)
            self.fc = nnx.Linear(54, 5, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            x = nnx.relu(self.bn1(self.conv1(x)))
            x = nnx.relu(self.bn2(self.conv2(x)))
            return self.fc(x.reshape(x.shape[0], -1))

    return ConvNet(nnx.Rngs(0))


def torch_resblock() -> Any:
    """A ResNet basic block with a projection shortcut, then global average pooling and a dense head.

    Input (N, 3, 6, 6): conv3x3(3->4) BN ReLU conv3x3(4->4) BN, shortcut conv1x1(3->4) BN,
    add, ReLU, mean over H, W, dense(4->3). The shortcut is registered after the main path."""
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(4)
            self.proj = nn.Conv2d(3, 4, 1, bias=False)
            self.bn_proj = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            h = torch.relu(h + self.bn_proj(self.proj(x)))
            return self.fc(h.mean(dim=(2, 3)))

    return Block()


def linen_resblock(**bn_kwargs: Any) -> Any:
    """The Flax linen twin of :func:`torch_resblock` (NHWC, bn_ref.flax.BatchNorm)."""
    import flax.linen as nn

    import bn_ref.flax as bf

    bn_kwargs = {"axis": -1, **bn_kwargs}

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:
            ura = not train
            h = nn.relu(bf.BatchNorm(use_running_average=ura, name="bn1", **bn_kwargs)(
                nn.Conv(4, (3, 3), padding=1, use_bias=False, name="conv1")(x)))
            h = bf.BatchNorm(use_running_average=ura, name="bn2", **bn_kwargs)(
                nn.Conv(4, (3, 3), padding=1, use_bias=False, name="conv2")(h))
            s = bf.BatchNorm(use_running_average=ura, name="bn_proj", **bn_kwargs)(
                nn.Conv(4, (1, 1), use_bias=False, name="proj")(x))
            h = nn.relu(h + s)
            return nn.Dense(3, name="fc")(h.mean(axis=(1, 2)))

    return Block()


def trained_torch(model: Any, shape: tuple[int, ...], steps: int = 3, seed: int = 0) -> Any:
    """Run ``steps`` training forwards (running statistics move, count increments) and perturb the
    BN affine parameters, so that every leaf carries information; returns the model in eval."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("bn" in name or name.split(".")[0].isdigit()):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.train()
        for _ in range(steps):
            model(1.5 * torch.randn(shape, generator=g) + 0.5)
    return model.eval()


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))
