"""DP-compatible Flax NNX models and the check that refuses cross-example layers."""

from jaxdp.models._complex import (
    WEIGHT_STANDARDIZATIONS,
    ComplexCNN,
    ComplexConv,
    ComplexDense,
    ComplexGroupNorm,
    cardioid,
    complex_avg_pool,
    complex_conv_same,
    complex_weight_standardize,
    conjugate_mish,
    magnitude,
    mod_relu,
    split_mish,
)
from jaxdp.models._conv import DPConv, conv_same
from jaxdp.models._nets import CNN, MLP, GroupNormCNN, avg_pool, make_model, weight_standardize
from jaxdp.models._recipes import DPMnistCNN, WideResNet, WSConv, max_pool
from jaxdp.models._transformer import TransformerClassifier
from jaxdp.models._validate import check_dp_compatible

__all__ = [
    "CNN",
    "ComplexCNN",
    "ComplexConv",
    "ComplexDense",
    "ComplexGroupNorm",
    "DPConv",
    "DPMnistCNN",
    "GroupNormCNN",
    "TransformerClassifier",
    "WSConv",
    "WideResNet",
    "cardioid",
    "complex_avg_pool",
    "WEIGHT_STANDARDIZATIONS",
    "complex_conv_same",
    "complex_weight_standardize",
    "conjugate_mish",
    "magnitude",
    "mod_relu",
    "split_mish",
    "MLP",
    "avg_pool",
    "conv_same",
    "check_dp_compatible",
    "weight_standardize",
    "make_model",
    "max_pool",
]
