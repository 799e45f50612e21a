"""earlyprop.data_files through load_dataset: MNIST-style idx files (real MNIST from ../shared/data when present,
fake ones otherwise), the CIFAR-10 binary version and npz archives, and every way they can be wrong."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from earlyprop.data import DataError, Dataset, load_dataset

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file(),
    reason=f"real MNIST not available at {MNIST_DIR}",
)


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def write_fake_idx(dirpath: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (n_train, 28, 28)),
        IDX_FILES[1]: np.arange(n_train) % 10,
        IDX_FILES[2]: rng.integers(0, 256, (n_test, 28, 28)),
        IDX_FILES[3]: (np.arange(n_test) + 3) % 10,
    }
    dirpath.mkdir(parents=True, exist_ok=True)
    for base, arr in arrays.items():
        (dirpath / base).write_bytes(idx_bytes(arr))
    return arrays



# --- MNIST -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    if not MNIST_DIR.is_dir():
        pytest.skip(f"real MNIST not available at {MNIST_DIR}")
    return load_dataset("mnist", data_dir=MNIST_DIR)


def check_real_mnist(ds: Dataset) -> None:
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.image_shape == (1, 28, 28) and ds.n_classes == 10
    assert ds.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert ds.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert abs(float(ds.x_train.mean(dtype=np.float64)) - 0.130660) < 1e-5
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() == 1.0


@needs_mnist
def test_mnist_from_split_parts(mnist):
    assert any(MNIST_DIR.glob("train-images-idx3-ubyte.gz.part*"))
    check_real_mnist(mnist)


@needs_mnist
def test_mnist_from_joined_gz_in_subdir(tmp_path, mnist):
    sub = tmp_path / "mnist"
    sub.mkdir()
    parts = sorted(MNIST_DIR.glob("train-images-idx3-ubyte.gz.part*"))
    (sub / "train-images-idx3-ubyte.gz").write_bytes(b"".join(p.read_bytes() for p in parts))
    for base in IDX_FILES[1:]:
        shutil.copy(MNIST_DIR / f"{base}.gz", sub)
    ds = load_dataset("mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.x_train, mnist.x_train)
    np.testing.assert_array_equal(ds.y_test, mnist.y_test)


@needs_mnist
def test_mnist_from_decompressed_files_in_torchvision_layout(tmp_path, mnist):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    parts = sorted(MNIST_DIR.glob("train-images-idx3-ubyte.gz.part*"))
    (raw / IDX_FILES[0]).write_bytes(gzip.decompress(b"".join(p.read_bytes() for p in parts)))
    for base in IDX_FILES[1:]:
        (raw / base).write_bytes(gzip.decompress((MNIST_DIR / f"{base}.gz").read_bytes()))
    ds = load_dataset("mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.x_train, mnist.x_train)
    np.testing.assert_array_equal(ds.y_train, mnist.y_train)


def test_fashion_mnist_fake_idx(tmp_path):
    arrays = write_fake_idx(tmp_path / "fashion-mnist")
    # A flat MNIST-like file set in data_dir must not shadow the fashion-mnist subfolder.
    write_fake_idx(tmp_path, seed=1)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.name == "fashion-mnist" and ds.image_shape == (1, 28, 28)
    assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (4, 784)
    np.testing.assert_allclose(ds.x_train, arrays[IDX_FILES[0]].reshape(6, -1) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(ds.y_test, arrays[IDX_FILES[3]])


def test_idx_gz_and_parts_with_fake_files(tmp_path):
    src = tmp_path / "src"
    arrays = write_fake_idx(src)
    dst = tmp_path / "FashionMNIST" / "raw"
    dst.mkdir(parents=True)
    blob = gzip.compress((src / IDX_FILES[0]).read_bytes())
    for i, start in enumerate(range(0, len(blob), 1000)):
        (dst / f"{IDX_FILES[0]}.gz.part{i:02d}").write_bytes(blob[start : start + 1000])
    for base in IDX_FILES[1:]:
        (dst / f"{base}.gz").write_bytes(gzip.compress((src / base).read_bytes()))
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.y_train, arrays[IDX_FILES[1]])
    np.testing.assert_allclose(ds.x_train * 255, arrays[IDX_FILES[0]].reshape(6, -1), atol=1e-4)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda b: b[:-10], "truncated"),
        (lambda b: b + b"\x00", "truncated"),
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "dtype"),
        (lambda b: b[:3] + b"\x02" + b[4:], "dimensions"),
        (lambda b: b[:3], "magic"),
    ],
)
def test_corrupt_idx_raises(tmp_path, corrupt, match):
    write_fake_idx(tmp_path)
    path = tmp_path / IDX_FILES[0]
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DataError, match=match) as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_truncated_gz_raises(tmp_path):
    write_fake_idx(tmp_path)
    path = tmp_path / IDX_FILES[2]
    (tmp_path / f"{IDX_FILES[2]}.gz").write_bytes(gzip.compress(path.read_bytes())[:-30])
    path.unlink()
    with pytest.raises(DataError, match="gzip"):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_mnist_dir_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset("mnist", data_dir=missing)
    msg = str(err.value)
    assert str(missing) in msg and "download" in msg and "\n" not in msg


def test_missing_single_idx_file_is_named(tmp_path):
    write_fake_idx(tmp_path / "mnist")
    (tmp_path / "mnist" / IDX_FILES[3]).unlink()
    with pytest.raises(DataError, match=IDX_FILES[3]) as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(tmp_path / "mnist") in str(err.value)


# --- CIFAR-10 ----------------------------------------------------------------------------------------------


def write_fake_cifar(dirpath: Path, n_per_batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    dirpath.mkdir(parents=True, exist_ok=True)
    records = []
    for i, fname in enumerate([f"data_batch_{j}.bin" for j in range(1, 6)] + ["test_batch.bin"]):
        rec = rng.integers(0, 256, (n_per_batch, 3073)).astype(np.uint8)
        rec[:, 0] = (np.arange(n_per_batch) + i) % 10
        (dirpath / fname).write_bytes(rec.tobytes())
        records.append(rec)
    return np.concatenate(records[:5]), records[5]


def test_cifar10_binary(tmp_path):
    train, test = write_fake_cifar(tmp_path / "cifar-10-batches-bin")
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (15, 3072) and ds.x_test.shape == (3, 3072)
    assert ds.image_shape == (3, 32, 32) and ds.n_classes == 10
    np.testing.assert_array_equal(ds.y_train, train[:, 0])
    np.testing.assert_array_equal(ds.y_test, test[:, 0])
    np.testing.assert_allclose(ds.x_train * 255, train[:, 1:], atol=1e-4)
    # Channel-major layout: pixel (c=1, h=0, w=5) of the first test image.
    img = ds.x_test[0].reshape(ds.image_shape)
    assert img[1, 0, 5] == pytest.approx(test[0, 1 + 1024 + 5] / 255.0)


def test_cifar10_bad_record_length(tmp_path):
    write_fake_cifar(tmp_path)
    with open(tmp_path / "data_batch_3.bin", "ab") as f:
        f.write(b"\x00\x01")
    with pytest.raises(DataError, match="3073"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar10_missing_batch(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_5.bin").unlink()
    with pytest.raises(DataError, match="data_batch_5.bin"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar10_missing_dir(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-bin"):
        load_dataset("cifar10", data_dir=tmp_path)


# --- npz ---------------------------------------------------------------------------------------------------


def npz_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.random((20, 2, 3, 3)).astype(np.float32),
        "y_train": np.arange(20) % 4,
        "x_test": rng.random((8, 2, 3, 3)).astype(np.float32),
        "y_test": np.arange(8) % 5,
    }


def save_npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "toy.npz"
    np.savez(path, **arrays)
    return path


def test_npz_happy_path(tmp_path):
    arrays = npz_arrays()
    ds = load_dataset(str(save_npz(tmp_path, **arrays)))
    assert ds.name == "toy" and ds.image_shape == (2, 3, 3) and ds.n_features == 18
    assert ds.n_classes == 5  # max label over train *and* test
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"].reshape(20, -1))
    assert ds.y_train.dtype == np.int64


def test_npz_relative_to_data_dir_and_flat_features(tmp_path):
    arrays = npz_arrays()
    arrays["x_train"], arrays["x_test"] = arrays["x_train"].reshape(20, -1), arrays["x_test"].reshape(8, -1)
    save_npz(tmp_path, **arrays)
    ds = load_dataset("toy.npz", data_dir=tmp_path)
    assert ds.image_shape == (18,)


def test_npz_uint8_and_rescaling(tmp_path):
    arrays = npz_arrays()
    arrays["x_train"] = (arrays["x_train"] * 255).astype(np.uint8)
    arrays["x_test"] = (arrays["x_test"] * 255).astype(np.uint8)
    ds = load_dataset(str(save_npz(tmp_path, **arrays)))
    np.testing.assert_allclose(ds.x_train, arrays["x_train"].reshape(20, -1) / 255.0, atol=1e-7)

    arrays = npz_arrays()
    arrays["x_train"] = arrays["x_train"] * 10 - 3
    arrays["x_test"] = arrays["x_test"] * 20 - 3
    ds = load_dataset(str(save_npz(tmp_path, **arrays)))
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == pytest.approx(1.0)
    assert ds.x_test.min() >= 0.0 and ds.x_test.max() <= 1.0
    assert ds.x_train.dtype == np.float32


def _nan(a):
    a["x_train"][0, 0, 0, 0] = np.nan


def _inf(a):
    a["x_test"][1, 1, 1, 1] = np.inf


def _float_labels(a):
    a["y_train"] = a["y_train"] + 0.5


def _negative(a):
    a["y_test"][2] = -1


def _empty(a):
    a["x_train"], a["y_train"] = a["x_train"][:0], a["y_train"][:0]


def _missing(a):
    del a["y_test"]


def _length(a):
    a["y_train"] = a["y_train"][:-1]


def _features(a):
    a["x_test"] = a["x_test"][:, :1]


def _strings(a):
    a["y_train"] = np.array(["a"] * 20)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (_nan, "NaN"),
        (_inf, "inf"),
        (_float_labels, "whole numbers"),
        (_negative, ">= 0"),
        (_empty, "empty"),
        (_missing, "y_test"),
        (_length, "20 inputs but 19 labels"),
        (_features, "18 features but x_test has 9"),
        (_strings, "non-numeric"),
    ],
)
def test_npz_bad_cases(tmp_path, mutate, match):
    arrays = npz_arrays()
    mutate(arrays)
    path = save_npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=match) as err:
        load_dataset(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_npz_whole_float_labels_accepted(tmp_path):
    arrays = npz_arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.float64)
    ds = load_dataset(str(save_npz(tmp_path, **arrays)))
    assert ds.y_train.dtype == np.int64 and ds.y_train[:5].tolist() == [0, 1, 2, 3, 0]


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "absent.npz"))
