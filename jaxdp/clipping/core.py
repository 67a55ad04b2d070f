"""The clip itself: per-example squared norms -> clip factors -> the scaled, masked sum.

Both paths end here. The vmap path (:mod:`jaxdp.clipping.vmap`) gives it every
example's gradient; the ghost path (:mod:`jaxdp.clipping.ghost`) gives it per-leaf
squared norms (with upper bounds under rounding) taken without them. The factors
decide what each example adds to the sum, so the guarantees of
:func:`jaxdp.clipped_grad` are kept here: an example's clipped gradient has norm
``<= C``; a masked or non-finite example adds exactly zero; a zero gradient stays
zero; sums are formed in at least float32.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = [
    "ChunkSum",
    "ClipFactors",
    "clip_factors",
    "per_example_norms",
    "rounding_slack",
    "sum_of_squares_slack",
    "scaled_sum",
    "sq_norm_and_bound",
    "sq_norm_per_example",
    "two_stage_sum",
]


class ClipFactors(NamedTuple):
    """What :func:`clip_factors` decides for a chunk of B examples.

    Attributes:
      factors: one ``(B,)`` clip factor in ``[0, 1]`` per parameter leaf (the same
        array for every leaf unless clipping per layer).
      keep: ``(B,)`` bool, the examples that count: unmasked and finite.
      norms: ``(B,)`` per-example gradient norms before clipping (``inf``/``nan``
        where non-finite).
      stats: ``(num_clipped, num_nonfinite)`` over the unmasked examples, int32.
    """

    factors: list[jax.Array]
    keep: jax.Array
    norms: jax.Array
    stats: tuple[jax.Array, jax.Array]


class ChunkSum(NamedTuple):
    """One chunk of examples clipped and summed: what either path returns and the microbatch scan adds up."""

    grad_sum: PyTree
    loss: jax.Array
    aux: Any
    norms: jax.Array
    stats: tuple[jax.Array, jax.Array]


def sq_norm_per_example(leaf: jax.Array) -> jax.Array:
    """Squared L2 norm of each example's slice of ``leaf`` (complex: |re|^2 + |im|^2), summed in two stages: rows of
    about sqrt(n) of its n entries, then the rows (:func:`sum_of_squares_slack` bounds its rounding)."""
    leaf = jnp.abs(leaf) if jnp.iscomplexobj(leaf) else leaf
    leaf = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
    b, n = leaf.shape[0], math.prod(leaf.shape[1:])
    r, c = _rows(n)
    x = leaf.reshape(b, n)
    if r * c > n:  # no divisor near sqrt(n): zeros (exact) to a balanced shape
        x = jnp.pad(x, ((0, 0), (0, r * c - n)))
    return two_stage_sum(jnp.square(x.reshape(b, r, c)))


def two_stage_sum(terms: jax.Array) -> jax.Array:
    """``sum_{i,j} terms[b, i, j]`` per example as r sums of c terms, then one sum of r: the barrier keeps XLA
    from fusing them into one reduction of r c terms, whose rounding bound grows with r c instead of r + c."""
    rows = jax.lax.optimization_barrier(jnp.sum(terms, axis=2))
    return jnp.sum(rows, axis=1)


def sq_norm_and_bound(per_example: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(:func:`sq_norm_per_example`, an upper bound of it under rounding for the clip factor) of per-example
    gradients ``(B, ...)``: the rounding of its own sum of squares (:func:`sum_of_squares_slack`) and, below
    float32, of the gradient held in its dtype (:func:`rounding_slack`)."""
    sq = sq_norm_per_example(per_example)
    dtype = per_example.dtype
    return sq, sq * (rounding_slack(dtype) * sum_of_squares_slack(per_example.shape, dtype))


def _rows(n: int) -> tuple[int, int]:
    """(r, c), r c >= n, both near sqrt(n): the shape :func:`sq_norm_per_example` sums n entries in (c a divisor of
    n where one is within 4x of sqrt(n), else the entries padded with zeros)."""
    root = math.isqrt(n)
    c = max(d for d in range(1, root + 1) if n % d == 0)
    if 4 * c < root:
        c = root + 1
    return -(-n // c), c


def sum_of_squares_slack(shape, dtype) -> float:
    """The factor :func:`sq_norm_per_example` of a ``(B, ...)`` leaf may round low by: r rows of c squares (each
    square and each sum rounded) are off by at most (gamma_c + gamma_r + u) of the sum (nonnegative terms), and
    twice that covers the gamma denominators. Without it, a float32 sum of 1,024 squares came out 2e-6 low on
    XLA's CPU backend (summed in sequence), and an example contributed 1.000001 C."""
    u = float(jnp.finfo(jnp.promote_types(dtype, jnp.float32)).eps) / 2
    r, c = _rows(math.prod(shape[1:]))
    return 1 + 2 * (r + c + 2) * u


def rounding_slack(dtype) -> float:
    """The factor a squared norm is inflated by, for the clip factor, when a gradient is held in ``dtype``.

    A gradient below float32 (bfloat16, float16) may be rounded to its dtype in one XLA
    fusion and kept wider in another: the norm may then be taken of one rounding and the
    sum formed of the other, which differ by up to half an ulp per element, a relative
    ``eps / 2`` in norm. Measured: float16 parameters clipped to 1.00045 C when XLA's
    CPU backend ran at optimisation level 0 (``XLA_FLAGS=--xla_backend_optimization_level=0``),
    which fuses differently; a GPU's fusions differ again. Dividing by ``(1 + eps)`` times
    the norm keeps every clipped gradient below C whichever rounding the sum sees (it
    clips at most ``eps`` = 0.1% (float16) or 0.8% (bfloat16) tighter); float32 and wider: 1.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize >= 4:
        return 1.0
    return (1.0 + float(jnp.finfo(dtype).eps)) ** 2


def clip_factors(
    leaf_sq: list[jax.Array],
    mask: jax.Array,
    *,
    l2_clip_norm: float,
    per_layer: bool,
    leaf_bound: list[jax.Array] | None = None,
) -> ClipFactors:
    """Clip factors per leaf, the kept examples, the norms and the counters, from per-leaf squared norms.

    Args:
      leaf_sq: per parameter leaf, the ``(B,)`` squared norms of each example's gradient of it.
      mask: ``(B,)``; an example counts when ``mask > 0``.
      l2_clip_norm: the clipping bound C.
      per_layer: clip each of the K leaves to ``C / sqrt(K)`` (the total stays ``<= C``)
        instead of the whole gradient to C.
      leaf_bound: upper bounds of the squared norms under rounding (ghost: the formulas' error; vmap:
        :func:`rounding_slack` of low-precision gradients), used for
        the factors; the reported norms stay the estimates ``leaf_sq``.
    """
    leaf_bound = leaf_sq if leaf_bound is None else leaf_bound
    total_sq, total_bound = sum(leaf_sq), sum(leaf_bound)
    # The K - 1 additions of the leaves' bounds may round low by gamma_K of the total: one leaf near C^2 and
    # many tiny ones whose squares fall under half an ulp of it reached 1.00006 C at K = 2,000 in review.
    u = float(jnp.finfo(jnp.result_type(total_bound)).eps) / 2
    total_bound = total_bound * (1 + 2 * (len(leaf_bound) + 1) * u)
    # A closed-form estimate whose terms cancel can round below zero: that example is finite
    # (its bound, not the estimate, sets the factor), never dropped as NaN.
    norms = jnp.sqrt(jnp.maximum(total_sq, 0.0))
    bound = jnp.sqrt(jnp.maximum(total_bound, 0.0))
    finite = jnp.isfinite(total_sq) & jnp.isfinite(total_bound)
    if per_layer:
        # Each of the K leaves gets budget C / sqrt(K): the total stays <= C.
        budget = l2_clip_norm / math.sqrt(len(leaf_sq))
        factors = [jnp.minimum(1.0, budget / jnp.maximum(jnp.sqrt(jnp.maximum(s, 0.0)), 1e-30)) for s in leaf_bound]
        clipped_any = sum((f < 1.0).astype(jnp.int32) for f in factors) > 0
    else:
        factor = jnp.minimum(1.0, l2_clip_norm / jnp.maximum(bound, 1e-30))
        factors = [factor] * len(leaf_sq)
        clipped_any = factor < 1.0
    keep = finite & (mask > 0)
    unmasked = mask > 0
    stats = (
        jnp.sum(clipped_any & finite & unmasked).astype(jnp.int32),
        jnp.sum(~finite & unmasked).astype(jnp.int32),
    )
    return ClipFactors(factors, keep, norms, stats)


def scaled_sum(
    per_example: jax.Array, factor: jax.Array, keep: jax.Array, finite: jax.Array | None = None
) -> jax.Array:
    """``sum_i factor_i * g_i`` over the kept examples of a (B, ...) leaf.

    ``finite`` (optional, (B,) bool): examples whose gradient is known to hold no NaN/inf (a finite sum of its
    squares, :func:`sq_norm_per_example`, says so). When every example is kept or known finite, the sum is one
    product of the factors (0 for a dropped example) with the gradients: a dropped example then contributes
    ``0 * g = 0`` exactly. Otherwise the dropped examples' rows are set to zero first (a copy of the whole batch's
    gradients: DP MNIST CNN, batch 256, 8 MB for its second convolution) and the same product taken, so that a
    dropped NaN/inf contributes exactly zero and the result is bit for bit the same whichever way ran: what the
    dropped (masked) examples hold never shows in the sum, not even in its rounding.
    """
    # Scale and sum in at least float32: in bfloat16 the rounding of
    # g * (C / ||g||) can land above C (measured: 1.0028 for C = 1).
    per_example = per_example.astype(jnp.promote_types(per_example.dtype, jnp.float32))
    w = jnp.where(keep, factor, 0.0).astype(per_example.real.dtype)
    shape = (-1,) + (1,) * (per_example.ndim - 1)

    def selected():
        # `where` (not a multiply) so a NaN/inf gradient of a dropped example
        # contributes exactly zero instead of NaN.
        contrib = jnp.where(keep.reshape(shape), per_example * w.reshape(shape), jnp.zeros((), per_example.dtype))
        return jnp.sum(contrib, axis=0)

    if finite is None or jnp.iscomplexobj(per_example):
        return selected()

    def product(g):
        return jnp.tensordot(w, g, axes=1, precision=jax.lax.Precision.HIGHEST)

    def zeroed_product():
        # The dropped examples' rows set to zero, written out, then the very same product as the branch above.
        # Which branch runs depends on the dropped examples' data (are they finite?), so the two must agree bit
        # for bit: a finite dropped row adds w_i * g_i = +-0 to the sum, a zeroed row adds 0 * 0, and the products
        # and their order are the same.
        # The `where` + sum above rounds in another order (seen at XLA's default optimisation level). The barrier
        # asks that the select not be fused into the product (another kernel, maybe another order); XLA's CPU
        # backend keeps the dot apart from the select with or without it (checked in the compiled HLO), and the
        # test (test_scaled_sum_bits_do_not_depend_on_what_dropped_examples_hold) checks the bits either way.
        zeroed = jnp.where(keep.reshape(shape), per_example, jnp.zeros((), per_example.dtype))
        return product(jax.lax.optimization_barrier(zeroed))

    return jax.lax.cond(jnp.all(keep | finite), lambda: product(per_example), zeroed_product)


def per_example_norms(per_example_grads: PyTree) -> jax.Array:
    """L2 norm of each example's gradient over all leaves of a batched pytree.

    Args:
      per_example_grads: pytree whose leaves have a leading example axis.

    Returns:
      ``(batch,)`` float array. Complex leaves count real and imaginary parts.
    """
    leaves = jax.tree_util.tree_leaves(per_example_grads)
    if not leaves:
        raise ValueError("per_example_grads has no leaves: there is nothing to take the norm of.")
    return jnp.sqrt(sum(sq_norm_per_example(leaf) for leaf in leaves))
