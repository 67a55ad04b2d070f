"""Reparametrisations of a parameter that ghost clipping verifies and takes per-example norms through.

:func:`standardize_kernel` is weight standardisation, ``(k - mean) / sqrt(var + eps)`` per output channel
(the last axis), one ``jit`` call. :mod:`jaxdp.clipping.ghost` recognises a call of it in a traced loss
by its source *and* by its body, which must be the one a fresh trace of this function gives for the
call's input (a batched call, e.g. under ``jax.vmap``, standardises over other axes and is refused);
:func:`jaxdp.models.weight_standardize` is the user-facing name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["standardize_kernel"]


@jax.jit
def standardize_kernel(kernel: jax.Array, eps) -> jax.Array:
    """(k − mean) / sqrt(var + eps) per output channel (last axis), statistics over all other axes."""
    axes = tuple(range(kernel.ndim - 1))
    return (kernel - kernel.mean(axis=axes, keepdims=True)) / jnp.sqrt(kernel.var(axis=axes, keepdims=True) + eps)
