"""Refuse models whose layers mix examples (BatchNorm) before they are trained privately."""

from __future__ import annotations

from typing import Any

from flax import nnx

_REFUSED = ("BatchNorm", "SyncBatchNorm", "ComplexBatchNorm")


def check_dp_compatible(model: Any) -> None:
    """Raise if ``model`` contains a layer that mixes examples within a batch.

    BatchNorm normalises each example with statistics of the whole batch, so one
    example's gradient depends on every other example: per-example clipping then
    no longer bounds any single example's influence, and the DP guarantee is void.

    Args:
      model: a Flax NNX module (linen modules and other objects are walked through
        their attributes as far as NNX can see).

    Raises:
      ValueError: naming the offending layer's path and suggesting GroupNorm or
        LayerNorm, which normalise within one example.
    """
    if isinstance(model, nnx.Module):
        nodes = nnx.iter_graph(model)
    else:
        nodes = [((), model)]
    for path, node in nodes:
        name = type(node).__name__
        if name in _REFUSED or isinstance(node, nnx.BatchNorm):
            where = "/".join(str(p) for p in path) or "<root>"
            raise ValueError(
                f"model layer '{where}' is {name}, which normalises with statistics of the whole "
                "batch and so mixes examples: per-example clipping cannot bound one example's "
                "influence and the privacy guarantee would not hold. Replace it with "
                "nnx.GroupNorm (e.g. num_groups=min(32, channels)) or nnx.LayerNorm "
                "(complex features: jaxdp.models.ComplexGroupNorm)."
            )
