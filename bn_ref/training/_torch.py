"""The PyTorch training loop of :func:`bn_ref.training.train` (LeNet from ``bn_ref.torch.lenet``)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..torch import lenet

EVAL_BATCH = 2000


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: PyTorch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


class Trainer:
    """SGD on LeNet-BN with the data resident on the device; metrics stay on the device until the
    end of the epoch. Images are NCHW ``(N, 1, 28, 28)`` float32."""

    def __init__(self, config) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.device_name = str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)
        torch.manual_seed(config.seed)
        self.model = lenet(bn=config.bn, convention=config.effective_convention, device=self.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=config.lr)

    def setup(self, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> None:
        def put(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

        self.xtr, self.ytr = put(xtr[:, None], torch.float32), put(ytr, torch.long)
        self.xte, self.yte = put(xte[:, None], torch.float32), put(yte, torch.long)

    def train_epoch(self, perm: np.ndarray, progress: Callable[[int], None]) -> tuple[float, int]:
        model, opt, bs = self.model, self.opt, self.config.batch_size
        model.train()
        order = torch.from_numpy(perm).to(self.device)
        n = len(perm)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            if len(idx) < 2:  # one sample left over: no batch statistics to take (spec §7.1)
                break
            xb, yb = self.xtr[idx], self.ytr[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == yb).sum()
            seen += len(idx)
            progress(seen)
        return float(loss_sum), int(correct)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for start in range(0, len(self.xte), EVAL_BATCH):
            logits = self.model(self.xte[start : start + EVAL_BATCH])
            correct += (logits.argmax(1) == self.yte[start : start + EVAL_BATCH]).sum()
        return int(correct) / len(self.xte)

    def get_state(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "opt": self.opt.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.opt.load_state_dict(state["opt"])
