"""Independent Gaussian noise: the step between the clipped gradient sum and the optimizer (DP-SGD).

Data path: ``clipped_grad`` gives the sum of clipped per-example gradients
(sensitivity C); :func:`privatize` adds ``N(0, (σC)² I)`` to it and divides by
the public expected batch size; the optax optimizer chained after it sees only
that noisy average. :func:`standard_normal_like` is the one source of the
Gaussian draws, shared with the banded privatizer (:mod:`jaxdp.noise.banded`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp import rules
from jaxdp.keys import as_key
from jaxdp.schedule import after

PyTree = Any

__all__ = ["PrivatizeState", "add_noise", "check_privatize_args", "privatize", "standard_normal_like"]


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
    noise = standard_normal_like(key, tree)  # in at least float32
    # Added in at least float32 and rounded once: rounding the noisy value is post-processing.
    return jax.tree_util.tree_map(
        lambda leaf, n: (jnp.asarray(leaf).astype(n.dtype) + stddev * n).astype(jnp.asarray(leaf).dtype), tree, noise
    )


def standard_normal_like(key: jax.Array, tree: PyTree) -> PyTree:
    """N(0, 1) per real coordinate (per part for complex leaves), one key split per leaf.

    The single source of the Gaussian draws of :func:`add_noise` and both
    privatizers, so the same key gives the same ``z`` everywhere. Each draw is
    in at least float32 (a complex64 leaf gets a complex64 draw, a bfloat16 leaf
    a float32 one).

    Raises:
      TypeError: for a leaf that is neither float nor complex.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return tree
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    for leaf in leaves:
        if not (jnp.iscomplexobj(leaf) or jnp.issubdtype(leaf.dtype, jnp.floating)):
            raise TypeError(
                f"add_noise got a leaf of dtype {leaf.dtype}; only float and complex leaves can "
                "carry Gaussian noise. Cast integer leaves to float, or keep them out of the tree."
            )

    def draw(key):
        out = []
        for k, leaf in zip(jax.random.split(key, len(leaves)), leaves, strict=True):
            # Drawn in at least float32: a bfloat16/float16 draw would be a coarse,
            # far-from-Gaussian sample (add_noise rounds once, after adding).
            real_dtype = jnp.finfo(jnp.promote_types(leaf.dtype, jnp.float32)).dtype
            if jnp.iscomplexobj(leaf):
                kr, ki = jax.random.split(k)
                re = jax.random.normal(kr, leaf.shape, real_dtype)
                im = jax.random.normal(ki, leaf.shape, real_dtype)
                out.append(jax.lax.complex(re, im))
            else:
                out.append(jax.random.normal(k, leaf.shape, real_dtype))
        return out

    # Drawn only once every leaf exists (jaxdp.schedule.after: the same draw whatever the leaves hold). Drawn as
    # soon as the key existed, XLA's CPU scheduler drew it while the gradient was still being formed and held
    # its buffers (the threefry bits, twice the model's size) at the step's peak: 44 MB of WRN-16-4's private
    # step at batch 32.
    out = after(leaves, draw, key)
    return jax.tree_util.tree_unflatten(treedef, out)


def check_privatize_args(
    l2_clip_norm: Any, noise_multiplier: Any, expected_batch_size: Any, key: Any
) -> tuple[float, int, jax.Array]:
    """The validated ``(stddev = σC, expected_batch_size, key)`` of a privatizer (:func:`privatize`, banded).

    C and σ go through :func:`jaxdp.rules.check_clip_norm` and
    :func:`jaxdp.rules.check_noise_multiplier`; the key through
    :func:`jaxdp.keys.as_key` (an int secret is used whole); B must be a
    positive int (a NumPy integer is accepted).

    Raises:
      ValueError: naming the bad argument and the fix.
    """
    clip = rules.check_clip_norm(l2_clip_norm)
    sigma = rules.check_noise_multiplier(noise_multiplier)
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
    stddev, expected_batch_size, key = check_privatize_args(l2_clip_norm, noise_multiplier, expected_batch_size, key)

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
