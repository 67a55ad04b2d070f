"""``jaxdp data prepare``: local IDX files -> TFDS's builder -> array_record -> the normal TFDS reader."""

import gzip
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from jaxdp import data
from jaxdp.cli import main
from jaxdp.data import prepare as prepare_lib
from jaxdp.data.prepare import PrepareError, prepare

pytestmark = pytest.mark.xdist_group("tfds_prepare")

N_TRAIN, N_TEST = 40, 12
FILES = {
    "train-images-idx3-ubyte": (2051, "train", "x"),
    "train-labels-idx1-ubyte": (2049, "train", "y"),
    "t10k-images-idx3-ubyte": (2051, "test", "x"),
    "t10k-labels-idx1-ubyte": (2049, "test", "y"),
}


def _idx(magic: int, array: np.ndarray) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


@pytest.fixture
def source(tmp_path, monkeypatch):
    """A small IDX file set in the original layout (gzipped), and TFDS's split sizes set to match it."""
    monkeypatch.setattr(tfds_mnist, "_TRAIN_EXAMPLES", N_TRAIN)
    monkeypatch.setattr(tfds_mnist, "_TEST_EXAMPLES", N_TEST)
    rng = np.random.default_rng(0)
    arrays = {
        "train": {"x": rng.integers(0, 256, (N_TRAIN, 28, 28)), "y": rng.integers(0, 10, N_TRAIN)},
        "test": {"x": rng.integers(0, 256, (N_TEST, 28, 28)), "y": rng.integers(0, 10, N_TEST)},
    }
    src = tmp_path / "src"
    src.mkdir()
    for name, (magic, split, key) in FILES.items():
        with gzip.open(src / f"{name}.gz", "wb") as f:
            f.write(_idx(magic, arrays[split][key]))
    return src, arrays


def _sorted(x, y):
    """Examples in a canonical order (TFDS shuffles the records by key when it writes them)."""
    x = np.asarray(x).reshape(len(x), -1)
    order = np.lexsort(np.concatenate([x, np.asarray(y)[:, None]], axis=1).T[::-1])
    return x[order], np.asarray(y)[order]


def test_local_idx_files_round_trip_through_tfds_to_the_same_arrays(source, tmp_path):
    src, arrays = source
    out = prepare("fashion_mnist", str(tmp_path / "tfds"), source=str(src), verify=False)
    assert os.path.basename(out) == tfds.builder_cls("fashion_mnist").VERSION.__str__()
    assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(out))
    ds = data.load("fashion_mnist", str(tmp_path / "tfds"))  # the normal reader: tfds.data_source
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        got_x, got_y = _sorted(np.rint(x * 255).astype(np.uint8), y)
        want_x, want_y = _sorted(arrays[split]["x"].astype(np.uint8), arrays[split]["y"])
        np.testing.assert_array_equal(got_x, want_x)
        np.testing.assert_array_equal(got_y, want_y)
    assert not os.path.exists(tmp_path / "tfds" / "downloads")  # the uncompressed copies are removed


def test_prepared_features_and_splits_are_tfds_builders_own(source, tmp_path):
    src, _ = source
    prepare("fashion_mnist", str(tmp_path / "tfds"), source=str(src), verify=False)
    prepared = tfds.builder("fashion_mnist", data_dir=str(tmp_path / "tfds"))
    reference = tfds.builder_cls("fashion_mnist")(data_dir=str(tmp_path / "empty"))
    assert prepared.info.features.to_json() == reference.info.features.to_json()
    assert prepared.info.supervised_keys == reference.info.supervised_keys
    assert {k: v.num_examples for k, v in prepared.info.splits.items()} == {"train": N_TRAIN, "test": N_TEST}
    with open(os.path.join(prepared.data_dir, "dataset_info.json")) as f:
        info = json.load(f)
    assert info["name"] == "fashion_mnist" and info["fileFormat"] == "array_record"
    assert info["moduleName"] == tfds_mnist.__name__  # written as TFDS's own builder's dataset


def test_uncompressed_idx_files_are_read_too(source, tmp_path):
    src, arrays = source
    for name in FILES:
        with gzip.open(src / f"{name}.gz") as f:
            (src / name).write_bytes(f.read())
        os.remove(src / f"{name}.gz")
    prepare("fashion_mnist", str(tmp_path / "tfds"), source=str(src), verify=False)
    ds = data.load("fashion_mnist", str(tmp_path / "tfds"))
    np.testing.assert_array_equal(np.sort(ds.y_test), np.sort(arrays["test"]["y"]))


def test_files_matching_no_known_checksum_are_refused_naming_the_file(source, tmp_path):
    src, _ = source
    with pytest.raises(PrepareError) as e:
        prepare("fashion_mnist", str(tmp_path / "tfds"), source=str(src))
    message = str(e.value)
    assert "\n" not in message and str(src / "train-images-idx3-ubyte.gz") in message  # the first file asked for
    assert "sha256" in message and "--no_verify" in message


def test_files_with_a_known_content_checksum_are_accepted(source, tmp_path, monkeypatch):
    src, _ = source
    digests = {}
    for name in FILES:
        with gzip.open(src / f"{name}.gz") as f:
            digests[name] = prepare_lib.hashlib.sha256(f.read()).hexdigest()
    monkeypatch.setitem(prepare_lib.CONTENT_SHA256, "fashion_mnist", digests)
    prepare("fashion_mnist", str(tmp_path / "tfds"), source=str(src))  # verify=True
    assert len(data.load("fashion_mnist", str(tmp_path / "tfds")).y_train) == N_TRAIN


def test_debian_package_digests_are_recorded_for_every_fashion_mnist_file():
    assert set(prepare_lib.CONTENT_SHA256["fashion_mnist"]) == set(FILES)
    assert all(len(v) == 64 for v in prepare_lib.CONTENT_SHA256["fashion_mnist"].values())


def test_a_missing_file_is_one_line_naming_the_file_expected(source, tmp_path):
    src, _ = source
    os.remove(src / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(PrepareError) as e:
        prepare("fashion_mnist", str(tmp_path / "tfds"), source=str(src), verify=False)
    assert "\n" not in str(e.value) and str(src / "t10k-labels-idx1-ubyte.gz") in str(e.value)


@pytest.mark.parametrize(
    "swap, expected",
    [
        ("labels_as_images", "is not an IDX file of 3-d unsigned bytes"),
        ("wrong_count", "holds 5 28x28 images"),
        ("truncated", "is truncated"),
    ],
)
def test_wrong_files_are_one_line_naming_the_file(source, tmp_path, swap, expected):
    src, arrays = source
    target = src / "train-images-idx3-ubyte.gz"
    if swap == "labels_as_images":
        target.write_bytes((src / "train-labels-idx1-ubyte.gz").read_bytes())
    elif swap == "wrong_count":
        with gzip.open(target, "wb") as f:
            f.write(_idx(2051, arrays["train"]["x"][:5]))
    else:
        with gzip.open(target, "wb") as f:
            f.write(_idx(2051, arrays["train"]["x"])[:-100])
    with pytest.raises(PrepareError) as e:
        prepare("fashion_mnist", str(tmp_path / "tfds"), source=str(src), verify=False)
    assert "\n" not in str(e.value) and "train-images-idx3-ubyte" in str(e.value) and expected in str(e.value)


def test_source_for_a_dataset_without_local_files_says_what_to_do(tmp_path):
    with pytest.raises(PrepareError, match="original files of mnist, fashion_mnist, kmnist only"):
        prepare("cifar10", str(tmp_path / "tfds"), source=str(tmp_path))


def test_cli_prepare_prints_the_split_shapes_and_the_training_command(source, tmp_path, capsys):
    src, _ = source
    d = tmp_path / "tfds"
    assert main(["data", "prepare", "fashion_mnist", "--data_dir", str(d), "--source", str(src), "--no_verify"]) == 0
    out = capsys.readouterr().out
    assert f"train ({N_TRAIN}, 28, 28, 1), test ({N_TEST}, 28, 28, 1), 10 classes" in out
    assert f"dataset=fashion_mnist data_dir={d}" in out


def test_cli_prepare_with_a_bad_source_is_a_one_line_error(tmp_path, capsys):
    code = main(["data", "prepare", "fashion_mnist", "--data_dir", str(tmp_path), "--source", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is not a folder" in err


def test_without_source_tfds_own_download_manager_fetches_the_urls_it_records(source, tmp_path, monkeypatch):
    """The network route: the builder asks TFDS's DownloadManager for the URLs TFDS records checksums of
    (served here from the test's files, since CI is offline)."""
    src, arrays = source
    asked = []

    def download_and_extract(self, urls):
        asked.extend(urls.values())
        out = {}
        for key, url in urls.items():
            name = url.rsplit("/", 1)[-1][:-3]
            with gzip.open(src / f"{name}.gz") as f:
                (tmp_path / name).write_bytes(f.read())
            out[key] = str(tmp_path / name)
        return out

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    prepare("fashion_mnist", str(tmp_path / "tfds"))
    recorded = prepare_lib.recorded_checksums("fashion_mnist")
    assert sorted(asked) == sorted(recorded) and len(asked) == 4
    assert all(len(info.checksum) == 64 for info in recorded.values())
    assert len(data.load("fashion_mnist", str(tmp_path / "tfds")).y_test) == N_TEST
