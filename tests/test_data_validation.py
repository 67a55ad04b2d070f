"""Every dataset is checked once at load: bad data is one line (DataError, a ConfigError), never a traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxdp import data
from jaxdp.config import ConfigError
from jaxdp.data.records import RecordArray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
X, Y = RNG.random((40, 6), np.float32), np.arange(40) % 3


def _save(path, **overrides):
    arrays = {"x_train": X, "y_train": Y, "x_test": X[:8], "y_test": Y[:8], **overrides}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def _nan_at(row):
    x = X[:8].copy()
    x[row, 2] = np.nan
    return x


def _bad_files(tmp_path):
    """name -> (path, the message expected for it)."""
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    npy = tmp_path / "data.npy"
    np.save(npy, X)
    text = tmp_path / "data.csv.npz"
    text.write_text("x,y\n1,2\n")
    p = str(tmp_path)
    return {
        "empty": (str(empty), f"{p}/empty.npz is empty (0 bytes); expected an .npz archive with x_train, y_train"),
        "npy": (str(npy), f"{p}/data.npy is a .npy array (40, 6) float32, not an .npz archive with x_train, y_train, "),
        "not numpy": (str(text), f"{p}/data.csv.npz is not a numpy file"),
        "keys": (
            _save(tmp_path / "keys.npz", x_train=None, y_train=None, X=X, Y=Y),
            f"{p}/keys.npz lacks ['x_train', 'y_train'] (it has x_test, y_test, X, Y); expected an .npz file",
        ),
        "strings": (
            _save(tmp_path / "strings.npz", x_train=X.astype(str)),
            "strings.npz: x_train has dtype <U32 (strings); expected numbers (float, int, uint, bool or complex): "
            "convert it, e.g. x_train.astype(np.float32).",
        ),
        "objects": (
            _save(tmp_path / "objects.npz", x_test=np.array([[1, None]] * 8, dtype=object)),
            "objects.npz: cannot read its arrays (Object arrays cannot be loaded when allow_pickle=False)",
        ),
        "features": (
            _save(tmp_path / "features.npz", x_test=X[:8, :4]),
            "features.npz: x_train has examples of shape (6,) but x_test has (4,); expected the same shape per "
            "example in both splits.",
        ),
        "rows": (
            _save(tmp_path / "rows.npz", y_train=Y[:39]),
            "rows.npz: x_train has 40 rows but y_train has 39 labels; expected one label per row.",
        ),
        "zero rows": (
            _save(tmp_path / "zero.npz", x_train=X[:0], y_train=Y[:0]),
            "zero.npz: x_train has 0 rows (shape (0, 6)); expected at least one example in it.",
        ),
        "zero test rows": (
            _save(tmp_path / "zerotest.npz", x_test=X[:0], y_test=Y[:0]),
            "zerotest.npz: x_test has 0 rows (shape (0, 6)); expected at least one example in it.",
        ),
        "1-D features": (
            _save(tmp_path / "flat.npz", x_train=X[:, 0], x_test=X[:8, 0]),
            "flat.npz: x_train has shape (40,); expected one row per example, (n, features) or (n, H, W, C)",
        ),
        "negative labels": (
            _save(tmp_path / "labels.npz", y_train=Y - 1, y_test=Y[:8] - 1),
            "labels.npz: y_train has labels -1..1; expected integers 0..K-1 for K classes: shift them to start "
            "at 0 (y + 1 in both splits).",
        ),
        "1-based labels": (
            _save(tmp_path / "onebased.npz", y_train=Y + 1, y_test=Y[:8] + 1),
            "onebased.npz: the labels are 1..3 and no example has label 0; expected integers 0..K-1 (K classes): "
            "shift them to start at 0 (y - 1 in both splits).",
        ),
        "one class": (
            _save(tmp_path / "oneclass.npz", y_train=0 * Y, y_test=0 * Y[:8]),
            "oneclass.npz: every label is 0; expected at least two classes",
        ),
        "fractional labels": (
            _save(tmp_path / "frac.npz", y_test=np.array([0, 1, 2, 0.5, 1, 2, 0, 1])),
            "frac.npz: y_test has 1 non-integer label (e.g. 0.5 at row 3); expected integer class labels 0..K-1.",
        ),
        "string labels": (
            _save(tmp_path / "strlabels.npz", y_train=Y.astype(str)),
            "strlabels.npz: y_train has dtype <U21 (strings); expected integer class labels 0..K-1",
        ),
        "one-hot labels": (
            _save(tmp_path / "onehot.npz", y_train=np.eye(3)[Y]),
            "onehot.npz: y_train has shape (40, 3); expected (n,) integer labels, not one-hot rows: use "
            "y_train.argmax(axis=1).",
        ),
        "NaN in test features": (
            _save(tmp_path / "nantest.npz", x_test=_nan_at(5)),
            "nantest.npz: x_test has 1 NaN value (first in row 5); expected finite numbers: drop or impute those rows.",
        ),
        "inf in train features": (
            _save(tmp_path / "inf.npz", x_train=np.where(np.arange(40)[:, None] >= 38, np.inf, X)),
            "inf.npz: x_train has 12 inf values (first in row 38); expected finite numbers",
        ),
    }


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad"))


CASES = [
    "empty",
    "npy",
    "not numpy",
    "keys",
    "strings",
    "objects",
    "features",
    "rows",
    "zero rows",
    "zero test rows",
    "1-D features",
    "negative labels",
    "1-based labels",
    "one class",
    "fractional labels",
    "string labels",
    "one-hot labels",
    "NaN in test features",
    "inf in train features",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_npz_files_are_a_one_line_data_error_naming_what_was_found_and_expected(bad_files, case):
    path, expected = bad_files[case]
    with pytest.raises(ConfigError) as info:  # what the CLI prints as one line with exit 2
        data.load(f"npz:{path}")
    message = str(info.value)
    assert type(info.value).__name__ == "DataError"
    assert "\n" not in message and expected in message, message


def test_data_error_is_a_config_error_and_a_value_error():
    assert issubclass(data.DataError, ConfigError) and issubclass(data.DataError, ValueError)


def test_integral_float_labels_are_accepted_as_int32_and_uint8_images_scaled(tmp_path):
    x = RNG.integers(0, 256, (40, 4, 4, 1), dtype=np.uint8)
    path = _save(tmp_path / "ok.npz", x_train=x, x_test=x[:8], y_train=Y.astype(np.float64))
    ds = data.load(f"npz:{path}")
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32 and ds.num_classes == 3
    np.testing.assert_array_equal(ds.y_train, Y)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() <= 1.0 and ds.input_shape == (4, 4, 1)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.float16, np.float64, np.complex64])
def test_numeric_feature_dtypes_are_accepted_as_they_are(tmp_path, dtype):
    x = (X * 4).astype(dtype)
    ds = data.load(f"npz:{_save(tmp_path / 'ok.npz', x_train=x, x_test=x[:8])}")
    assert ds.x_train.dtype == dtype and ds.num_classes == 3


def test_k_from_the_dataset_bounds_the_labels_of_both_splits():
    x = np.zeros((4, 2), np.float32)
    ok = data.Dataset("toy", x, np.array([0, 1, 2, 2]), x, np.array([0, 1, 2, 1]), 10)
    assert data.validate(ok).num_classes == 10  # a known K is kept, even if some classes are absent
    bad = ok._replace(y_test=np.array([0, 1, 10, 1]))
    with pytest.raises(data.DataError, match=r"^toy: y_test has labels 0..10; expected integers in 0..9 \(num_"):
        data.validate(bad)
    with pytest.raises(data.DataError, match=r"^toy: y_train has labels -1..2; expected integers in 0..9"):
        data.validate(ok._replace(y_train=np.array([0, -1, 2, 2])))


def test_a_registered_loader_is_validated_too():
    x = np.zeros((4, 2), np.float32)
    name = "test_data_validation_bad_labels"
    if name not in data.available():
        data.register_dataset(name, lambda data_dir: data.Dataset(name, x, np.array([0, 1, 5, 1]), x, np.zeros(4), 3))
    with pytest.raises(data.DataError, match=f"^{name}: y_train has labels 0..5; expected integers in 0..2"):
        data.load(name)


def test_built_in_digits_pass_and_a_file_name_without_npz_prefix_says_how(tmp_path):
    ds = data.load("digits")
    assert ds.num_classes == 10 and ds.y_train.dtype == np.int32
    path = _save(tmp_path / "mine.npz")
    with pytest.raises(ValueError, match=f"dataset='{path}' is not a dataset name; .* use dataset=npz:{path}"):
        data.load(path)


def test_nan_is_located_in_image_arrays_and_overflowing_sums_of_finite_values_pass():
    x = np.zeros((6, 3, 3, 2), np.float32)
    x[4, 1, 2, 1] = np.nan
    ds = data.Dataset("img", x, np.arange(6) % 2, x[:1] * 0, np.array([1]), 2)
    with pytest.raises(data.DataError, match=r"x_train has 1 NaN value \(first in row 4\)"):
        data.validate(ds)
    huge = np.full((6, 3, 3, 2), 3e38, np.float32)  # finite, but their float32 sum overflows to inf
    assert data.validate(ds._replace(x_train=huge)).x_train is huge  # passes; the features are not copied


class _CountingSource(list):
    """A TFDS-like data source whose batched reads are counted."""

    reads = 0

    def __getitems__(self, idx):
        type(self).reads += 1
        return [self[i] for i in idx]


def test_a_dataset_on_disk_is_checked_from_its_shapes_and_labels_without_reading_its_images():
    train = _CountingSource({"image": np.zeros((4, 4, 1), np.uint8)} for _ in range(10))
    test = _CountingSource({"image": np.zeros((4, 4, 1), np.uint8)} for _ in range(3))
    ds = data.Dataset("lazy", RecordArray(train), np.arange(10) % 2, RecordArray(test), np.array([0, 1, 1]), 2)
    _CountingSource.reads = 0
    assert data.validate(ds).x_train is ds.x_train
    assert _CountingSource.reads == 0  # no batch read: nothing but the first record was looked at
    wide = _CountingSource({"image": np.zeros((4, 5, 1), np.uint8)} for _ in range(3))
    with pytest.raises(data.DataError, match=r"x_train has examples of shape \(4, 4, 1\) but x_test has \(4, 5, 1\)"):
        data.validate(ds._replace(x_test=RecordArray(wide)))
    with pytest.raises(data.DataError, match="y_test has labels 0..2; expected integers in 0..1"):
        data.validate(ds._replace(y_test=np.array([0, 2, 1])))


CLI_CASES = [
    "empty",
    "npy",
    "strings",
    "features",
    "negative labels",
    "NaN in test features",
    "zero rows",
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_jaxdp_train_on_bad_data_prints_one_line_and_exits_2(bad_files, case, tmp_path):
    path, expected = bad_files[case]
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdp.cli", "train", "--config", os.path.join(ROOT, "configs", "digits.py")]
        + [f"dataset=npz:{path}", "epochs=1", "batch_size=8", f"workdir={tmp_path}", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxdp: error: ") and expected in lines[0], proc.stderr


@pytest.mark.parametrize("model, ok", [("mlp", False), ("complex_cnn", True)])
def test_complex_features_need_a_complex_model_before_the_first_step(tmp_path, model, ok):
    import ml_collections

    from jaxdp.config import load_config
    from jaxdp.train.setup import setup_run

    x = np.fft.fft2(RNG.random((40, 4, 4, 1)), axes=(1, 2)).astype(np.complex64)
    config = load_config(os.path.join(ROOT, "configs", "digits.py"))
    config.dataset = f"npz:{_save(tmp_path / 'kspace.npz', x_train=x, x_test=x[:8])}"
    config.update({"epochs": 1, "batch_size": 8, "workdir": str(tmp_path), "privacy": {"noise_seed": 0}})
    config.model.name, config.model.kwargs = model, ml_collections.ConfigDict()
    if ok:
        assert setup_run(config).dataset.x_train.dtype == np.complex64
        return
    with pytest.raises(ConfigError) as info:
        setup_run(config)
    assert str(info.value) == (
        f"dataset={config.dataset!r} has complex64 (complex) features but model.name='mlp' has real parameters; "
        "use model.name='complex_cnn', or give the real and imaginary parts as two real channels "
        "(see experiments/complex_valued)."
    )


def test_bool_labels_are_two_classes_and_split_dtypes_must_agree_and_any_array_is_scanned():
    x = np.zeros((6, 3), np.float32)
    y = np.array([True, False, True, False, True, False])
    from jaxdp.data import DataError, Dataset, validate

    ds = validate(Dataset("toy", x, y, x, y, 0))
    assert ds.num_classes == 2 and ds.y_train.dtype == np.int32 and ds.y_train.tolist() == [1, 0, 1, 0, 1, 0]
    with pytest.raises(DataError, match=r"x_train has dtype float32 but x_test has complex64; expected both real"):
        validate(Dataset("toy", x, y, x.astype(np.complex64), y, 0))

    class NotNumpy:  # an array-like that is not an np.ndarray (e.g. what a registered loader returns)
        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def __array__(self, dtype=None, copy=None):
            return self.a

    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(DataError, match=r"x_train has 1 NaN value \(first in row 2\)"):
        validate(Dataset("toy", NotNumpy(bad), y, x, y, 0))
