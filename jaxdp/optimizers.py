"""Private optimizers = chain(privatizer, complex-direction fix, any optax optimizer).

Complex parameters (Wirtinger convention). For a real loss L(z) of complex z,
``jax.grad`` returns conj(∂L/∂z̄)·2 — the *conjugate* of the steepest-ascent
direction (e.g. L = |z − c|² at z = 0 gives −2 + 4i, while the ascent direction
is 2(z − c) = −2 − 4i). An optax optimizer that steps against it moves the real
part the right way and the imaginary part the wrong way. :func:`conjugate_complex`
conjugates complex leaves (real leaves pass through), so any optimizer chained
after it descends. Conjugation preserves norms, so it does not interact with
clipping or noise; it is post-processing and changes no privacy guarantee.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["LastUpdateState", "conjugate_complex", "dp_optimizer", "keep_last_update"]


def conjugate_complex() -> optax.GradientTransformation:
    """Conjugate complex gradient leaves so that optax optimizers descend (Wirtinger fix)."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda g: jnp.conj(g) if jnp.iscomplexobj(g) else g, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def dp_optimizer(privatizer: optax.GradientTransformation, optimizer: optax.GradientTransformation):
    """``chain(privatizer, conjugate_complex(), optimizer)``: the private optimizer for real or complex params."""
    return optax.chain(privatizer, conjugate_complex(), optimizer)


class LastUpdateState(NamedTuple):
    """State of :func:`keep_last_update`: the updates it last passed through."""

    last_update: Any


def keep_last_update() -> optax.GradientTransformation:
    """Pass updates through unchanged and keep a copy of the last ones in the state.

    Chained right after the privatizer it holds the previous step's *privatised*
    gradient: public, so a step may use it freely (DP-SAT ascends along it). The
    copy is kept in at least float32 and starts at zero (no previous step).
    """

    def init_fn(params):
        return LastUpdateState(
            jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
        )

    def update_fn(updates, state, params=None):
        del params
        kept = jax.tree_util.tree_map(lambda u, s: u.astype(s.dtype), updates, state.last_update)
        return updates, LastUpdateState(kept)

    return optax.GradientTransformation(init_fn, update_fn)
