"""Fashion-MNIST loading: the shipped real subset, the search order, corrupt/truncated/missing
files, the verified download (served from local files: no network in tests), and the full data
when Debian's package is installed (CI installs it)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bn_ref.apps import data

SUBSET = Path(__file__).parent / "data" / "fashion-mnist-subset"
SUBSET_SUMS = json.loads((SUBSET / "md5sums.json").read_text())


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No Debian folder, an empty cache, no BN_REF_DATA: only what a test puts in place."""
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BN_REF_DATA", raising=False)
    return tmp_path


def _copy_subset(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in data.FILES.values():
        shutil.copy(SUBSET / f"{name}.gz", dest / f"{name}.gz")
    return dest


def _decompressed(name: str) -> bytes:
    return gzip.decompress((SUBSET / f"{name}.gz").read_bytes())


def test_subset_loads_with_its_checksums(isolated):
    ds = data.load_fashion_mnist(SUBSET, download_missing=False, checksums=SUBSET_SUMS)
    assert ds.train_images.shape == (1000, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (500, 28, 28) and ds.test_labels.shape == (500,)
    assert set(np.unique(ds.train_labels)) == set(range(10))
    # Independent decode of the IDX layout: 16-byte header, then row-major pixels.
    raw = _decompressed("train-images-idx3-ubyte")
    np.testing.assert_array_equal(ds.train_images[3].ravel(), np.frombuffer(raw, np.uint8, 784, 16 + 3 * 784))
    floats = data.to_float(ds.test_images)
    assert floats.dtype == np.float32 and floats.max() <= 1.0 and floats.min() >= 0.0
    assert floats.max() == 1.0  # 255 maps to exactly 1


def test_checksum_is_over_decompressed_bytes(isolated, tmp_path):
    folder = _copy_subset(tmp_path / "d")
    # Re-compress with another header (mtime, level): compressed bytes change, content does not.
    for name in data.FILES.values():
        raw = _decompressed(name)
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw, compresslevel=1, mtime=12345))
    ds = data.load_fashion_mnist(folder, download_missing=False, checksums=SUBSET_SUMS)
    assert ds.train_labels.shape == (1000,)
    # Plain (uncompressed) files are accepted too.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in data.FILES.values():
        (plain / name).write_bytes(_decompressed(name))
    ds2 = data.load_fashion_mnist(plain, download_missing=False, checksums=SUBSET_SUMS)
    np.testing.assert_array_equal(ds.test_images, ds2.test_images)


def test_corrupt_file_names_the_file(isolated, tmp_path):
    folder = _copy_subset(tmp_path / "d")
    raw = bytearray(_decompressed("t10k-labels-idx1-ubyte"))
    raw[100] ^= 0xFF
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.*MD5"):
        data.load_fashion_mnist(folder, download_missing=False, checksums=SUBSET_SUMS)


def test_truncated_gzip_names_the_file(isolated, tmp_path):
    folder = _copy_subset(tmp_path / "d")
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.*truncated or corrupt"):
        data.load_fashion_mnist(folder, download_missing=False, checksums=SUBSET_SUMS)


def test_truncated_idx_without_checksum_is_caught_by_the_header(isolated, tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_decompressed("train-images-idx3-ubyte")[:-10])
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(path)


def test_missing_data_offline_names_package_and_cache(isolated):
    with pytest.raises(data.DataError) as info:
        data.load_fashion_mnist(download_missing=False)
    msg = str(info.value)
    assert data.DEBIAN_PACKAGE in msg and str(data.cache_dir()) in msg


def test_search_order(isolated, monkeypatch, tmp_path):
    debian = _copy_subset(tmp_path / "debian")
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    explicit = _copy_subset(tmp_path / "explicit")
    assert data.find_data_dir(explicit) == explicit
    monkeypatch.setenv("BN_REF_DATA", str(explicit))
    assert data.find_data_dir() == explicit
    monkeypatch.delenv("BN_REF_DATA")
    assert data.find_data_dir() == debian
    cache = _copy_subset(data.cache_dir())
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "gone")
    assert data.find_data_dir() == cache
    shutil.rmtree(cache)
    tv_root = tmp_path / "tv"
    raw = _copy_subset(tv_root / "FashionMNIST" / "raw")
    assert data.find_data_dir(tv_root) == raw
    assert data.candidate_dirs(tv_root) == [tv_root, raw]  # a named folder is the only source
    assert data.candidate_dirs() == [tmp_path / "gone", data.cache_dir()]


def test_named_folder_is_the_only_source(isolated, monkeypatch, tmp_path):
    """--data-dir / BN_REF_DATA lacking files is an error naming the folder and the missing files,
    even when Debian's folder and the cache hold the data (no silent fallback, no download)."""
    monkeypatch.setattr(data, "DEBIAN_DIR", _copy_subset(tmp_path / "debian"))
    _copy_subset(data.cache_dir())
    partial = _copy_subset(tmp_path / "partial")
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    (partial / "train-images-idx3-ubyte.gz").unlink()
    before = sorted(p.name for p in partial.iterdir())
    with pytest.raises(data.DataError) as info:
        data.load_fashion_mnist(partial, checksums=SUBSET_SUMS)
    msg = str(info.value)
    assert str(partial) in msg and "--data-dir" in msg and "\n" not in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "train-labels-idx1-ubyte" not in msg
    assert sorted(p.name for p in partial.iterdir()) == before  # nothing downloaded into it
    monkeypatch.setenv("BN_REF_DATA", str(tmp_path / "nonexistent"))
    with pytest.raises(data.DataError, match=r"BN_REF_DATA .*nonexistent: no such folder"):
        data.load_fashion_mnist(checksums=SUBSET_SUMS)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("BN_REF_DATA", str(empty))
    with pytest.raises(data.DataError, match="BN_REF_DATA .*empty: missing train-images-idx3-ubyte, train-labels"):
        data.load_fashion_mnist(checksums=SUBSET_SUMS)
    monkeypatch.setenv("BN_REF_DATA", str(partial))  # --data-dir wins over BN_REF_DATA
    ds = data.load_fashion_mnist(SUBSET, checksums=SUBSET_SUMS)
    assert ds.source == SUBSET


def test_dataset_records_files_and_checksums(isolated):
    ds = data.load_fashion_mnist(SUBSET, download_missing=False, checksums=SUBSET_SUMS)
    assert [p.name for p in ds.files] == [f"{n}.gz" for n in data.FILES.values()]
    for name in data.FILES.values():  # the recorded MD5 is the decompressed content's, computed here independently
        assert ds.md5[name] == hashlib.md5(_decompressed(name)).hexdigest() == SUBSET_SUMS[name]
    assert ds.verified
    line = ds.describe()
    assert "\n" not in line and str(SUBSET) in line and "MD5 checksums" in line and "match" in line
    assert all(f"{n}.gz" in line for n in data.FILES.values())
    unchecked = data.load_fashion_mnist(SUBSET, download_missing=False, checksums=SUBSET_SUMS, verify=False)
    assert not unchecked.verified and "NOT verified" in unchecked.describe()


class _Response(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_verifies_then_renames(isolated, monkeypatch):
    served = []

    def fake_urlopen(url, timeout=None):
        name = url.rsplit("/", 1)[-1]
        served.append(name)
        return _Response((SUBSET / name).read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    ds = data.load_fashion_mnist(checksums=SUBSET_SUMS)  # no folder named: the standard places, then download
    assert sorted(served) == sorted(f"{n}.gz" for n in data.FILES.values())
    assert ds.source == data.cache_dir()
    assert sorted(p.name for p in data.cache_dir().iterdir()) == sorted(f"{n}.gz" for n in data.FILES.values())


def test_download_with_bad_checksum_leaves_nothing(isolated, monkeypatch):
    def fake_urlopen(url, timeout=None):
        name = url.rsplit("/", 1)[-1]
        raw = bytearray(gzip.decompress((SUBSET / name).read_bytes()))
        raw[-1] ^= 1
        return _Response(gzip.compress(bytes(raw)))

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(data.DataError, match="MD5"):
        data.load_fashion_mnist(checksums=SUBSET_SUMS)
    assert list(data.cache_dir().iterdir()) == []


def test_download_failure_offline_names_package(isolated, monkeypatch):
    def offline(url, timeout=None):
        raise OSError("network unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(data.DataError, match=data.DEBIAN_PACKAGE):
        data.load_fashion_mnist()


@pytest.mark.skipif(not data.DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_full_dataset_from_debian_matches_official_checksums():
    ds = data.load_fashion_mnist(data.DEBIAN_DIR, download_missing=False)
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_images.shape == (10000, 28, 28)
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    raw = gzip.decompress((data.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == data.CHECKSUMS["t10k-labels-idx1-ubyte"]
