"""Gaussian noise for clipped gradient sums, as plain functions and optax transforms."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

__all__ = ["PrivatizeState", "add_noise", "privatize"]


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
      >>> noisy = jaxdp.add_noise(jax.random.key(0), {"w": jnp.zeros(3)}, 1.0)
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
        # Draw and add in at least float32, round once at the end: a bfloat16/float16
        # draw would be a coarse, far-from-Gaussian sample, while rounding the noisy
        # value is post-processing.
        wide = jnp.promote_types(leaf.dtype, jnp.float32)
        real_dtype = jnp.finfo(wide).dtype
        if jnp.iscomplexobj(leaf):
            kr, ki = jax.random.split(k)
            re = jax.random.normal(kr, leaf.shape, real_dtype)
            im = jax.random.normal(ki, leaf.shape, real_dtype)
            noise = jax.lax.complex(re, im)
        else:
            noise = jax.random.normal(k, leaf.shape, real_dtype)
        out.append((leaf.astype(wide) + stddev * noise).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


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
      key: PRNG key (or int seed) for the noise. It must be **secret**: anyone
        who knows it can recompute and subtract the noise. In real runs draw it
        from OS entropy (``jaxdp.train.privacy_seed(None)``).

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import optax, jaxdp
      >>> tx = optax.chain(
      ...     jaxdp.privatize(l2_clip_norm=1.0, noise_multiplier=1.1,
      ...                     expected_batch_size=256, key=0),
      ...     optax.sgd(0.5))
    """
    clip = _check_nonneg("l2_clip_norm", l2_clip_norm, "pass the clipping bound C used by clipped_grad.")
    if clip == 0:
        raise ValueError(
            f"l2_clip_norm={l2_clip_norm!r} makes every gradient zero; pass the clipping bound C > 0 used by "
            "clipped_grad (e.g. 1.0)."
        )
    sigma = _check_nonneg("noise_multiplier", noise_multiplier, "pass sigma >= 0 (e.g. 1.0).")
    if isinstance(expected_batch_size, np.integer):
        expected_batch_size = int(expected_batch_size)
    if isinstance(key, np.integer):
        key = int(key)
    if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size < 1:
        raise ValueError(
            f"expected_batch_size={expected_batch_size!r} must be a positive int: the public expected "
            "batch size (sampling rate x dataset size) that the noisy sum is divided by."
        )
    stddev = sigma * clip

    def init_fn(params):
        del params
        k = jax.random.key(key) if isinstance(key, int) else key
        return PrivatizeState(key=k)

    def update_fn(updates, state, params=None):
        del params
        new_key, noise_key = jax.random.split(state.key)
        noisy = add_noise(noise_key, updates, stddev) if stddev > 0 else updates
        mean = jax.tree_util.tree_map(lambda g: g / expected_batch_size, noisy)
        return mean, PrivatizeState(key=new_key)

    return optax.GradientTransformation(init_fn, update_fn)
