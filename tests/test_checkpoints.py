"""The training checkpoint format (bn_ref.apps.training.checkpoint): round trips, NumPy can read
it, random corruptions give one line naming the file and change nothing, and no file -- a 0.1
pickle, a pickle crafted to run code, a torch.save of such an object, an object array -- is ever
unpickled by `train --resume`, `port` or the reader."""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bn_ref.__main__ import main
from bn_ref.apps.training.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    decode_checkpoint,
    encode_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from bn_ref.apps.training.fileio import OutputError

_RNG = np.random.default_rng(0)
ARRAYS = {
    "model/0.weight": _RNG.normal(size=(6, 1, 5, 5)).astype(np.float32),
    "model/1.num_batches_tracked": np.array(7, np.int64),
    "params/bn1/count": np.array(3, np.int32),
    "opt/state/0/momentum_buffer": _RNG.normal(size=(4,)),
    "mask": np.array([True, False, True]),
}
SETTINGS = {"backend": "torch", "bn": "ref", "lr": 1.0, "data": {"x": "0" * 32}}
HEADER = {
    "config": {"backend": "torch", "bn": "ref", "epochs": 3},
    "settings": SETTINGS,
    "segments": [{"first_epoch": 1, "settings": SETTINGS}],
    "epoch": 2,
    "epochs": [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.625}],
    "rng": {"seed": 3, "next_epoch": 3},
    "framework": {"backend": "torch"},
}
GOOD = encode_checkpoint(HEADER, ARRAYS)


def _same_as_good(ckpt) -> None:
    assert ckpt.header["epoch"] == 2 and ckpt.header["epochs"] == HEADER["epochs"]
    assert ckpt.header["settings"] == SETTINGS and ckpt.header["format"] == FORMAT and ckpt.header["version"] == VERSION
    assert ckpt.arrays.keys() == ARRAYS.keys()
    for name, a in ARRAYS.items():
        assert ckpt.arrays[name].dtype == a.dtype and ckpt.arrays[name].shape == a.shape, name
        np.testing.assert_array_equal(ckpt.arrays[name], a, err_msg=name)


def test_round_trip_numpy_reads_it_and_bytes_are_reproducible(tmp_path):
    path = tmp_path / "checkpoint.npz"
    write_checkpoint(path, HEADER, ARRAYS)
    _same_as_good(read_checkpoint(path))
    assert path.read_bytes() == GOOD == encode_checkpoint(HEADER, ARRAYS)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temporary left behind
    with np.load(path, allow_pickle=False) as z:  # the documented framework-neutral reading
        np.testing.assert_array_equal(z["model/0.weight"], ARRAYS["model/0.weight"])
        assert json.loads(z["header.json"])["epoch"] == 2


def test_writer_refuses_object_arrays_and_missing_folders(tmp_path):
    with pytest.raises(TypeError, match="not numeric"):
        encode_checkpoint(HEADER, {"x": np.array([object()], dtype=object)})
    with pytest.raises(OutputError, match="does not exist"):
        write_checkpoint(tmp_path / "missing" / "c.npz", HEADER, ARRAYS)
    assert list(tmp_path.iterdir()) == []


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return out.getvalue()


def _members(raw: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _with_header(**changes) -> bytes:
    members = _members(GOOD)
    header = json.loads(members["header.json"])
    for key, value in changes.items():
        if value is _DROP:
            header.pop(key)
        else:
            header[key] = value
    members["header.json"] = json.dumps(header).encode()
    return _zip(members)


_DROP = object()
_HEADER_DAMAGE = {
    "foreign format": lambda: _with_header(format="something-else"),
    "future version": lambda: _with_header(version=VERSION + 1),
    "string version": lambda: _with_header(version="1"),
    "no config": lambda: _with_header(config=_DROP),
    "epoch mismatch": lambda: _with_header(epoch=5),
    "shape lie": lambda: _with_header(arrays={**json.loads(_members(GOOD)["header.json"])["arrays"],
                                             "mask": {"dtype": "|b1", "shape": [4]}}),
    "object dtype": lambda: _with_header(arrays={**json.loads(_members(GOOD)["header.json"])["arrays"],
                                                "mask": {"dtype": "|O", "shape": [3]}}),
    "header not json": lambda: _zip({**_members(GOOD), "header.json": b"{not json"}),
    "header not an object": lambda: _zip({**_members(GOOD), "header.json": b"[1, 2]"}),
    "extra member": lambda: _zip({**_members(GOOD), "evil.pkl": pickle.dumps(1)}),
    "missing member": lambda: _zip({k: v for k, v in _members(GOOD).items() if k != "mask.npy"}),
    "no header": lambda: _zip({k: v for k, v in _members(GOOD).items() if k != "header.json"}),
    "empty": lambda: b"",
    "pickle": lambda: pickle.dumps({"config": {}}),
    "text": lambda: b"hello",
}
EXPECTED_WORDS = {"future version": "newer bn-ref", "pickle": "convert-checkpoint --trust-pickle", "foreign format": "not a bn-ref checkpoint"}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _assert_one_line_error(path: Path, raw: bytes, *, may_succeed: bool) -> None:
    """Read ``raw`` from ``path`` next to another file: CheckpointError naming the file (or, for
    damage only to ZIP metadata the format does not use, exactly the original content), and no
    file changed."""
    path.write_bytes(raw)
    (path.parent / "metrics.json").write_text('{"keep": true}')
    before = _snapshot(path.parent)
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(str(path)), msg
    else:
        assert may_succeed, "a damaged checkpoint was read without error"
        _same_as_good(ckpt)
    assert _snapshot(path.parent) == before


@pytest.mark.parametrize("damage", sorted(_HEADER_DAMAGE))
def test_wrong_header_or_foreign_file_is_one_line(tmp_path, damage):
    path = tmp_path / "checkpoint.npz"
    _assert_one_line_error(path, _HEADER_DAMAGE[damage](), may_succeed=False)
    if damage in EXPECTED_WORDS:
        with pytest.raises(CheckpointError, match=EXPECTED_WORDS[damage]):
            read_checkpoint(path)


def test_damage_table_is_complete():
    assert len(_HEADER_DAMAGE) == 15


@given(
    kind=st.sampled_from(["truncate", "flip"]),
    cut=st.integers(0, len(GOOD) - 1),
    flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 7)), min_size=1, max_size=3),
)
def test_random_corruption_is_one_line_and_changes_nothing(kind, cut, flips):
    if kind == "truncate":
        raw = GOOD[:cut]
    else:
        buf = bytearray(GOOD)
        for pos, bit in flips:
            buf[pos] ^= 1 << bit
        raw = bytes(buf)
    with tempfile.TemporaryDirectory() as tmp:
        # a flip that lands in ZIP metadata the reader does not use (a timestamp) is harmless;
        # any flip in the header or the arrays is caught by the ZIP's CRC-32 or the checks
        _assert_one_line_error(Path(tmp) / "checkpoint.npz", raw, may_succeed=kind == "flip")


# -- nothing is ever unpickled ---------------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs ``exec``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _sanity_check_payload_runs_code(tmp_path: Path) -> bytes:
    """The payload does run code when unpickled (checked once, in a file the tests never use)."""
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_RunsCode(probe)))
    assert probe.read_text() == "code ran"
    probe.unlink()
    return pickle.dumps({"config": {"backend": "torch"}, "epoch": 1, "state": _RunsCode(tmp_path / "marker")})


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


def test_crafted_pickle_is_refused_without_running_it(tmp_path, capsys):
    payload = _sanity_check_payload_runs_code(tmp_path)
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(payload)
    code, err = _run(["train", "--resume", "--out", str(out), "--epochs", "2"], capsys)
    assert code == 2 and len(err) == 1 and "convert-checkpoint --trust-pickle" in err[0], err
    # the 0.1 file name: refused with the conversion hint
    (out / "checkpoint.npz").unlink()
    (out / "checkpoint.pkl").write_bytes(payload)
    code, err = _run(["train", "--resume", "--out", str(out), "--epochs", "2"], capsys)
    assert code == 2 and len(err) == 1 and "checkpoint.pkl" in err[0] and "convert-checkpoint" in err[0], err
    for src in ("torch", "flax"):
        code, err = _run(["port", "--from", src, str(out / "checkpoint.pkl"), "--to", "flax" if src == "torch" else "torch",
                          str(tmp_path / f"ported-{src}")], capsys)
        assert code == 2 and len(err) == 1 and "pickle" in err[0], err
    code, err = _run(["convert-checkpoint", str(out / "checkpoint.pkl"), str(tmp_path / "new.npz")], capsys)
    assert code == 2 and len(err) == 1 and "--trust-pickle" in err[0], err
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pkl"]


def test_pickles_hidden_inside_archives_are_not_run(tmp_path, capsys):
    import torch

    _sanity_check_payload_runs_code(tmp_path)
    marker = tmp_path / "marker"
    # 1. a checkpoint whose array member is an object array (pickled inside the .npy)
    obj = np.empty(1, dtype=object)
    obj[0] = _RunsCode(marker)
    npy = io.BytesIO()
    np.save(npy, obj, allow_pickle=True)
    members = _members(GOOD)
    members["mask.npy"] = npy.getvalue()
    evil_ckpt = tmp_path / "evil.npz"
    evil_ckpt.write_bytes(_zip(members))
    with pytest.raises(CheckpointError, match="mask"):
        read_checkpoint(evil_ckpt)
    # 2. a torch.save file holding the object, and a plain .npz with an object array
    torch_file = tmp_path / "evil.pt"
    torch.save({"0.weight": _RunsCode(marker)}, torch_file)
    npz_file = tmp_path / "evil-plain.npz"
    np.savez(npz_file, x=obj)
    for src, path in (("torch", evil_ckpt), ("torch", torch_file), ("flax", npz_file), ("torch", npz_file)):
        dst = "flax" if src == "torch" else "torch"
        code, err = _run(["port", "--from", src, str(path), "--to", dst, str(tmp_path / "out.bin")], capsys)
        assert code == 2 and len(err) == 1 and str(path) in err[0], (path, err)
    assert not marker.exists() and not (tmp_path / "out.bin").exists()


def test_decode_names_the_source():
    with pytest.raises(CheckpointError, match=r"^<bytes>: empty file"):
        decode_checkpoint(b"")


def test_write_is_atomic_under_failure(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous checkpoint intact and no temporary file."""
    path = tmp_path / "checkpoint.npz"
    write_checkpoint(path, HEADER, ARRAYS)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(path, {**HEADER, "epoch": 3, "epochs": HEADER["epochs"] + [{"epoch": 3}]}, ARRAYS)
    monkeypatch.undo()
    _same_as_good(read_checkpoint(path))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]
