"""earlyprop.data: the embedded digits, the validation split, array checks, tensors and minibatches (the file
formats are in test_files.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from earlyprop.data import (
    DataError,
    Dataset,
    check_features,
    default_data_dir,
    iterate_minibatches,
    load_dataset,
    to_tensors,
    validate_arrays,
)

# --- digits ------------------------------------------------------------------------------------------------


def test_digits_split_sizes_shape_and_range():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.image_shape == (1, 8, 8) and ds.n_classes == 10 and ds.n_features == 64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.x_val is None and ds.y_val is None


def test_digits_split_is_stratified():
    ds = load_dataset("digits")
    train_frac = np.bincount(ds.y_train, minlength=10) / len(ds.y_train)
    test_frac = np.bincount(ds.y_test, minlength=10) / len(ds.y_test)
    np.testing.assert_allclose(train_frac, test_frac, atol=0.01)


def test_digits_split_is_deterministic_and_independent_of_seed():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=123)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)


# --- validation split --------------------------------------------------------------------------------------


@pytest.mark.parametrize("validation, n_val", [(200, 200), (0.1, 144), (np.int64(50), 50)])
def test_validation_split_sizes_disjoint_and_seeded(validation, n_val):
    full = load_dataset("digits")
    ds = load_dataset("digits", validation=validation, seed=1)
    assert len(ds.x_val) == len(ds.y_val) == n_val
    assert len(ds.x_train) == 1437 - n_val
    # Map rows back to positions in the full training set (its rows are all distinct, asserted below).
    rows = {row.tobytes(): i for i, row in enumerate(full.x_train)}
    assert len(rows) == len(full.x_train)
    tr = {rows[r.tobytes()] for r in ds.x_train}
    va = {rows[r.tobytes()] for r in ds.x_val}
    assert not tr & va and len(tr | va) == 1437
    counts = np.bincount(ds.y_val, minlength=10)
    assert counts.min() >= n_val // 10 - 1
    again = load_dataset("digits", validation=validation, seed=1)
    np.testing.assert_array_equal(ds.y_val, again.y_val)
    other = load_dataset("digits", validation=validation, seed=2)
    assert not np.array_equal(ds.x_val, other.x_val)
    np.testing.assert_array_equal(ds.x_test, full.x_test)


@pytest.mark.parametrize("validation", [-5, 1.5, 1437, 5, "10"])
def test_bad_validation_raises(validation):
    with pytest.raises(DataError, match="validation"):
        load_dataset("digits", validation=validation)


# --- data directory and names ----------------------------------------------------------------------------


def test_default_data_dir_reads_env(monkeypatch, tmp_path):
    monkeypatch.delenv("EARLYPROP_DATA_DIR", raising=False)
    assert default_data_dir() == Path("data")
    monkeypatch.setenv("EARLYPROP_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset("mnist")


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


# --- validation helpers ------------------------------------------------------------------------------------


def test_validate_arrays_label_range():
    x = np.zeros((3, 2), np.float32)
    validate_arrays(x, np.array([0, 1, 2]), n_classes=3)
    with pytest.raises(DataError, match="out of range"):
        validate_arrays(x, np.array([0, 1, 3]), n_classes=3, name="toy")


def test_dataset_rejects_inconsistent_arrays():
    x, y = np.zeros((4, 6), np.float32), np.arange(4)
    with pytest.raises(DataError, match="features"):
        Dataset("toy", x, y, np.zeros((4, 5), np.float32), y, n_classes=4, image_shape=(6,))
    with pytest.raises(DataError, match="image_shape"):
        Dataset("toy", x, y, x, y, n_classes=4, image_shape=(1, 2, 2))


def test_check_features():
    ds = load_dataset("digits")
    check_features(ds, 64)
    with pytest.raises(DataError, match="has 64 features but the model expects 784"):
        check_features(ds, 784)


# --- tensors and minibatches -------------------------------------------------------------------------------


def test_to_tensors():
    t = to_tensors(load_dataset("digits", validation=100), dtype=torch.float64)
    assert t.x_train.dtype == torch.float64 and t.y_train.dtype == torch.int64
    assert t.x_train.shape == (1337, 64) and t.x_val.shape == (100, 64)
    assert to_tensors(load_dataset("digits")).x_val is None


@pytest.mark.parametrize("shuffle", [True, False])
def test_iterate_minibatches_covers_every_index_once(shuffle):
    x = torch.arange(23, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    y = torch.arange(23) % 4
    batches = list(iterate_minibatches(x, y, 5, torch.Generator().manual_seed(0), shuffle=shuffle))
    assert [len(b[0]) for b in batches] == [5, 5, 5, 5, 3]
    idx = torch.cat([b[0] for b in batches])
    assert sorted(idx.tolist()) == list(range(23))
    assert (idx.tolist() != list(range(23))) == shuffle
    for i, xb, yb in batches:
        assert torch.equal(xb, x[i]) and torch.equal(yb, y[i])


def test_iterate_minibatches_is_seeded():
    x, y = torch.zeros(50, 2), torch.zeros(50, dtype=torch.long)

    def order(seed):
        return torch.cat([i for i, _, _ in iterate_minibatches(x, y, 7, torch.Generator().manual_seed(seed))])

    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))


def test_iterate_minibatches_rejects_bad_input():
    with pytest.raises(ValueError):
        list(iterate_minibatches(torch.zeros(3, 2), torch.zeros(3), 0, None))
    with pytest.raises(TypeError):
        list(iterate_minibatches(np.zeros((3, 2)), np.zeros(3), 2, None))
