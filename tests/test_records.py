"""Datasets larger than memory: draws read from the array_record files equal the in-memory path's, bit for bit."""

import gzip
import threading

import numpy as np
import pytest
from conftest import tree_equal
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from jaxdp import data
from jaxdp.data.prefetch import prefetch
from jaxdp.data.prepare import prepare
from jaxdp.data.records import RecordArray
from jaxdp.train import train
from jaxdp.train.setup import setup_run

pytestmark = pytest.mark.xdist_group("tfds_records")

N_TRAIN, N_TEST = 300, 60


def _idx(magic, array):
    return magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A Fashion-MNIST-shaped array_record dataset written by `jaxdp data prepare` (class-dependent images)."""
    root = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)
    src = root / "src"
    src.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfds_mnist, "_TRAIN_EXAMPLES", N_TRAIN)
        mp.setattr(tfds_mnist, "_TEST_EXAMPLES", N_TEST)
        for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
            y = rng.integers(0, 10, n).astype(np.uint8)
            x = np.clip(rng.normal(25 * y[:, None, None], 40, (n, 28, 28)), 0, 255).astype(np.uint8)
            with gzip.open(src / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
                f.write(_idx(2051, x))
            with gzip.open(src / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
                f.write(_idx(2049, y))
        prepare("fashion_mnist", str(root / "tfds"), source=str(src), verify=False)
    return str(root / "tfds")


def test_a_dataset_above_the_memory_budget_stays_on_disk_with_the_same_values(data_dir):
    whole = data.load("fashion_mnist", data_dir)
    lazy = data.load("fashion_mnist", data_dir, memory_mb=0.1)  # 360 x 28 x 28 x 4 bytes = 1.1 MiB > 0.1
    assert isinstance(lazy.x_train, RecordArray) and isinstance(whole.x_train, np.ndarray)
    assert lazy.x_train.shape == whole.x_train.shape and lazy.input_shape == (28, 28, 1)
    np.testing.assert_array_equal(lazy.y_train, whole.y_train)
    idx = np.random.default_rng(1).integers(0, N_TRAIN, 77)  # a draw: repeats allowed, any order
    np.testing.assert_array_equal(lazy.x_train[idx], whole.x_train[idx])
    np.testing.assert_array_equal(lazy.x_test[5:40], whole.x_test[5:40])
    assert lazy.x_train[np.zeros(0, int)].shape == (0, 28, 28, 1)
    with pytest.raises(TypeError, match="raise data_memory_mb"):
        np.asarray(lazy.x_train)
    assert isinstance(data.load("fashion_mnist", data_dir, memory_mb=100).x_train, np.ndarray)  # fits: in memory


def test_a_validation_split_of_a_dataset_on_disk_stays_on_disk(data_dir):
    whole = data.holdout(data.load("fashion_mnist", data_dir), 50)
    lazy = data.holdout(data.load("fashion_mnist", data_dir, memory_mb=0.1), 50)
    assert isinstance(lazy.x_test, RecordArray) and len(lazy.x_test) == 50
    np.testing.assert_array_equal(lazy.x_test[:], whole.x_test)
    np.testing.assert_array_equal(lazy.x_train[[3, 1, 3]], whole.x_train[[3, 1, 3]])


def _config(data_dir, tmp_path, memory_mb, prefetch_depth):
    from jaxdp.config import load_config

    c = load_config("configs/digits.py")
    c.dataset, c.data_dir, c.workdir = "fashion_mnist", data_dir, str(tmp_path / f"run_{memory_mb}_{prefetch_depth}")
    c.batch_size, c.epochs, c.privacy.noise_seed = 64, 2, 123
    c.model.kwargs.hidden = (16,)
    c.data_memory_mb, c.data_prefetch = memory_mb, prefetch_depth
    c.checkpoint.every_epochs = 0
    return c


def test_training_from_disk_gives_the_parameters_of_training_in_memory(data_dir, tmp_path):
    """Same seed: the same Poisson draws, masks, noise and so the same parameters, bit for bit."""
    from jaxdp.train.checkpoint import Checkpointer

    results = {}
    template = None
    for memory_mb, depth in ((0, 0), (0.1, 2)):  # in memory, in the loop / from disk, run ahead by a thread
        config = _config(data_dir, tmp_path, memory_mb, depth)
        if template is None:
            template = setup_run(config).state
        summary = train(config, progress=False)
        ckpt = Checkpointer(config.workdir + "/checkpoints")
        restored, _ = ckpt.restore(ckpt.latest(), {"train": template, "callbacks": {}})
        ckpt.close()
        results[(memory_mb, depth)] = (summary, restored["train"].params)
    (mem_summary, mem_params), (disk_summary, disk_params) = results.values()
    assert tree_equal(disk_params, mem_params)
    assert disk_summary["test_accuracy"] == mem_summary["test_accuracy"]
    assert disk_summary["epsilon"] == mem_summary["epsilon"]


def test_a_config_over_the_memory_budget_trains_from_disk(data_dir, tmp_path):
    assert isinstance(setup_run(_config(data_dir, tmp_path, 0.1, 2)).dataset.x_train, RecordArray)
    assert isinstance(setup_run(_config(data_dir, tmp_path, 0, 2)).dataset.x_train, np.ndarray)


def test_prefetch_yields_the_same_items_in_order_and_raises_where_the_producer_failed():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))

    def broken():
        yield 1
        yield 2
        raise RuntimeError("bad record")

    got = []
    with pytest.raises(RuntimeError, match="bad record"):
        for item in prefetch(broken(), depth=2):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_runs_ahead_of_the_consumer_and_stops_when_abandoned():
    produced = []
    ahead = threading.Event()

    def items():
        for i in range(100):
            produced.append(i)
            if i == 2:
                ahead.set()
            yield i

    it = prefetch(items(), depth=2)
    assert next(it) == 0
    assert ahead.wait(5)  # items 1 and 2 were made while the consumer held item 0
    it.close()
    n = len(produced)
    assert n < 100
    threading.Event().wait(0.3)
    assert len(produced) == n  # the thread stopped
