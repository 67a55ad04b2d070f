"""Datasets: the built-in digits and the TFDS path, run for real on TFDS's mock data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdp import data


def test_digits_split_is_fixed_and_normalised():
    a, b = data.load("digits"), data.load("digits")
    assert a.x_train.shape == (1437, 8, 8, 1) and a.x_test.shape == (360, 8, 8, 1)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.x_train.min() == 0.0 and a.x_train.max() == 1.0 and a.num_classes == 10


@pytest.mark.parametrize("name, shape, classes", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)])
def test_tfds_loading_code_runs_on_mock_data(name, shape, classes):
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load(name, data_dir="/nonexistent/only/mocked")
    assert ds.x_train.shape == (24, *shape) and ds.x_test.shape == (24, *shape)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_train.dtype == np.int32 and ds.num_classes == classes and ds.input_shape == shape


def test_unprepared_tfds_dataset_is_a_one_line_error_saying_how(tmp_path):
    with pytest.raises(ValueError) as info:
        data.load("mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert f"not prepared in {tmp_path}" in message and "tfds build mnist --file_format=array_record" in message
    assert "jaxdp data prepare mnist --data_dir DIR" in message


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset='imagenet' is not available"):
        data.load("imagenet")


def test_npz_user_arrays(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "xray.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (10, 16, 16, 1), dtype=np.uint8),
        y_train=rng.integers(0, 2, 10),
        x_test=rng.integers(0, 256, (4, 16, 16, 1), dtype=np.uint8),
        y_test=np.array([0, 1, 1, 0]),
    )
    ds = data.load(f"npz:{path}")
    assert ds.name == "xray" and ds.num_classes == 2 and ds.input_shape == (16, 16, 1)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() <= 1.0
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((3, 2)), y_train=np.zeros(3, int))
    with pytest.raises(ValueError, match=r"lacks \['x_test', 'y_test'\]"):
        data.load(f"npz:{tmp_path / 'bad.npz'}")
    with pytest.raises(ValueError, match="not found; provide an .npz file with arrays x_train"):
        data.load(f"npz:{tmp_path / 'missing.npz'}")


def _toy(n=200, classes=4):
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n).astype(np.int32)
    return data.Dataset("toy", rng.random((n, 3), np.float32), y, np.zeros((5, 3), np.float32), y[:5], classes)


def test_holdout_is_a_stratified_disjoint_split_of_the_training_set_that_drops_the_test_set():
    ds = _toy()
    split = data.holdout(ds, 50)
    assert split.eval_split == "validation" and len(split.y_test) == 50 and len(split.y_train) == 150
    # Disjoint and together the whole training set (rows are unique random vectors).
    rows = {tuple(r) for r in np.concatenate([split.x_train, split.x_test])}
    assert rows == {tuple(r) for r in ds.x_train} and len(rows) == 200
    # Stratified: each class's share of the validation split is its share of the data, to one example.
    want = np.bincount(ds.y_train, minlength=4) * 50 / 200
    assert np.all(np.abs(np.bincount(split.y_test, minlength=4) - want) < 1)
    # Fixed by its own public seed: every trial of a search sees the same split.
    np.testing.assert_array_equal(data.holdout(ds, 50).x_test, split.x_test)
    assert not np.array_equal(data.holdout(ds, 50, seed=1).x_test, split.x_test)


@pytest.mark.parametrize("size", [0, 200, 500])
def test_holdout_of_a_bad_size_says_the_valid_range(size):
    with pytest.raises(ValueError, match=f"validation_size={size} is invalid: need 0 < size < 200"):
        data.holdout(_toy(), size)
