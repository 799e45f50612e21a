"""Readers of the on-disk formats :func:`earlyprop.data.load_dataset` takes: MNIST-style idx files (plain,
.gz or split into .gz.partNN pieces), the CIFAR-10 binary version and numeric .npz archives. Each returns a
:class:`earlyprop.data.Dataset` and reports every problem with the files as a one-line ``DataError``.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from earlyprop.data import DataError, Dataset, validate_arrays

_NO_DOWNLOAD = "earlyprop does not download data; pass data_dir or set EARLYPROP_DATA_DIR"
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IDX_SUBDIRS = {"mnist": ("mnist", "MNIST/raw"), "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw")}
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_CIFAR_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_idx_bytes(dirpath: Path, base: str) -> bytes | None:
    """Decompressed content of ``dirpath/base`` (plain, .gz or .gz.partNN pieces); None if absent."""
    plain, gz = dirpath / base, dirpath / f"{base}.gz"
    parts = sorted(dirpath.glob(f"{base}.gz.part*"))
    if plain.is_file():
        return _read_bytes(plain)
    if gz.is_file():
        raw, where = _read_bytes(gz), gz
    elif parts:
        raw, where = b"".join(_read_bytes(p) for p in parts), dirpath / f"{base}.gz.part*"
    else:
        return None
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        # EOFError is what a truncated gzip stream (e.g. a missing .partNN piece) produces.
        raise DataError(f"{where} is not a valid gzip file (truncated or corrupt: {exc})") from exc


def _parse_idx(data: bytes, source: str, ndim: int) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{source}: not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise DataError(f"{source}: unsupported idx dtype 0x{data[2]:02x} (expected 0x08, uint8)")
    if data[3] != ndim:
        raise DataError(f"{source}: idx file has {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated idx header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise DataError(
            f"{source}: idx header promises shape {dims} ({expected} bytes) but the file holds "
            f"{len(data) - header} bytes (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_dataset(key: str, root: Path) -> Dataset:
    # Dataset-specific subfolders come first so that a flat data_dir holding other idx files
    # (e.g. MNIST) is not silently picked up for fashion-mnist.
    candidates = [root / sub for sub in IDX_SUBDIRS[key]] + [root]
    for dirpath in candidates:
        if not dirpath.is_dir() or not any(dirpath.glob("t*-idx?-ubyte*")):
            continue
        contents = {base: _read_idx_bytes(dirpath, base) for base in _IDX_FILES}
        missing = [base for base, data in contents.items() if data is None]
        if missing:
            raise DataError(
                f"{key}: {', '.join(missing)} not found in {dirpath.resolve()} (plain, .gz or .gz.partNN); "
                f"place the four original idx files there ({_NO_DOWNLOAD})"
            )
        x_tr, y_tr, x_te, y_te = (
            _parse_idx(data, str(dirpath / base), 3 if "images" in base else 1)
            for base, data in contents.items()
        )
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DataError(f"{key}: train images are {x_tr.shape[1:]} but test images are {x_te.shape[1:]}")
        return _u8_dataset(key, x_tr, y_tr, x_te, y_te, image_shape=(1, *x_tr.shape[1:]))
    searched = ", ".join(str(d.resolve()) for d in candidates)
    raise DataError(
        f"{key}: idx files ({', '.join(_IDX_FILES)}) not found; searched {searched}; "
        f"place them (plain, .gz or .gz.partNN) in one of these directories ({_NO_DOWNLOAD})"
    )


def scale_u8(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)


def _u8_dataset(
    name: str,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    image_shape: tuple[int, ...],
) -> Dataset:
    y_tr, y_te = y_tr.astype(np.int64), y_te.astype(np.int64)
    return Dataset(name, scale_u8(x_tr), y_tr, scale_u8(x_te), y_te, n_classes=10, image_shape=image_shape)


def load_cifar10(root: Path) -> Dataset:
    candidates = [root / "cifar-10-batches-bin", root]
    dirpath = next((d for d in candidates if (d / "test_batch.bin").is_file()), None)
    if dirpath is None:
        raise DataError(
            f"cifar10: test_batch.bin not found in {' or '.join(str(d.resolve()) for d in candidates)}; "
            f"extract the CIFAR-10 binary version (cifar-10-binary.tar.gz) there ({_NO_DOWNLOAD})"
        )
    records = {}
    for fname in _CIFAR_FILES:
        if not (dirpath / fname).is_file():
            raise DataError(f"cifar10: {fname} missing in {dirpath.resolve()} ({_NO_DOWNLOAD})")
        raw = _read_bytes(dirpath / fname)
        if not raw or len(raw) % _CIFAR_RECORD:
            raise DataError(
                f"cifar10: {dirpath / fname} has {len(raw)} bytes, not a positive multiple of the "
                f"{_CIFAR_RECORD}-byte record (1 label + 3072 pixels); is it the CIFAR-10 binary version?"
            )
        records[fname] = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    train = np.concatenate([records[f] for f in _CIFAR_FILES[:5]])
    test = records["test_batch.bin"]
    return _u8_dataset("cifar10", train[:, 1:], train[:, 0], test[:, 1:], test[:, 0], image_shape=(3, 32, 32))


def load_npz(path: Path, root: Path) -> Dataset:
    if not path.is_file() and not path.is_absolute() and (root / path).is_file():
        path = root / path
    if not path.is_file():
        raise DataError(
            f"npz file {path.resolve()} not found (relative paths are also tried in {root.resolve()})"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in _NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {', '.join(missing)}; it has {', '.join(f.files)}")
            arrays = {k: f[k] for k in _NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        # ValueError covers object (pickled) arrays, which are refused for safety.
        raise DataError(f"{path}: cannot read as a numeric .npz archive ({exc})") from exc
    flat = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2 or x.shape[0] == 0 or x.size == 0:
            raise DataError(f"{path}: x_{split} must be non-empty with shape (n, features...), got {x.shape}")
        flat[split] = x.reshape(len(x), -1)
        validate_arrays(flat[split], y, name=f"{path} {split}")
    x_tr, x_te = flat["train"], flat["test"]
    if x_tr.shape[1] != x_te.shape[1]:
        raise DataError(f"{path}: x_train has {x_tr.shape[1]} features but x_test has {x_te.shape[1]}")
    if x_tr.dtype == np.uint8 and x_te.dtype == np.uint8:
        x_tr, x_te = scale_u8(x_tr), scale_u8(x_te)
    else:
        x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)
        if min(x_tr.min(), x_te.min()) < 0 or max(x_tr.max(), x_te.max()) > 1:
            # Use the training range only, so no test statistics leak into preprocessing.
            lo, hi = float(x_tr.min()), float(x_tr.max())
            span = hi - lo if hi > lo else 1.0
            x_tr = (x_tr - lo) / np.float32(span)
            x_te = np.clip((x_te - lo) / np.float32(span), 0.0, 1.0)
    y_tr, y_te = arrays["y_train"].astype(np.int64), arrays["y_test"].astype(np.int64)
    image_shape = tuple(int(s) for s in arrays["x_train"].shape[1:])
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Dataset(
        path.stem, x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te, n_classes, image_shape
    )
