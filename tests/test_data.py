"""Data: real MNIST verified; missing, truncated and corrupt files give clear errors; any IDX
dataset with MNIST's layout loads."""

import gzip
import shutil
import struct

import numpy as np
import pytest

import bnlab
from bnlab.lab import data


@pytest.fixture(scope="module")
def mnist_dir():
    return data.resolve_data_dir(download=False)


def test_real_mnist_is_found_verified_and_shaped(mnist_dir):
    ds = data.load("mnist")
    assert ds.train_x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert ds.train_x.dtype.is_floating_point and 0 <= ds.train_x.min() and ds.train_x.max() <= 1
    assert ds.train_y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _write_idx(path, array):
    dims = array.shape
    header = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_idx_dataset(d, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    _write_idx(d / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(d / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train))
    _write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(d / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test))


def test_any_idx_dataset_with_the_layout_loads(tmp_path):
    _fake_idx_dataset(tmp_path)
    ds = data.load("idx", tmp_path)
    assert ds.train_x.shape == (20, 784) and ds.test_y.shape == (10,)


def test_missing_file_names_the_file(tmp_path):
    _fake_idx_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(bnlab.DataError, match="t10k-labels-idx1-ubyte"):
        data.load("idx", tmp_path)


def test_truncated_file_is_detected(tmp_path):
    _fake_idx_dataset(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(bnlab.DataError, match="truncated"):
        data.load("idx", tmp_path)


def test_corrupt_gzip_is_detected(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"abcd")[:-6] + b"junk!!")
    with pytest.raises(bnlab.DataError, match="cannot read"):
        data.read_idx(p)


def test_mnist_checksum_catches_a_flipped_byte(tmp_path, mnist_dir):
    for stem in data.FILES.values():
        src = data._find(mnist_dir, stem)
        shutil.copy(src, tmp_path / src.name)
    name = "t10k-labels-idx1-ubyte"
    src = data._find(tmp_path, name)
    raw = bytearray(gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes())
    raw[100] = (raw[100] + 1) % 10                       # still a valid IDX file, wrong content
    src.unlink()
    (tmp_path / name).write_bytes(bytes(raw))
    with pytest.raises(bnlab.DataError, match=f"{name} is corrupt: SHA-256"):
        data.load("mnist", tmp_path)


def test_not_an_idx_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"hello world")
    with pytest.raises(bnlab.DataError, match="magic"):
        data.read_idx(p)


def test_bad_directory_and_env(tmp_path, monkeypatch):
    with pytest.raises(bnlab.DataError, match="lacks"):
        data.resolve_data_dir(tmp_path)
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path))
    with pytest.raises(bnlab.DataError, match="BNLAB_DATA"):
        data.resolve_data_dir()
    with pytest.raises(bnlab.DataError, match="data.path"):
        data.load("idx")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(data.os, "fsync", boom)
    with pytest.raises(OSError):
        data.atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
