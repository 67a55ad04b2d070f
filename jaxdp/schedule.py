"""When XLA runs a computation, never what it computes.

:func:`after`: ``fn(*operands)``, run so that it cannot start before ``arrays`` exist. XLA's CPU scheduler
otherwise starts work as soon as its inputs exist and holds what it produced until it is used: the privatizer's
noise draw (it needs only the key) ran during the backward pass and held the threefry bits, twice the model's
size, at the step's peak; ghost clipping's kept per-example gradients were formed as soon as their layer's output
gradient existed and held beside the earlier layers' activations (WRN-16-4, batch 32: 44 and 65 MB of the private
step's planned memory). Two simpler ways do nothing on XLA's CPU backend: an optimization barrier (dropped before
it schedules) and a cond that only hands a value through (cheap branches become a select of two equal values,
then the value itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["after"]


def after(arrays: Sequence[jax.Array], fn: Callable[..., Any], *operands: Any) -> Any:
    """``fn(*operands)``, as the same computation in both branches of a ``lax.cond`` whose predicate reads one
    value of each of ``arrays`` (is any NaN?): the result never depends on those values, but XLA cannot start
    ``fn`` before every one of ``arrays`` exists. Empty arrays are not read; with none left, ``fn`` runs as is.

    ``fn`` is traced (and compiled) twice, once per branch. Under ``vmap`` with batched ``arrays`` the cond
    becomes a select and both branches run (the same values).
    """
    probe = [jnp.real(jnp.ravel(a)[0]).astype(jnp.float32) for a in arrays if a.size]
    if not probe:
        return fn(*operands)
    return jax.lax.cond(jnp.any(jnp.isnan(jnp.stack(probe))), fn, fn, *operands)
