"""The MNIST and CIFAR-10 recipes run end to end on TFDS mock data (the real loading code path)."""

import os

import jax
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from jaxdp.config import apply_overrides, load_config
from jaxdp.models import check_dp_compatible, make_model
from jaxdp.train import train

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def n_params(model):
    return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


@pytest.mark.slow  # ~13 s: builds the WRN and the MNIST CNN (CI's slow step)
def test_recipe_models():
    assert n_params(make_model("dp_mnist_cnn", input_shape=(28, 28, 1), num_classes=10, seed=0)) == 26_010
    wrn = make_model("wrn", input_shape=(32, 32, 3), num_classes=10, seed=0, depth=16, width=4)
    check_dp_compatible(wrn)  # GroupNorm, no BatchNorm
    assert 2.7e6 < n_params(wrn) < 2.8e6
    with pytest.raises(ValueError, match="depth=15"):
        make_model("wrn", input_shape=(32, 32, 3), num_classes=10, seed=0, depth=15)


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        pytest.param("mnist_cnn.py:smoke", ["batch_size=16"], marks=pytest.mark.slow),  # ~17 s
        pytest.param("fashion_mnist_cnn.py:smoke", ["batch_size=16"], marks=pytest.mark.slow),
        pytest.param("fashion_mnist_scatter.py:smoke", ["batch_size=16"], marks=pytest.mark.slow),  # ~15 s
        pytest.param(  # ~1 min compiling the WRN on 2 CPU cores: CI's slow step
            "cifar10_wrn16_4.py:smoke",
            ["batch_size=8", "physical_batch_size=8", "model.kwargs.width=1"],
            marks=pytest.mark.slow,
        ),
    ],
)
def test_recipe_smoke_on_tfds_mock_data(recipe, overrides, tmp_path):
    config = apply_overrides(
        load_config(os.path.join(CONFIGS, recipe)),
        [*overrides, f"workdir={tmp_path}", f"data_dir={tmp_path / 'tfds'}", "privacy.noise_seed=0"],
    )
    with tfds.testing.mock_data(num_examples=32):
        summary = train(config, progress=False)
    assert summary["steps"] > 0 and 0 < summary["epsilon"] <= summary["target_epsilon"]
    if config.ema_decay:
        assert 0.0 <= summary["ema_test_accuracy"] <= 1.0
