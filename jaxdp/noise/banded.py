"""Correlated (b-banded, BandMF) Gaussian noise: the same place in the data path as :func:`jaxdp.privatize`.

Data path: the clipped gradient sum of step t gets ``σC · w_t`` added, with
``w_t`` the streaming ``C^{-1} z`` of a b-banded Toeplitz strategy ``C``
(coefficients from :mod:`jaxdp.noise.bandmf`, computed on the host), and is
divided by the public expected batch size before the optimizer. The fresh
draws ``z_t`` come from :func:`jaxdp.noise.gaussian.standard_normal_like`, so
``coefficients=(1.0,)`` is :func:`jaxdp.privatize` bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdp.noise.bandmf import check_coefficients
from jaxdp.noise.gaussian import check_privatize_args, standard_normal_like

PyTree = Any

__all__ = ["BandedPrivatizeState", "privatize_banded"]


class BandedPrivatizeState(NamedTuple):
    """State of :func:`privatize_banded`.

    Attributes:
      key: the noise key, split once per step (as in :class:`jaxdp.PrivatizeState`).
      count: steps taken so far (int32); picks the ring-buffer slot.
      history: the last ``b - 1`` correlated noises ``w`` (unit variance, before
        the σC scale), a pytree like the updates with a leading axis of
        ``b - 1``; a ring buffer where ``w_t`` lives in slot ``t mod (b - 1)``.
        It has the parameters' structure, so it is sharded/replicated like them
        and checkpointed with the optimizer state.
    """

    key: jax.Array
    count: jax.Array
    history: PyTree


def privatize_banded(
    *,
    l2_clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: int,
    key: jax.Array | int,
    coefficients: Any,
) -> optax.GradientTransformation:
    """Like :func:`jaxdp.privatize`, with noise correlated across steps by a b-banded Toeplitz strategy (BandMF).

    With strategy coefficients ``c = (c_0, ..., c_{b-1})`` (‖c‖₂ = 1, ``c_0 > 0``;
    see :mod:`jaxdp.noise.bandmf`) and fresh ``z_t ~ N(0, I)`` per step, step t returns

        (grad_sum_t + σC · w_t) / B,   w_t = (z_t - Σ_{j=1}^{b-1} c_j w_{t-j}) / c_0,

    i.e. the noise stream is ``σC · C^{-1} z`` where ``C`` is the lower-triangular
    Toeplitz matrix with ``C[t, s] = c_{t-s}``: the gradient estimate recovered
    from the released ``C x + σC z`` (Choquette-Choo et al. 2023). Only the last
    ``b - 1`` w's are kept (O(b · model size) memory, inside the jitted step).
    ``c = (1.0,)`` is DP-SGD and reproduces :func:`jaxdp.privatize` bit for bit with
    the same key.

    Guarantee: with per-example clipping to C and ‖c‖₂ = 1, one participation
    moves ``C x`` by at most C, so the mechanism is the one
    :class:`jaxdp.PrivacyPlan` accounts for with b-min-separated (cyclic Poisson)
    sampling. Using b > 1 with ordinary Poisson sampling would break that
    accounting: build it from a plan (``PrivacyPlan(bands=b)``), which refuses that.

    Args:
      l2_clip_norm, noise_multiplier, expected_batch_size, key: as :func:`jaxdp.privatize`.
      coefficients: the strategy ``c`` (e.g.
        :func:`jaxdp.noise.bandmf.optimal_coefficients`), normalised to ‖c‖₂ = 1.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`BandedPrivatizeState`.

    Example:
      >>> import optax, jaxdp
      >>> from jaxdp.noise.bandmf import optimal_coefficients
      >>> tx = optax.chain(
      ...     jaxdp.privatize_banded(l2_clip_norm=1.0, noise_multiplier=1.1, expected_batch_size=256,
      ...                            key=jaxdp.new_secret(), coefficients=optimal_coefficients(1000, 4)),
      ...     optax.sgd(0.5))
    """
    stddev, expected_batch_size, key = check_privatize_args(l2_clip_norm, noise_multiplier, expected_batch_size, key)
    c = check_coefficients(coefficients)
    b = len(c)
    c0 = float(c[0])
    tail = jnp.asarray(c[1:], jnp.float32)  # c_1 .. c_{b-1}

    def init_fn(params):
        history = jax.tree_util.tree_map(lambda p: jnp.zeros((b - 1, *jnp.shape(p)), jnp.result_type(p)), params)
        return BandedPrivatizeState(key=key, count=jnp.zeros((), jnp.int32), history=history)

    def update_fn(updates, state, params=None):
        del params
        new_key, noise_key = jax.random.split(state.key)
        z = standard_normal_like(noise_key, updates)
        if b == 1:
            w, history = z, state.history
        else:
            slot = state.count % (b - 1)
            # weight of each ring slot: w_{t-j} sits in slot (t - j) mod (b - 1), j = 1..b-1
            slots = (slot - jnp.arange(1, b)) % (b - 1)
            weights = jnp.zeros((b - 1,), jnp.float32).at[slots].set(tail)

            def one(zl, hl):
                past = jnp.tensordot(weights.astype(hl.real.dtype), hl, axes=1)
                return ((zl - past) / c0).astype(zl.dtype)

            w = jax.tree_util.tree_map(one, z, state.history)
            history = jax.tree_util.tree_map(lambda hl, wl: hl.at[slot].set(wl), state.history, w)
        if stddev > 0:
            noisy = jax.tree_util.tree_map(lambda g, wl: g + (stddev * wl).astype(g.dtype), updates, w)
        else:
            noisy = updates
        mean = jax.tree_util.tree_map(lambda g: g / expected_batch_size, noisy)
        return mean, BandedPrivatizeState(key=new_key, count=state.count + 1, history=history)

    return optax.GradientTransformation(init_fn, update_fn)
