"""DP-compatible Flax NNX models and the check that refuses cross-example layers."""

from jaxdp.models._conv import DPConv, conv_same
from jaxdp.models._nets import CNN, MLP, make_model
from jaxdp.models._validate import check_dp_compatible

__all__ = ["CNN", "DPConv", "MLP", "conv_same", "check_dp_compatible", "make_model"]
