"""Gaussian noise for clipped gradient sums, as plain functions and optax transforms."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp.keys import as_key

PyTree = Any

__all__ = ["BandedPrivatizeState", "PrivatizeState", "add_noise", "privatize", "privatize_banded"]


def _check_nonneg(name: str, value: Any, fix: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}={value!r} must be a Python number; {fix}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0; {fix}")
    return v


def add_noise(key: jax.Array, tree: PyTree, stddev: float | jax.Array) -> PyTree:
    """Add independent ``N(0, stddev^2)`` noise to every coordinate of every leaf.

    Complex leaves get ``N(0, stddev^2)`` on the real part **and** independently on
    the imaginary part (not ``jax.random.normal``'s complex convention, which has
    variance 1/2 per part and would add √2 too little noise).

    Why this is the right complex Gaussian mechanism: identify z ∈ Cⁿ with
    (Re z, Im z) ∈ R²ⁿ. The clipped sum's sensitivity is measured in exactly that
    norm (‖z‖² = ‖Re z‖² + ‖Im z‖², see :func:`jaxdp.clipped_grad`), and the noise
    is N(0, σ²C² I₂ₙ) on it. That is the real Gaussian mechanism in 2n
    dimensions with sensitivity C, so every accountant applies unchanged.

    Args:
      key: a JAX PRNG key; the same key gives the same noise.
      tree: pytree of float or complex arrays.
      stddev: standard deviation per real coordinate (e.g. ``sigma * C``).

    Returns:
      ``tree`` plus noise, same structure, shapes and dtypes. Noise is drawn and
      added in at least float32; a bfloat16/float16 leaf is rounded once, after
      the addition (post-processing), never given low-precision noise.

    Example:
      >>> import jax, jax.numpy as jnp, jaxdp
      >>> key = jaxdp.key_from_secret(jaxdp.new_secret())  # secret: never jax.random.key(0) in a real run
      >>> noisy = jaxdp.add_noise(key, {"w": jnp.zeros(3)}, 1.0)
    """
    noise = _standard_normal_like(key, tree)  # in at least float32
    # Added in at least float32 and rounded once: rounding the noisy value is post-processing.
    return jax.tree_util.tree_map(
        lambda leaf, n: (jnp.asarray(leaf).astype(n.dtype) + stddev * n).astype(jnp.asarray(leaf).dtype), tree, noise
    )


def _standard_normal_like(key: jax.Array, tree: PyTree) -> PyTree:
    """N(0, 1) per real coordinate (per part for complex leaves), one key split per leaf.

    The single source of the Gaussian draws of :func:`add_noise` and both
    privatizers, so the same key gives the same ``z`` everywhere.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return tree
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, leaf in zip(keys, leaves, strict=True):
        leaf = jnp.asarray(leaf)
        if not (jnp.iscomplexobj(leaf) or jnp.issubdtype(leaf.dtype, jnp.floating)):
            raise TypeError(
                f"add_noise got a leaf of dtype {leaf.dtype}; only float and complex leaves can "
                "carry Gaussian noise. Cast integer leaves to float, or keep them out of the tree."
            )
        # Drawn in at least float32: a bfloat16/float16 draw would be a coarse,
        # far-from-Gaussian sample (add_noise rounds once, after adding).
        real_dtype = jnp.finfo(jnp.promote_types(leaf.dtype, jnp.float32)).dtype
        if jnp.iscomplexobj(leaf):
            kr, ki = jax.random.split(k)
            re = jax.random.normal(kr, leaf.shape, real_dtype)
            im = jax.random.normal(ki, leaf.shape, real_dtype)
            noise = jax.lax.complex(re, im)
        else:
            noise = jax.random.normal(k, leaf.shape, real_dtype)
        out.append(noise)
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_privatize_args(l2_clip_norm, noise_multiplier, expected_batch_size, key):
    """Validated ``(stddev = σC, expected_batch_size, key)`` of a privatizer."""
    clip = _check_nonneg("l2_clip_norm", l2_clip_norm, "pass the clipping bound C used by clipped_grad.")
    if clip == 0:
        raise ValueError(
            f"l2_clip_norm={l2_clip_norm!r} makes every gradient zero; pass the clipping bound C > 0 used by "
            "clipped_grad (e.g. 1.0)."
        )
    sigma = _check_nonneg("noise_multiplier", noise_multiplier, "pass sigma >= 0 (e.g. 1.0).")
    if isinstance(expected_batch_size, np.integer):
        expected_batch_size = int(expected_batch_size)
    key = as_key(key)  # an int secret is used whole (all of its bits), never truncated to 32
    if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size < 1:
        raise ValueError(
            f"expected_batch_size={expected_batch_size!r} must be a positive int: the public expected "
            "batch size (sampling rate x dataset size) that the noisy sum is divided by."
        )
    return sigma * clip, expected_batch_size, key


class PrivatizeState(NamedTuple):
    """State of :func:`privatize`: the noise key, split once per step."""

    key: jax.Array


def privatize(
    *,
    l2_clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: int,
    key: jax.Array | int,
) -> optax.GradientTransformation:
    """Turn a sum of clipped per-example gradients into a noisy average.

    ``update(grad_sum, state)`` returns ``(grad_sum + N(0, (σC)^2 I)) / B`` with
    ``σ = noise_multiplier``, ``C = l2_clip_norm`` and ``B = expected_batch_size``,
    the *public* expected batch size (never the realised one, which would leak
    the sampled batch size). Noise is drawn once per call from a key carried in
    the state, so chaining any optax optimizer after it gives DP-SGD, DP-Adam, ...

    Args:
      l2_clip_norm: C, the sensitivity of the incoming sum.
      noise_multiplier: σ >= 0; the noise standard deviation is σC. σ = 0 turns
        noise off (no privacy; for tests and audits).
      expected_batch_size: B > 0, divides the noisy sum.
      key: PRNG key for the noise, or an int secret in [0, 2**128) that is
        turned into one with all of its bits (:func:`jaxdp.key_from_secret`). It
        must be **secret**: anyone who knows it can recompute and subtract the
        noise. In real runs draw it from the OS: ``jaxdp.new_secret()``. (Do not
        build it with ``jax.random.key(seed)``: with x64 off that keeps only the
        low 32 bits of ``seed``, 2**32 guesses.)

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import optax, jaxdp
      >>> tx = optax.chain(
      ...     jaxdp.privatize(l2_clip_norm=1.0, noise_multiplier=1.1,
      ...                     expected_batch_size=256, key=jaxdp.new_secret()),
      ...     optax.sgd(0.5))
    """
    stddev, expected_batch_size, key = _check_privatize_args(l2_clip_norm, noise_multiplier, expected_batch_size, key)

    def init_fn(params):
        del params
        return PrivatizeState(key=key)

    def update_fn(updates, state, params=None):
        del params
        new_key, noise_key = jax.random.split(state.key)
        noisy = add_noise(noise_key, updates, stddev) if stddev > 0 else updates
        mean = jax.tree_util.tree_map(lambda g: g / expected_batch_size, noisy)
        return mean, PrivatizeState(key=new_key)

    return optax.GradientTransformation(init_fn, update_fn)


class BandedPrivatizeState(NamedTuple):
    """State of :func:`privatize_banded`.

    Attributes:
      key: the noise key, split once per step (as in :class:`PrivatizeState`).
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
    """Like :func:`privatize`, with noise correlated across steps by a b-banded Toeplitz strategy (BandMF).

    With strategy coefficients ``c = (c_0, ..., c_{b-1})`` (‖c‖₂ = 1, ``c_0 > 0``;
    see :mod:`jaxdp.bandmf`) and fresh ``z_t ~ N(0, I)`` per step, step t returns

        (grad_sum_t + σC · w_t) / B,   w_t = (z_t - Σ_{j=1}^{b-1} c_j w_{t-j}) / c_0,

    i.e. the noise stream is ``σC · C^{-1} z`` where ``C`` is the lower-triangular
    Toeplitz matrix with ``C[t, s] = c_{t-s}``: the gradient estimate recovered
    from the released ``C x + σC z`` (Choquette-Choo et al. 2023). Only the last
    ``b - 1`` w's are kept (O(b · model size) memory, inside the jitted step).
    ``c = (1.0,)`` is DP-SGD and reproduces :func:`privatize` bit for bit with
    the same key.

    Guarantee: with per-example clipping to C and ‖c‖₂ = 1, one participation
    moves ``C x`` by at most C, so the mechanism is the one
    :class:`jaxdp.PrivacyPlan` accounts for with b-min-separated (cyclic Poisson)
    sampling. Using b > 1 with ordinary Poisson sampling would break that
    accounting: build it from a plan (``PrivacyPlan(bands=b)``), which refuses that.

    Args:
      l2_clip_norm, noise_multiplier, expected_batch_size, key: as :func:`privatize`.
      coefficients: the strategy ``c`` (e.g.
        :func:`jaxdp.bandmf.optimal_coefficients`), normalised to ‖c‖₂ = 1.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`BandedPrivatizeState`.

    Example:
      >>> import optax, jaxdp
      >>> from jaxdp.bandmf import optimal_coefficients
      >>> tx = optax.chain(
      ...     jaxdp.privatize_banded(l2_clip_norm=1.0, noise_multiplier=1.1, expected_batch_size=256,
      ...                            key=jaxdp.new_secret(), coefficients=optimal_coefficients(1000, 4)),
      ...     optax.sgd(0.5))
    """
    from jaxdp.bandmf import check_coefficients  # host-side math (scipy) stays out of import time

    stddev, expected_batch_size, key = _check_privatize_args(l2_clip_norm, noise_multiplier, expected_batch_size, key)
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
        z = _standard_normal_like(noise_key, updates)
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
