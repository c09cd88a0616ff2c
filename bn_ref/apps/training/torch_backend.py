"""The PyTorch trainer of :func:`bn_ref.apps.training.train` (LeNet from :mod:`bn_ref.apps.lenet_torch`).

:class:`Trainer` runs on one device; :class:`DistributedTrainer` is one rank of data-parallel
training (DDP + :func:`bn_ref.torch.convert_sync_batchnorm`), launched by
:mod:`bn_ref.apps.training.ddp`. The state for checkpoints is a flat dict of NumPy arrays:
``model/<state_dict key>`` and ``opt/state/<param index>/<key>``.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...torch import convert_sync_batchnorm
from ..lenet_torch import lenet
from .batches import shard_bounds

EVAL_BATCH = 2000


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: PyTorch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def device_label(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``: the device as plot titles and logs name it."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def state_arrays(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """The model's state_dict and the optimizer's per-parameter state as named NumPy arrays."""
    arrays = {f"model/{k}": v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                arrays[f"opt/state/{index}/{key}"] = value.detach().cpu().numpy().copy()
    return arrays


def load_state_arrays(model: torch.nn.Module, opt: torch.optim.Optimizer, arrays: dict[str, np.ndarray]) -> None:
    """Inverse of :func:`state_arrays` (names already checked against ``state_arrays``'s)."""
    device = next(model.parameters()).device
    sd = {k[len("model/"):]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("model/")}
    model.load_state_dict(sd, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in arrays.items():
        if name.startswith("opt/state/"):
            index, key = name[len("opt/state/"):].split("/", 1)
            state.setdefault(int(index), {})[key] = torch.from_numpy(np.array(value)).to(device)
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class Trainer:
    """SGD on LeNet-BN with the data resident on the device; metrics stay on the device until the
    end of the epoch. Images are NCHW ``(N, 1, 28, 28)`` float32."""

    def __init__(self, config) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.device_name = device_label(self.device)
        torch.manual_seed(config.seed)
        self.model = lenet(bn=config.bn, convention=config.effective_convention, device=self.device,
                           variant=config.variant())
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

    def get_state(self) -> dict[str, np.ndarray]:
        return state_arrays(self.model, self.opt)

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        load_state_arrays(self.model, self.opt, arrays)


class DistributedTrainer(Trainer):
    """One rank of data-parallel training (``torch.distributed`` must be initialised).

    The model is built exactly as on one device (same seed), its BN layers are swapped by
    :func:`bn_ref.torch.convert_sync_batchnorm` (global count-weighted statistics, spec §11) and
    it is wrapped in ``DistributedDataParallel`` (buffers are not broadcast: SyncBatchNorm keeps
    them equal on every rank). Each global batch of B images is split by
    :func:`bn_ref.apps.training.batches.shard_bounds`; this rank's loss is ``sum of its losses * P / B``, so
    DDP's average over the P ranks is the gradient of the global batch's mean loss.
    """

    def __init__(self, config, rank: int, world_size: int, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.config, self.rank, self.world_size, self.device = config, rank, world_size, device
        self.device_name = f"{world_size} processes ({'gloo' if device.type == 'cpu' else 'nccl'}), {device_label(device)}"
        torch.manual_seed(config.seed)
        self.net = convert_sync_batchnorm(lenet(bn=config.bn, convention=config.effective_convention, device=device))
        with warnings.catch_warnings():  # newer torch deprecates broadcast_buffers; its replacement is not in 2.11
            warnings.simplefilter("ignore", FutureWarning)
            self.model = DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        self.opt = torch.optim.SGD(self.net.parameters(), lr=config.lr)

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def train_epoch(self, perm: np.ndarray, progress: Callable[[int], None]) -> tuple[float, int]:
        model, opt, bs, p = self.model, self.opt, self.config.batch_size, self.world_size
        model.train()
        order = torch.from_numpy(perm).to(self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for start in range(0, len(perm), bs):
            gidx = order[start : start + bs]
            b = len(gidx)
            if b < 2:  # the same rule as on one device (spec §7.1), decided alike on every rank
                break
            lo, hi = shard_bounds(b, p, self.rank)
            idx = gidx[lo:hi]  # possibly empty: SyncBatchNorm and DDP still take part
            xb, yb = self.xtr[idx], self.ytr[idx]
            logits = model(xb)
            local = F.cross_entropy(logits, yb, reduction="sum")
            opt.zero_grad(set_to_none=True)
            (local * (p / b)).backward()
            opt.step()
            with torch.no_grad():
                loss_sum += local.detach().double()
                correct += (logits.argmax(1) == yb).sum()
            seen += b
            progress(seen)
        total_loss, total_correct = self._all_reduce([float(loss_sum), float(correct)])  # once per epoch
        return total_loss, int(round(total_correct))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.net.eval()
        lo, hi = shard_bounds(len(self.xte), self.world_size, self.rank)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for start in range(lo, hi, EVAL_BATCH):
            stop = min(start + EVAL_BATCH, hi)
            correct += (self.net(self.xte[start:stop]).argmax(1) == self.yte[start:stop]).sum()
        return self._all_reduce([float(correct)])[0] / len(self.xte)

    def get_state(self) -> dict[str, np.ndarray]:
        return state_arrays(self.net, self.opt)

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        load_state_arrays(self.net, self.opt, arrays)
