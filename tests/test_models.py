"""DP-compatible models, and the refusal of BatchNorm."""

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxdp.models import CNN, MLP, check_dp_compatible, make_model


class WithBatchNorm(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.dense(x))


class WithGroupAndLayerNorm(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=4, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)

    def __call__(self, x):
        return self.ln(self.gn(self.conv(x)))


def test_batchnorm_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"'norm' is BatchNorm.*GroupNorm.*LayerNorm"):
        check_dp_compatible(WithBatchNorm(nnx.Rngs(0)))


def test_nested_batchnorm_is_found():
    class Outer(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs), WithBatchNorm(rngs)])

    with pytest.raises(ValueError, match="blocks/1/norm"):
        check_dp_compatible(Outer(nnx.Rngs(0)))


def test_per_example_norms_and_our_models_are_accepted():
    check_dp_compatible(WithGroupAndLayerNorm(nnx.Rngs(0)))
    check_dp_compatible(MLP(4, 2, rngs=nnx.Rngs(0)))
    check_dp_compatible(CNN((8, 8, 1), 3, rngs=nnx.Rngs(0)))


def test_make_model_shapes_and_errors():
    assert make_model("cnn", input_shape=(8, 8, 1), num_classes=10, seed=0)(jnp.ones((2, 8, 8, 1))).shape == (2, 10)
    assert make_model("mlp", input_shape=(8, 8, 1), num_classes=3, seed=0)(jnp.ones((5, 8, 8, 1))).shape == (5, 3)
    with pytest.raises(ValueError, match="model='resnet'"):
        make_model("resnet", input_shape=(8, 8, 1), num_classes=10, seed=0)
    with pytest.raises(ValueError, match="too small"):
        make_model("cnn", input_shape=(2, 2, 1), num_classes=10, seed=0, features=(4, 4))
