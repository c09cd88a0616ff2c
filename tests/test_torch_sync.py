"""bn_ref.torch.SyncBatchNorm and convert_sync_batchnorm on real torch.distributed worlds (spec §11).

Each multi-process test launches one world of worker processes (this file, run as a script) with
the gloo backend and a file:// rendezvous in a temporary directory. Every collective has a 30 s
gloo timeout and every world a wall-clock limit (subprocess wait with a timeout, then kill), so a
hung collective fails the test instead of hanging CI. The parent writes the global batches to a
file, each rank takes its slice, and the parent checks what the ranks saved against the float64
NumPy oracle on the concatenated global batch: y, dx, the sum over ranks of dgamma/dbeta (each
rank returns its own share), running statistics over 3 steps (identical on every rank), eval
output, and the errors every rank must raise without hanging.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bn_ref.torch as bnt
from bn_ref import DEFAULT, oracle, resolve
from bn_ref.apps.lenet_torch import lenet
from bn_ref.tolerances import assert_close

WORLD_TIMEOUT_S = 120  # wall clock for a whole world (spawn, import torch, run, save)
COLLECTIVE_TIMEOUT_S = 30  # init_process_group(timeout=...): a hung collective raises
STEPS = 3
HAS_CUDA = torch.cuda.is_available()
needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

# -- cases ----------------------------------------------------------------------------------------
# name -> spec. momentum "default" keeps the convention's. splits: N per rank (sum = global N).

TRAIN_CASES: dict[int, dict[str, dict[str, Any]]] = {
    2: {
        "pt_equal": dict(conv="pytorch", momentum="default", C=3, spatial=(2,), splits=[3, 3], dtype="float64"),
        "pt_empty_rank_cumavg": dict(conv="pytorch", momentum=None, C=3, spatial=(), splits=[5, 0], dtype="float64"),
        "flax_unequal": dict(conv="flax", momentum="default", C=4, spatial=(2,), splits=[1, 4], dtype="float64"),
        "flax_global_n1": dict(conv="flax", momentum="default", C=2, spatial=(), splits=[0, 1], dtype="float64"),
        "pt_noaffine_m03": dict(
            conv="pytorch", momentum=0.3, C=2, spatial=(3,), splits=[4, 2], dtype="float64", affine=False
        ),
        "pt_float32": dict(conv="pytorch", momentum="default", C=3, spatial=(2, 2), splits=[2, 5], dtype="float32"),
        "pt_bfloat16": dict(conv="pytorch", momentum="default", C=2, spatial=(2, 2), splits=[3, 2], dtype="bfloat16"),
        "pt_one_per_rank": dict(conv="pytorch", momentum="default", C=2, spatial=(), splits=[1, 1], dtype="float64"),
    },
    4: {
        "pt_equal4": dict(conv="pytorch", momentum="default", C=3, spatial=(2,), splits=[2, 2, 2, 2], dtype="float64"),
        "pt_uneven4_cumavg": dict(conv="pytorch", momentum=None, C=2, spatial=(), splits=[3, 0, 1, 4], dtype="float64"),
        "flax_uneven4": dict(
            conv="flax", momentum="default", C=3, spatial=(2, 2), splits=[0, 5, 0, 2], dtype="float64"
        ),
    },
}
assert [len(v) for v in TRAIN_CASES.values()] == [8, 3]

# Errors every rank must raise (then the world goes on: later cases prove the group still works).
ERROR_CASES: dict[int, list[str]] = {2: ["mismatch", "bad_input", "empty_global", "single_global"], 4: ["mismatch"]}


def _shape(spec: dict[str, Any], n: int) -> tuple[int, ...]:
    """(N, C, *spatial) for the pytorch convention (axis 1), (N, *spatial, C) for flax (axis -1)."""
    if spec["conv"] == "flax":
        return (n, *spec["spatial"], spec["C"])
    return (n, spec["C"], *spec["spatial"])


def _axis(spec: dict[str, Any]) -> int:
    return -1 if spec["conv"] == "flax" else 1


def _convention(spec: dict[str, Any]):
    momentum = DEFAULT if spec["momentum"] == "default" else spec["momentum"]
    return resolve(spec["conv"], momentum=momentum)


def _make_inputs(world: int, seed: int) -> dict[str, Any]:
    """Global batches for every case and step (float64), and the LeNet data."""
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {}
    for name, spec in TRAIN_CASES[world].items():
        n_total = sum(spec["splits"])
        shape = _shape(spec, n_total)
        steps = []
        for _ in range(STEPS + 1):  # the last batch is for eval
            x = rng.normal(1.5, 2.0, size=shape)
            # Samples drift along the batch axis, so ranks hold different distributions and an
            # equal-weight average of per-rank moments would be visibly wrong (§11).
            x += 0.7 * np.arange(n_total).reshape((n_total,) + (1,) * (len(shape) - 1))
            steps.append((torch.from_numpy(x), torch.from_numpy(rng.normal(size=shape))))
        data[name] = {
            "steps": steps,
            "gamma": torch.from_numpy(rng.uniform(0.5, 1.5, size=spec["C"])),
            "beta": torch.from_numpy(rng.normal(size=spec["C"])),
        }
    data["lenet_x"] = torch.from_numpy(rng.normal(size=(4, 1, 28, 28)))
    data["lenet_dy"] = torch.from_numpy(rng.normal(size=(4, 10)))
    return data


# -- the worker (runs in a subprocess: python this_file --worker JSON) ------------------------------


def _offsets(splits: list[int], rank: int) -> tuple[int, int]:
    start = sum(splits[:rank])
    return start, start + splits[rank]


def _train_case(spec: dict[str, Any], data: dict[str, Any], rank: int, device: str) -> dict[str, Any]:
    dtype = getattr(torch, spec["dtype"])
    affine = spec.get("affine", True)
    kwargs: dict[str, Any] = {}
    if spec["momentum"] != "default":
        kwargs["momentum"] = spec["momentum"]
    m = bnt.SyncBatchNorm(spec["C"], convention=spec["conv"], affine=affine, dtype=dtype, device=device, **kwargs)
    if affine:
        with torch.no_grad():
            m.weight.copy_(data["gamma"])
            m.bias.copy_(data["beta"])
    lo, hi = _offsets(spec["splits"], rank)
    out: dict[str, Any] = {"y": [], "dx": [], "dgamma": [], "dbeta": [], "rm": [], "rv": [], "nbt": []}
    for x_g, dy_g in data["steps"][:STEPS]:
        x = x_g[lo:hi].to(device=device, dtype=dtype).requires_grad_(True)
        y = m(x)
        (y * dy_g[lo:hi].to(device=device, dtype=dtype)).sum().backward()
        out["y"].append(y.detach().cpu())
        out["dx"].append(x.grad.cpu())
        if affine:
            out["dgamma"].append(m.weight.grad.detach().cpu().clone())
            out["dbeta"].append(m.bias.grad.detach().cpu().clone())
            m.weight.grad = None
            m.bias.grad = None
        out["rm"].append(m.running_mean.detach().cpu().clone())
        out["rv"].append(m.running_var.detach().cpu().clone())
        out["nbt"].append(int(m.num_batches_tracked))
    m.eval()
    x_eval = data["steps"][STEPS][0][lo:hi].to(device=device, dtype=dtype)
    out["y_eval"] = m(x_eval).detach().cpu()
    return out


def _error_case(kind: str, rank: int, world: int, device: str) -> dict[str, Any]:
    """Run a call that must fail on every rank; return the error and the buffers after it."""
    c = 3
    if kind == "mismatch":
        m = bnt.SyncBatchNorm(c if rank == 0 else c + 1, dtype=torch.float64, device=device)
        x = torch.randn(2, m.num_features, dtype=torch.float64, device=device)
    elif kind == "bad_input":
        m = bnt.SyncBatchNorm(c, dtype=torch.float64, device=device)
        x = torch.randn(2, c + 2 if rank == 1 else c, dtype=torch.float64, device=device)
    elif kind == "empty_global":
        m = bnt.SyncBatchNorm(c, dtype=torch.float64, device=device)
        x = torch.randn(0, c, 4, dtype=torch.float64, device=device)
    elif kind == "single_global":  # n = 1 on rank 0, empty elsewhere, pytorch: single_value="error"
        m = bnt.SyncBatchNorm(c, dtype=torch.float64, device=device)
        x = torch.randn(1 if rank == 0 else 0, c, dtype=torch.float64, device=device)
    else:  # pragma: no cover
        raise AssertionError(kind)
    try:
        m(x)
        err = None
    except ValueError as exc:
        err = str(exc)
    return {
        "error": err,
        "rm": m.running_mean.cpu().clone(),
        "rv": m.running_var.cpu().clone(),
        "nbt": int(m.num_batches_tracked),
    }


def _lenet_dp(data: dict[str, Any], rank: int, world: int, device: str, splits: list[int]) -> dict[str, Any]:
    """LeNet (torch.nn BN) converted to SyncBatchNorm, one training step on this rank's slice."""
    torch.manual_seed(0)
    net = lenet("native", dtype=torch.float64).to(device)
    net = bnt.convert_sync_batchnorm(net)
    net.train()
    lo, hi = _offsets(splits, rank)
    out = net(data["lenet_x"][lo:hi].to(device))
    (out * data["lenet_dy"][lo:hi].to(device)).sum().backward()
    return {
        "out": out.detach().cpu(),
        "grads": {k: p.grad.detach().cpu().clone() for k, p in net.named_parameters()},
        "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
    }


def _world_of_one(device: str) -> dict[str, Any]:
    """A group of one rank: SyncBatchNorm must be exactly BatchNorm, converted LeNets exactly the originals."""
    res: dict[str, Any] = {"world_size": torch.distributed.get_world_size()}
    for conv in ("pytorch", "flax"):
        ref = bnt.BatchNorm(3, convention=conv, momentum=None, dtype=torch.float32, device=device)
        syn = bnt.SyncBatchNorm(3, convention=conv, momentum=None, dtype=torch.float32, device=device)
        gen = torch.Generator().manual_seed(1)
        rows = []
        for _ in range(STEPS):
            shape = (5, 3, 2) if conv == "pytorch" else (5, 2, 3)
            x = torch.randn(shape, generator=gen).to(device)
            dy = torch.randn(shape, generator=gen).to(device)
            pair = []
            for mod in (ref, syn):
                xi = x.clone().requires_grad_(True)
                y = mod(xi)
                (y * dy).sum().backward()
                pair.append(
                    [y.detach().cpu(), xi.grad.cpu(), mod.weight.grad.cpu().clone(), mod.bias.grad.cpu().clone()]
                    + [t.detach().cpu().clone() for t in mod.state_dict().values()]
                )
                mod.weight.grad = mod.bias.grad = None
            rows.append(pair)
        res[conv] = rows
    for bn in ("ref", "native"):
        torch.manual_seed(0)
        net = lenet(bn).to(device)
        conv_net = bnt.convert_sync_batchnorm(copy.deepcopy(net))
        # bn-ref's own layers with the same weights: what a converted torch.nn model must equal bit for bit
        same = lenet("ref").to(device)
        same.load_state_dict(net.state_dict())
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2)).to(device)
        res[f"lenet_{bn}"] = tuple(m(x).detach().cpu() for m in (net, conv_net, same))
    return res


def _worker(args: dict[str, Any]) -> None:
    import torch.distributed as dist

    rank, world, backend, device = args["rank"], args["world"], args["backend"], args["device"]
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(
        backend,
        init_method=f"file://{args['store']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        results: dict[str, Any] = {}
        if world == 1:
            results["world1"] = _world_of_one(device)
        else:
            data = torch.load(args["inputs"], weights_only=False)
            for kind in ERROR_CASES[world]:  # errors first: the cases after them prove the world still works
                results[f"err_{kind}"] = _error_case(kind, rank, world, device)
            for name, spec in TRAIN_CASES[world].items():
                results[name] = _train_case(spec, data[name], rank, device)
            if world == 2:
                results["lenet"] = _lenet_dp(data, rank, world, device, [3, 1])
        torch.save(results, Path(args["out"]) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- the launcher ---------------------------------------------------------------------------------


def _run_world(world: int, tmp: Path, *, backend: str = "gloo", device: str = "cpu", seed: int = 0) -> list[dict]:
    """Launch ``world`` worker processes, wait (with a timeout) and load what each rank saved."""
    inputs = tmp / "inputs.pt"
    if world > 1:
        torch.save(_make_inputs(world, seed), inputs)
    # The workers import bn_ref from where this process does, installed or not.
    root = str(Path(bnt.__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=pythonpath)
    procs = []
    for rank in range(world):
        args = dict(
            rank=rank,
            world=world,
            backend=backend,
            device=device,
            store=str(tmp / "store"),
            inputs=str(inputs),
            out=str(tmp),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(args)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        pytest.fail(f"world of {world} ({backend}) did not finish within {WORLD_TIMEOUT_S} s (hung collective?)")
    codes = [p.returncode for p in procs]
    if any(codes):
        tail = "\n".join(f"--- rank {r} (exit {c}) ---\n{log[-3000:]}" for r, (c, log) in enumerate(zip(codes, logs)))
        pytest.fail(f"world of {world} ({backend}) failed:\n{tail}")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


# -- the checks in the parent ---------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def _check_train_case(name: str, spec: dict[str, Any], data: dict[str, Any], ranks: list[dict]) -> None:
    conv = _convention(spec)
    axis = _axis(spec)
    dtype = spec["dtype"]
    affine = spec.get("affine", True)
    tdtype = getattr(torch, dtype)

    def rounded(t: torch.Tensor) -> np.ndarray:  # the oracle runs on inputs rounded to the dtype (§8.4)
        return _np(t.to(tdtype))

    gamma = rounded(data["gamma"]) if affine else None
    beta = rounded(data["beta"]) if affine else None
    rm = np.zeros(spec["C"])
    rv = np.ones(spec["C"])
    count = 0
    for k, (x_g, dy_g) in enumerate(data["steps"][:STEPS]):
        x, dy = rounded(x_g), rounded(dy_g)
        kappa = oracle.condition_number(x, convention=conv, axis=axis)
        fwd = oracle.forward(x, gamma, beta, rm, rv, training=True, convention=conv, axis=axis, count=count)
        dx, dgamma, dbeta = oracle.backward(dy, x, gamma, training=True, convention=conv, axis=axis)
        what = f"{name} step {k + 1}"
        y_all = np.concatenate([_np(r[name]["y"][k]) for r in ranks])
        assert_close(y_all, fwd.y, dtype, kappa=kappa, what=f"{what} y")
        dx_all = np.concatenate([_np(r[name]["dx"][k]) for r in ranks])
        assert_close(dx_all, dx, dtype, kappa=kappa, what=f"{what} dx")
        if affine:
            assert_close(
                sum(_np(r[name]["dgamma"][k]) for r in ranks), dgamma, dtype, kappa=kappa, what=f"{what} dgamma"
            )
            assert_close(sum(_np(r[name]["dbeta"][k]) for r in ranks), dbeta, dtype, kappa=kappa, what=f"{what} dbeta")
        for r in ranks:
            assert_close(_np(r[name]["rm"][k]), fwd.running_mean, dtype, kappa=kappa, what=f"{what} running_mean")
            assert_close(_np(r[name]["rv"][k]), fwd.running_var, dtype, kappa=kappa, what=f"{what} running_var")
            assert r[name]["nbt"][k] == k + 1
            # every rank holds bit-identical buffers
            assert torch.equal(r[name]["rm"][k], ranks[0][name]["rm"][k])
            assert torch.equal(r[name]["rv"][k], ranks[0][name]["rv"][k])
        rm, rv, count = fwd.running_mean, fwd.running_var, fwd.count
    x_eval = rounded(data["steps"][STEPS][0])
    ev = oracle.forward(x_eval, gamma, beta, rm, rv, training=False, convention=conv, axis=axis)
    y_eval = np.concatenate([_np(r[name]["y_eval"]) for r in ranks])
    assert_close(
        y_eval, ev.y, dtype, kappa=oracle.condition_number(x_eval, convention=conv, axis=axis), what=f"{name} eval y"
    )
    # each rank's output has its own batch's shape (N = 0 included)
    for r, rk in enumerate(ranks):
        assert tuple(rk[name]["y"][0].shape) == _shape(spec, spec["splits"][r])


def _check_errors(world: int, ranks: list[dict]) -> None:
    for kind in ERROR_CASES[world]:
        for r, rk in enumerate(ranks):
            res = rk[f"err_{kind}"]
            assert res["error"] is not None, f"{kind}: rank {r} raised nothing"
            assert res["nbt"] == 0 and torch.all(res["rm"] == 0) and torch.all(res["rv"] == 1), f"{kind}: state changed"
            msg = res["error"]
            if kind == "mismatch":
                own = 3 if r == 0 else 4
                assert "disagree on the number of features" in msg and f"num_features={own}" in msg, msg
                others = {p: (3 if p == 0 else 4) for p in range(world) if p != r}
                assert str(others) in msg, msg
            elif kind == "bad_input":
                assert ("expected 3 features" in msg) if r == 1 else ("rank(s) [1]" in msg), msg
            elif kind == "empty_global":
                assert "empty batch" in msg and "global n" in msg, msg
            elif kind == "single_global":
                assert "n = 1" in msg and "global n" in msg, msg


def _check_lenet_dp(data: dict[str, Any], ranks: list[dict]) -> None:
    """Data-parallel converted LeNet == single-process LeNet (torch.nn BN) on the global batch."""
    torch.manual_seed(0)
    net = lenet("native", dtype=torch.float64)
    net.train()
    out = net(data["lenet_x"])
    (out * data["lenet_dy"]).sum().backward()
    out_all = np.concatenate([_np(r["lenet"]["out"]) for r in ranks])
    assert_close(out_all, _np(out.detach()), "float64", what="lenet output")
    for k, p in net.named_parameters():
        assert_close(sum(_np(r["lenet"]["grads"][k]) for r in ranks), _np(p.grad), "float64", what=f"lenet grad {k}")
    for k, v in net.state_dict().items():
        for r in ranks:
            if v.is_floating_point():
                assert_close(_np(r["lenet"]["state"][k]), _np(v), "float64", what=f"lenet {k}")
            else:
                assert torch.equal(r["lenet"]["state"][k], v), k


@needs_dist
@pytest.mark.parametrize("world", [2, 4])
def test_multi_process_world_matches_oracle_on_global_batch(world: int) -> None:
    """gloo world of 2/4: y, dx, dgamma, dbeta, running stats and eval == oracle on the global batch."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ranks = _run_world(world, tmp)
        data = torch.load(tmp / "inputs.pt", weights_only=False)
    _check_errors(world, ranks)
    for name, spec in TRAIN_CASES[world].items():
        _check_train_case(name, spec, data[name], ranks)
    if world == 2:
        _check_lenet_dp(data, ranks)


def _check_world_of_one(res: dict[str, Any]) -> None:
    assert res["world_size"] == 1
    for conv in ("pytorch", "flax"):
        assert len(res[conv]) == STEPS
        for ref, syn in res[conv]:
            assert len(ref) == len(syn) == 9  # y, dx, dweight, dbias + 5 state_dict entries
            for a, b in zip(ref, syn):
                assert torch.equal(a, b)
    for bn in ("ref", "native"):
        orig, converted, same = res[f"lenet_{bn}"]
        assert torch.equal(converted, same)
        if bn == "ref":
            assert torch.equal(converted, orig)
        else:  # torch.nn's kernel vs bn-ref's arithmetic: float32 round-off apart
            assert_close(_np(converted), _np(orig), "float32", what="converted native lenet")


@needs_dist
def test_world_of_one_gloo_equals_plain_batchnorm() -> None:
    with tempfile.TemporaryDirectory() as d:
        (res,) = _run_world(1, Path(d))
    _check_world_of_one(res["world1"])


@needs_dist
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available")
def test_world_of_one_nccl_equals_plain_batchnorm() -> None:
    with tempfile.TemporaryDirectory() as d:
        (res,) = _run_world(1, Path(d), backend="nccl", device="cuda")
    _check_world_of_one(res["world1"])


# -- in-process tests (torch.distributed not initialized) ------------------------------------------


def test_not_initialized_equals_plain_batchnorm() -> None:
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    for kwargs in ({}, {"convention": "flax"}, {"momentum": None, "affine": False}):
        ref = bnt.BatchNorm(4, **kwargs)
        syn = bnt.SyncBatchNorm(4, **kwargs)
        assert list(ref.state_dict()) == list(syn.state_dict())
        syn.load_state_dict(ref.state_dict())
        gen = torch.Generator().manual_seed(3)
        for _ in range(STEPS):
            shape = (6, 3, 4) if "convention" in kwargs else (6, 4, 3)
            x = torch.randn(shape, generator=gen)
            xs = [x.clone().requires_grad_(True) for _ in range(2)]
            ys = [ref(xs[0]), syn(xs[1])]
            for y in ys:
                (y * y).sum().backward()
            assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
            for a, b in zip(ref.parameters(), syn.parameters()):
                assert torch.equal(a.grad, b.grad)
            for a, b in zip(ref.state_dict().values(), syn.state_dict().values()):
                assert torch.equal(a, b)
        ref.eval()
        syn.eval()
        assert torch.equal(ref(x), syn(x))


def test_sync_state_dict_loads_both_ways_with_torch_nn() -> None:
    native = nn.BatchNorm2d(5)
    native.running_mean.uniform_()
    syn = bnt.SyncBatchNorm(5)
    syn.load_state_dict(native.state_dict(), strict=True)
    assert torch.equal(syn.running_mean, native.running_mean)
    nn.BatchNorm2d(5).load_state_dict(syn.state_dict(), strict=True)


@pytest.mark.parametrize("bn", ["ref", "native"])
def test_convert_sync_batchnorm_lenet_keeps_weights_and_outputs(bn: str) -> None:
    torch.manual_seed(0)
    net = lenet(bn, dtype=torch.float64)
    net.train()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    net(x)  # move the running statistics and num_batches_tracked off their initial values
    orig = copy.deepcopy(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params_before = dict(net.named_parameters())
    conv = bnt.convert_sync_batchnorm(net)
    syncs = [m for m in conv.modules() if isinstance(m, bnt.SyncBatchNorm)]
    assert len(syncs) == 4
    assert not any(
        isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, bnt.BatchNorm1d, bnt.BatchNorm2d)) for m in conv.modules()
    )
    after = conv.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v) and after[k].dtype == v.dtype and after[k].device == v.device, k
    # the very same Parameter objects (optimizers keep working)
    for k, p in conv.named_parameters():
        assert p is params_before[k], k
    for m in syncs:
        assert m.training and m.convention.name == "pytorch" and m.convention.eps == 1e-5
        assert m.convention.momentum == 0.1 and m.process_group is None
    # in a world of one (here: not initialized) the converted model computes what the original did
    y_orig, y_conv = orig(x), conv(x)
    if bn == "ref":
        assert torch.equal(y_orig, y_conv)
    else:  # torch.nn's kernel vs bn-ref's arithmetic: the same BN, float64 round-off apart
        assert_close(_np(y_conv.detach()), _np(y_orig.detach()), "float64", what="converted lenet")
    orig.eval()
    conv.eval()
    assert_close(_np(conv(x).detach()), _np(orig(x).detach()), "float64", what="converted lenet eval")


def test_convert_maps_torch_options_and_modes() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(3, eps=1e-3, momentum=None, affine=False),
        nn.Sequential(nn.BatchNorm3d(2, momentum=0.25, track_running_stats=False)),
        bnt.BatchNorm2d(4, convention="flax", feature_axis=1),
        bnt.SyncBatchNorm(2, convention="keras"),
        nn.SyncBatchNorm(6),
    )
    model[2].eval()
    out = bnt.convert_sync_batchnorm(model, process_group="pg-sentinel")
    a, b, c, s, t = out[0], out[1][0], out[2], out[3], out[4]
    assert all(isinstance(m, bnt.SyncBatchNorm) for m in (a, b, c, s, t))
    assert a.eps == 1e-3 and a.momentum is None and not a.affine and a.weight is None
    assert b.momentum == 0.25 and not b.track_running_stats and b.running_mean is None
    assert c.convention.name == "flax" and c.feature_axis == 1 and not c.training
    assert s.convention.name == "keras" and s.process_group == "pg-sentinel"
    assert t.num_features == 6 and t.convention.momentum_on == "batch"
    single = bnt.convert_sync_batchnorm(nn.BatchNorm2d(3, dtype=torch.float64))
    assert isinstance(single, bnt.SyncBatchNorm) and single.running_mean.dtype == torch.float64


def test_merge_statistics_is_exact_and_equal_weighting_is_not() -> None:
    """Chan's merge == two-pass statistics of the concatenation; a pmean of moments is not (§11)."""
    rng = np.random.default_rng(5)
    parts = [rng.normal(3.0 * i, 1.0 + i, size=(n, 2)) for i, n in enumerate([1, 7, 0, 4])]
    counts = torch.tensor([len(p) for p in parts])
    means = torch.tensor(np.stack([p.mean(0) if len(p) else np.zeros(2) for p in parts]))
    m2s = torch.tensor(np.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else np.zeros(2) for p in parts]))
    n, mean, var = bnt.merge_statistics(counts, means, m2s)
    full = np.concatenate(parts)
    assert int(n) == len(full)
    assert_close(mean.numpy(), full.mean(0), "float64", what="merged mean")
    assert_close(var.numpy(), full.var(0), "float64", what="merged var")
    nonempty = [p for p in parts if len(p)]
    pmean_mean = np.mean([p.mean(0) for p in nonempty], axis=0)
    assert np.max(np.abs(pmean_mean - full.mean(0))) > 0.1


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(json.loads(sys.argv[2]))
