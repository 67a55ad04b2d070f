"""The benchmarks' one model table is consistent: each model's data and random inputs fit it."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.bench import refs
from jaxdp.bench.models import DEFAULT_MODELS, MODELS, param_count, random_batch, split_model


@pytest.mark.parametrize("name", list(MODELS))
def test_data_matches_the_table(name):
    spec = MODELS[name]
    d = spec.data()
    assert d.x_train.shape[1:] == d.x_test.shape[1:] == spec.input_shape
    assert d.num_classes == spec.num_classes
    assert set(np.unique(d.y_train)) <= set(range(spec.num_classes))
    assert spec.quick_batches and spec.full_batches and d.name in spec.data_labels


def test_mnist_cnn_trains_on_prepared_fashion_mnist_when_it_is_there_and_says_which(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    spec = MODELS["mnist_cnn"]
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "none"))
    assert spec.data().name == "digits28" and "no prepared Fashion-MNIST" in spec.data_label()
    assert spec.epochs(full=False) == spec.quick_epochs
    with tfds.testing.mock_data(num_examples=16):  # a prepared fashion_mnist, as TFDS's reader sees it
        monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "mock"))
        assert spec.data().name == "fashion_mnist" and spec.data().input_shape == (28, 28, 1)
        assert spec.data_label().startswith("Fashion-MNIST (real")
        assert (spec.epochs(full=False), spec.epochs(full=True)) == spec.epochs_by_data["fashion_mnist"]


def test_defaults_and_references_are_in_the_table():
    assert set(DEFAULT_MODELS) <= set(MODELS) and "mlp" not in DEFAULT_MODELS
    assert set(refs.REFERENCE_MODELS) <= set(MODELS)


def test_split_model_and_random_batch():
    graphdef, params, rest, loss_fn = split_model("mlp", seed=0)
    assert param_count(params) == 64 * 32 + 32 + 32 * 10 + 10
    x, y = random_batch(MODELS["mlp"].input_shape, 10, 5, seed=3)
    assert x.shape == (5, 8, 8, 1) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(x, random_batch((8, 8, 1), 10, 5, seed=3)[0])  # the same for every implementation
    assert jnp.isfinite(loss_fn(params, x, y))
    with pytest.raises(ValueError, match="model 'resnet' is not a benchmarked model"):
        split_model("resnet")
    with pytest.raises(ValueError, match="batch=0 must be an int >= 1"):
        random_batch((2,), 2, 0)
