"""`bn-ref train` / `port` / `convert-checkpoint` edges (issue 13): the argument parser under
random input, resume exact or refused, nothing-to-do, outputs only where asked, Ctrl-C, plots.

Training runs are tiny (PyTorch, 192 images of the shipped real subset, batch 64)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bn_ref.__main__ import main
from bn_ref.apps import data
from bn_ref.apps.cli import UsageError, parse_train_args, train_main
from bn_ref.apps.training import TrainConfig, read_checkpoint, train
from bn_ref.apps.training.plots import curves_figure

SUBSET = Path(__file__).parent / "data" / "fashion-mnist-subset"
SUBSET_SUMS = json.loads((SUBSET / "md5sums.json").read_text())
BASE = ["--backend", "torch", "--device", "cpu", "--batch-size", "64", "--limit-train", "192", "--limit-test", "64",
        "--no-progress", "--data-dir", str(SUBSET), "--seed", "1"]
CLI_WITH_SUBSET_SUMS = (
    "import sys, json, pathlib, bn_ref.apps.data as d;"
    "d.CHECKSUMS = json.loads(pathlib.Path(sys.argv[1], 'md5sums.json').read_text());"
    "from bn_ref.__main__ import main; sys.exit(main(sys.argv[2:]))"
)


@pytest.fixture(autouse=True)
def _subset_checksums(monkeypatch):
    monkeypatch.setattr(data, "CHECKSUMS", SUBSET_SUMS)


def _run(argv: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the parser under random input ---------------------------------------------------------------

FLAGS = ["--backend", "--bn", "--convention", "--epochs", "--lr", "--batch-size", "--device", "--seed", "--out",
         "--data-dir", "--limit-train", "--limit-test", "--nproc", "--devices"]
SWITCHES = ["--resume", "--allow-changed-settings", "--no-progress"]
VALUES = st.one_of(
    st.sampled_from(["torch", "flax", "ref", "native", "none", "pytorch", "flax", "cpu", "auto", "cuda", "0", "1", "2",
                     "-1", "nan", "inf", "1e-3", "3.5", "", " ", "x", "--", "-", "runs/x", "1e400", "99999999999999999999"]),
    st.text(max_size=6),
    st.integers(-5, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
TOKENS = st.lists(st.one_of(st.tuples(st.sampled_from(FLAGS), VALUES), st.sampled_from(SWITCHES).map(lambda s: (s,)),
                            VALUES.map(lambda v: (v,))), max_size=6)


@given(TOKENS)
def test_parser_returns_a_valid_config_or_one_usage_line(tokens):
    argv = [t for group in tokens for t in group]
    cwd = Path.cwd()
    before = sorted(os.listdir(cwd))
    try:
        config = parse_train_args(argv)
    except UsageError as exc:
        assert str(exc).strip()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = train_main(argv)  # the CLI: exit 2, one line, nothing written (it never trains here)
        assert code == 2 and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    else:
        config.validate()
        assert isinstance(config, TrainConfig) and config.epochs >= 1 and config.batch_size >= 2
    assert sorted(os.listdir(cwd)) == before


def test_parser_error_lines(capsys):
    for argv, needle in [(["--epochs", "0"], "--epochs"), (["--lr", "nan"], "--lr"), (["--seed", "-1"], "--seed"),
                         (["--batch-size", "x"], "--batch-size"), (["--allow-changed-settings"], "--resume"),
                         (["--out", ""], "--out"), (["--wat"], "--wat")]:
        assert train_main(argv) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and needle in err[0], (argv, err)


# -- resume: exact or refused ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    """A finished 1-epoch run (module-scoped: each test copies it)."""
    out = tmp_path_factory.mktemp("base") / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "CHECKSUMS", SUBSET_SUMS)
    try:
        assert main(["train", *BASE, "--epochs", "1", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_changed_settings_are_refused_with_the_list(one_epoch_run, tmp_path, capsys):
    out = _copy_run(one_epoch_run, tmp_path / "run")
    before = _snapshot(out)
    code, err, _ = _run(["train", *BASE, "--epochs", "2", "--out", str(out), "--resume",
                         "--lr", "0.5", "--batch-size", "32", "--convention", "d2l"], capsys)
    assert code == 2 and len(err) == 1, err
    for needle in ("lr: 1.0 in the checkpoint, 0.5 now", "batch_size: 64 in the checkpoint, 32 now",
                   "convention: 'pytorch' in the checkpoint, 'd2l' now", "--allow-changed-settings"):
        assert needle in err[0], err[0]
    code, err, _ = _run(["train", *BASE, "--epochs", "2", "--out", str(out), "--resume", "--limit-train", "128",
                         "--seed", "2"], capsys)
    assert code == 2 and "limit_train: 192 in the checkpoint, 128 now" in err[0] and "seed: 1" in err[0], err
    # a changed model is refused even with the flag
    code, err, _ = _run(["train", *BASE, "--epochs", "2", "--out", str(out), "--resume", "--bn", "none",
                         "--allow-changed-settings"], capsys)
    assert code == 2 and "cannot continue with another model" in err[0] and "bn: 'ref'" in err[0], err
    assert _snapshot(out) == before


def test_nothing_to_do_says_so_and_changes_nothing(one_epoch_run, tmp_path, capsys):
    out = _copy_run(one_epoch_run, tmp_path / "run")
    before = _snapshot(out)
    code, err, stdout = _run(["train", *BASE, "--epochs", "1", "--out", str(out), "--resume"], capsys)
    assert code == 0 and not err
    assert "nothing to do" in stdout and "already holds 1 epoch" in stdout, stdout
    assert _snapshot(out) == before


def test_accepted_changes_are_recorded_per_epoch(one_epoch_run, tmp_path, capsys):
    out = _copy_run(one_epoch_run, tmp_path / "run")
    code, err, stdout = _run(["train", *BASE, "--epochs", "2", "--out", str(out), "--resume", "--lr", "0.5",
                              "--allow-changed-settings"], capsys)
    assert code == 0, err
    assert "resuming with changed settings (from epoch 2): lr: 1.0 in the checkpoint, 0.5 now" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    segs = metrics["segments"]
    assert [s["first_epoch"] for s in segs] == [1, 2]
    assert segs[0]["settings"]["lr"] == 1.0 and segs[1]["settings"]["lr"] == 0.5
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    ckpt = read_checkpoint(out / "checkpoint.npz")
    assert ckpt.epoch == 2 and ckpt.header["segments"] == segs and ckpt.header["settings"]["lr"] == 0.5
    assert ckpt.header["settings"]["data"] == {n: SUBSET_SUMS[n] for n in sorted(data.FILES.values())}


def test_run_prints_the_data_files_and_checksums(one_epoch_run, tmp_path, capsys):
    out = _copy_run(one_epoch_run, tmp_path / "run")
    code, _, stdout = _run(["train", *BASE, "--epochs", "1", "--out", str(out), "--resume"], capsys)
    line = next(ln for ln in stdout.splitlines() if ln.startswith("data: "))
    assert str(SUBSET) in line and "MD5 checksums of the decompressed content match" in line
    assert all(f"{n}.gz" in line for n in data.FILES.values())


def test_named_data_folder_without_files_is_exit_2(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(data, "DEBIAN_DIR", SUBSET)  # data elsewhere must not be used instead
    code, err, _ = _run(["train", "--data-dir", str(empty), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and str(empty) in err[0] and "missing train-images-idx3-ubyte" in err[0], err
    monkeypatch.setenv("BN_REF_DATA", str(tmp_path / "nonexistent"))
    code, err, _ = _run(["train", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "BN_REF_DATA" in err[0] and "nonexistent" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_resume_without_checkpoint_and_with_a_truncated_one(tmp_path, one_epoch_run, capsys):
    code, err, _ = _run(["train", *BASE, "--resume", "--out", str(tmp_path / "none")], capsys)
    assert code == 2 and len(err) == 1 and "no checkpoint" in err[0]
    out = _copy_run(one_epoch_run, tmp_path / "run")
    raw = (out / "checkpoint.npz").read_bytes()
    (out / "checkpoint.npz").write_bytes(raw[: len(raw) // 2])
    before = _snapshot(out)
    code, err, _ = _run(["train", *BASE, "--epochs", "2", "--resume", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and str(out / "checkpoint.npz") in err[0] and "corrupt or truncated" in err[0], err
    assert _snapshot(out) == before
    assert not (tmp_path / "none").exists()


# -- outputs only where asked; port; convert -------------------------------------------------------


def test_port_and_convert_create_no_folders(one_epoch_run, tmp_path, capsys):
    ckpt = one_epoch_run / "checkpoint.npz"
    for target in (tmp_path / "missing" / "p.npz", Path("/nonexistent_bn_ref_dir") / "p.npz"):
        code, err, _ = _run(["port", "--from", "torch", str(ckpt), "--to", "flax", str(target)], capsys)
        assert code == 2 and len(err) == 1 and "does not exist" in err[0], err
        assert not target.parent.exists()
    code, err, _ = _run(["port", "--from", "flax", str(ckpt), "--to", "torch", str(tmp_path / "x.pt")], capsys)
    assert code == 2 and "written by a torch run" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_port_round_trip_from_a_checkpoint(one_epoch_run, tmp_path, capsys):
    import torch

    from bn_ref.apps import port

    ckpt = read_checkpoint(one_epoch_run / "checkpoint.npz")
    flax_file, torch_file = tmp_path / "lenet-flax.npz", tmp_path / "back.pt"
    assert _run(["port", "--from", "torch", str(one_epoch_run / "checkpoint.npz"), "--to", "flax", str(flax_file)], capsys)[0] == 0
    with np.load(flax_file, allow_pickle=False) as z:
        flat = {k: z[k] for k in z.files}
    assert flat["params/conv1/kernel"].shape == (5, 5, 1, 6) and int(flat["batch_stats/bn1/count"]) == 3  # 192 / 64 steps
    expected = port.flatten_variables(port.torch_to_flax({k[6:]: v for k, v in ckpt.arrays.items() if k.startswith("model/")}))
    assert flat.keys() == expected.keys() and all(np.array_equal(flat[k], expected[k]) for k in flat)
    assert _run(["port", "--from", "flax", str(flax_file), "--to", "torch", str(torch_file)], capsys)[0] == 0
    back = torch.load(torch_file, weights_only=True)
    for key, value in ckpt.arrays.items():
        if key.startswith("model/"):
            np.testing.assert_array_equal(back[key[6:]].numpy(), value, err_msg=key)


def test_train_creates_only_the_out_folder(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    assert _run(["train", *BASE, "--epochs", "1", "--out", str(out)], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "curves.png", "metrics.json"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_dir()) == ["a", "a/b", "a/b/run"]


def test_convert_legacy_checkpoint_then_resume_matches_uninterrupted(one_epoch_run, tmp_path, capsys):
    """A 0.1-style pickle (built here from a current run) converts with --trust-pickle, and resuming
    from it gives bit for bit the run that never stopped."""
    import torch

    ckpt = read_checkpoint(one_epoch_run / "checkpoint.npz")
    legacy = {
        "config": {k: v for k, v in ckpt.header["config"].items() if k != "allow_changed_settings"},
        "epoch": 1,
        "epochs": ckpt.header["epochs"],
        "state": {
            "model": {k[6:]: torch.from_numpy(v) for k, v in ckpt.arrays.items() if k.startswith("model/")},
            "opt": {"state": {}, "param_groups": []},
        },
    }
    old = tmp_path / "checkpoint.pkl"
    old.write_bytes(pickle.dumps(legacy))
    out = tmp_path / "resumed"
    out.mkdir()
    code, err, _ = _run(["convert-checkpoint", str(old), str(out / "checkpoint.npz")], capsys)
    assert code == 2 and "--trust-pickle" in err[0] and not (out / "checkpoint.npz").exists()
    code, err, stdout = _run(["convert-checkpoint", "--trust-pickle", str(old), str(out / "checkpoint.npz")], capsys)
    assert code == 0 and "epoch 1" in stdout, err
    converted = read_checkpoint(out / "checkpoint.npz")
    assert converted.arrays.keys() == {k for k in ckpt.arrays}
    code, err, stdout = _run(["train", *BASE, "--epochs", "2", "--resume", "--out", str(out)], capsys)
    assert code == 0, err
    assert "does not record which data" in stdout
    full = tmp_path / "full"
    assert _run(["train", *BASE, "--epochs", "2", "--out", str(full)], capsys)[0] == 0
    a, b = read_checkpoint(full / "checkpoint.npz").arrays, read_checkpoint(out / "checkpoint.npz").arrays
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# -- Ctrl-C and plots ------------------------------------------------------------------------------


def test_ctrl_c_names_the_last_saved_epoch_exit_130(tmp_path):
    out = tmp_path / "run"
    args = ["train", *BASE, "--limit-train", "600", "--epochs", "500", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", CLI_WITH_SUBSET_SUMS, str(SUBSET), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if line.startswith("epoch   2") or not line:
                break
        assert any(ln.startswith("epoch   2") for ln in seen), seen
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, err
    assert len(lines) == 1 and "interrupted; the last saved epoch is" in lines[0] and "--resume" in lines[0], err
    saved = int(lines[0].split("the last saved epoch is ")[1].split()[0])
    assert saved >= 1 and read_checkpoint(out / "checkpoint.npz").epoch == saved
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("n", [1, 3, 40])
def test_plot_is_readable_for_one_epoch_and_many(n):
    import matplotlib.pyplot as plt

    rows = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.5 + e / (4 * n), "test_acc": 0.4 + e / (4 * n)}
            for e in range(1, n + 1)]
    fig = curves_figure(rows, "LeNet-BN (torch bn=ref convention=pytorch on cpu)")
    try:
        ax = fig.axes[0]
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() and fig.axes[1].get_ylabel() == "accuracy"
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        if n <= 10:
            assert ticks == list(range(1, n + 1)), ticks  # every epoch, nothing between
        else:
            assert 3 <= len(ticks) <= 11 and lo < 1 and hi > n, (ticks, lo, hi)
        assert fig.axes[1].get_ylim() == (0.0, 1.0)
    finally:
        plt.close(fig)


def test_device_names_in_titles():
    import jax
    import torch

    from bn_ref.apps.training import flax_backend, torch_backend

    assert flax_backend.device_label(jax.devices("cpu")[0]) == "cpu"
    assert flax_backend.device_label(SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")) == "gpu (NVIDIA H200)"
    assert torch_backend.device_label(torch.device("cpu")) == "cpu"
    config = TrainConfig(backend="flax", device="cpu", seed=0, limit_train=2, limit_test=2)
    assert "cpu:cpu" not in flax_backend.Trainer(config).device_name


def test_train_api_raises_documented_errors(tmp_path):
    from bn_ref.apps.training import CheckpointError, ResumeError

    config = TrainConfig(backend="torch", device="cpu", out=str(tmp_path / "r"), data_dir=str(SUBSET), resume=True,
                         limit_train=64, limit_test=64, batch_size=64, epochs=1, progress=False)
    with pytest.raises(ResumeError, match="no checkpoint"):
        train(config, log=lambda line: None)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(config, log=lambda line: None)


def test_ctrl_c_before_the_first_epoch_names_the_checkpoint_epoch(one_epoch_run, tmp_path, monkeypatch, capsys):
    from bn_ref.apps.training import loop

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "make_trainer", interrupted)
    out = _copy_run(one_epoch_run, tmp_path / "run")
    before = _snapshot(out)
    code, err, _ = _run(["train", *BASE, "--epochs", "3", "--resume", "--out", str(out)], capsys)
    assert code == 130 and len(err) == 1 and "the last saved epoch is 1" in err[0], err
    code, err, _ = _run(["train", *BASE, "--epochs", "3", "--out", str(tmp_path / "fresh")], capsys)
    assert code == 130 and len(err) == 1 and "before any epoch was saved" in err[0], err
    assert _snapshot(out) == before and not (tmp_path / "fresh").exists()
