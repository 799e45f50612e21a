"""Dataset loading, validation and minibatching.

Every loader returns a :class:`Dataset` of flat float32 inputs in [0, 1] and int64 labels. Nothing is ever
downloaded: files must already be on disk (see :func:`load_dataset`), and every problem with them is reported
as a one-line :class:`DataError`.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

DATA_DIR_ENV = "EARLYPROP_DATA_DIR"
DEFAULT_DATA_DIR = Path("data")
DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10")

class DataError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message says what and where."""


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison has no single truth value
class Dataset:
    """Train/test (and optional validation) split of flat float32 inputs in [0, 1] and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    image_shape: tuple[int, ...]
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.x_val is None) != (self.y_val is None):
            raise DataError(f"{self.name}: x_val and y_val must be given together")
        splits = {"train": (self.x_train, self.y_train), "test": (self.x_test, self.y_test)}
        if self.x_val is not None and self.y_val is not None:
            splits["validation"] = (self.x_val, self.y_val)
        for split, (x, y) in splits.items():
            validate_arrays(x, y, self.n_classes, name=f"{self.name} {split}")
            if x.shape[1] != self.n_features:
                raise DataError(f"{self.name}: {split} has {x.shape[1]} features, train {self.n_features}")
        if int(np.prod(self.image_shape)) != self.n_features:
            raise DataError(f"{self.name}: image_shape {self.image_shape} != {self.n_features} features")

    @property
    def n_features(self) -> int:
        """Number of input features (pixels) per example."""
        return int(self.x_train.shape[1])


class TensorData(NamedTuple):
    """Torch views of a :class:`Dataset`; validation entries are None when there is no validation split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None


def default_data_dir() -> Path:
    """Return ``$EARLYPROP_DATA_DIR`` if set (read at call time), else ``./data``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR


def validate_arrays(x: np.ndarray, y: np.ndarray, n_classes: int | None = None, name: str = "data") -> None:
    """Raise :class:`DataError` unless ``x`` is a non-empty finite (n, features) array with n integer labels.

    Labels must be whole numbers in ``[0, n_classes)`` (only ``>= 0`` when ``n_classes`` is None); integral
    floats such as ``3.0`` are accepted.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{name}: inputs have non-numeric dtype {x.dtype}")
    if x.ndim != 2:
        raise DataError(f"{name}: inputs must have shape (n, features), got {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{name}: inputs are empty (shape {x.shape})")
    if not np.isfinite(x).all():
        raise DataError(f"{name}: inputs contain NaN or inf")
    if y.ndim != 1:
        raise DataError(f"{name}: labels must be a 1-D array, got shape {y.shape}")
    if len(y) != len(x):
        raise DataError(f"{name}: {len(x)} inputs but {len(y)} labels")
    if y.dtype.kind not in "biuf":
        raise DataError(f"{name}: labels have non-numeric dtype {y.dtype}; expected integer class indices")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise DataError(f"{name}: labels must be whole numbers (class indices), found non-integer values")
    if y.min() < 0:
        raise DataError(f"{name}: labels must be >= 0, found {y.min()}")
    if n_classes is not None and y.max() >= n_classes:
        raise DataError(f"{name}: label {int(y.max())} is out of range for {n_classes} classes")


def check_features(dataset: Dataset, n_features: int) -> None:
    """Raise :class:`DataError` if ``dataset`` does not have ``n_features`` input features."""
    if dataset.n_features != n_features:
        raise DataError(
            f"dataset '{dataset.name}' has {dataset.n_features} features but the model expects {n_features}; "
            f"build the model with an input layer of {dataset.n_features} units"
        )


def load_dataset(
    name: str, data_dir: str | Path | None = None, validation: int | float = 0, seed: int = 0
) -> Dataset:
    """Load a dataset by name (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``) or from a ``.npz`` path.

    Parameters
    ----------
    name
        Dataset name, or path to an ``.npz`` with ``x_train, y_train, x_test, y_test`` (a relative path is
        tried in the working directory, then in ``data_dir``). Inputs are flattened; uint8 inputs are divided
        by 255, other inputs outside [0, 1] are min/max-rescaled by the *training* range (test is clipped).
    data_dir
        Where the files are; default :func:`default_data_dir`. MNIST-style idx files may be plain, ``.gz`` or
        split into ``.gz.partNN`` pieces, in ``data_dir/<name>``, ``data_dir/MNIST/raw`` (resp.
        ``FashionMNIST/raw``) or ``data_dir`` itself. CIFAR-10 is the binary version in
        ``data_dir/cifar-10-batches-bin`` or ``data_dir``.
    validation
        Size of a stratified validation split taken from the training set: a count (int) or a fraction in
        (0, 1); 0 means none. The split depends on ``seed``; the train/test split of ``digits`` does not.
    seed
        Seed of the validation split.
    """
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key = str(name).strip().lower().replace("_", "-")
    from earlyprop import data_files  # its readers build this module's Dataset: imported here, not at the top

    if key.endswith(".npz"):
        dataset = data_files.load_npz(Path(str(name)).expanduser(), root)
    elif key == "digits":
        dataset = _load_digits()
    elif key in data_files.IDX_SUBDIRS:
        dataset = data_files.load_idx_dataset(key, root)
    elif key in ("cifar10", "cifar-10"):
        dataset = data_files.load_cifar10(root)
    else:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASET_NAMES)} or a .npz path")
    return _split_validation(dataset, validation, seed) if validation else dataset


def to_tensors(
    dataset: Dataset, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TensorData:
    """Convert a :class:`Dataset` to torch tensors (inputs in ``dtype``, labels int64) on ``device``."""

    def conv(a: np.ndarray | None, dt: torch.dtype) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt)

    return TensorData(
        *(conv(getattr(dataset, f), dtype if f.startswith("x") else torch.int64) for f in TensorData._fields)
    )


def iterate_minibatches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, x_batch, y_batch)`` covering every example once; the last batch may be smaller.

    The indices (into ``x``) let callers keep per-example state such as persistent particles.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("iterate_minibatches expects torch tensors; convert with to_tensors()")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    n = len(x)
    if shuffle:
        gen_device = generator.device if generator is not None else "cpu"
        order = torch.randperm(n, generator=generator, device=gen_device).to(x.device)
    else:
        order = torch.arange(n, device=x.device)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield idx, x[idx], y[idx]


# --- the embedded data set (the file formats: data_files) ----------------------------------------------


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    # Fixed split (independent of the caller's seed) so digits results are comparable across runs.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, n_classes=10, image_shape=(1, 8, 8))


def _split_validation(dataset: Dataset, validation: int | float, seed: int) -> Dataset:
    from sklearn.model_selection import train_test_split

    n = len(dataset.y_train)
    if isinstance(validation, bool) or not isinstance(validation, numbers.Real):
        raise DataError(f"validation must be an int count or a float fraction, got {validation!r}")
    # Normalise numpy scalars: sklearn reads int as a count and float as a fraction.
    validation = int(validation) if isinstance(validation, numbers.Integral) else float(validation)
    if isinstance(validation, float) and not 0 < validation < 1:
        raise DataError(f"validation fraction must be in (0, 1), got {validation}")
    if isinstance(validation, int) and not 0 < validation < n:
        raise DataError(f"validation count must be between 1 and {n - 1} (train size - 1), got {validation}")
    try:
        tr, va = train_test_split(
            np.arange(n), test_size=validation, stratify=dataset.y_train, random_state=seed
        )
    except ValueError as exc:
        msg = f"{dataset.name}: cannot make a stratified validation split of {validation}: {exc}"
        raise DataError(msg) from exc
    # Keep the original example order inside each part; only membership is random.
    tr, va = np.sort(tr), np.sort(va)
    d = dataset
    return replace(d, x_train=d.x_train[tr], y_train=d.y_train[tr], x_val=d.x_train[va], y_val=d.y_train[va])
