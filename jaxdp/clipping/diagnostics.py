"""After the clip: diagnostics of the per-example norms (statistics, fraction clipped, the clipping bias bound).

Reads the norms :func:`jaxdp.clipped_grad` reports (``return_norms=True``); it takes
no part in the clipped sum or its privacy, and what it returns is not private.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxdp import rules

__all__ = ["gradient_norm_stats"]


def gradient_norm_stats(
    norms: Any, example_mask: Any, *, l2_clip_norm: float, quantiles: Sequence[float] = (0.1, 0.5, 0.9)
) -> dict[str, jax.Array]:
    """Clipping diagnostics of one step (or of many pooled): norm statistics and the clipping bias bound.

    Clipping example i changes its gradient by exactly ``max(0, ||g_i|| - C)`` in
    norm, so the clipped mean is at most ``mean_i max(0, ||g_i|| - C)`` away from
    the unclipped mean (the *bias bound*, Knolle et al. 2023). Works under
    ``jax.jit`` and on NumPy arrays.

    Args:
      norms: per-example gradient norms before clipping, e.g. ``aux.norms`` of a
        :func:`clipped_grad` built with ``return_norms=True``.
      example_mask: 0/1 per example; masked and non-finite norms are left out.
      l2_clip_norm: the clipping bound C.
      quantiles: which quantiles of the norm to report, distinct, in [0, 1] (keys
        ``grad_norm_q10``, ``grad_norm_q50``, ``grad_norm_q99.5`` ...).

    Returns:
      ``{"grad_norm_mean", "grad_norm_qNN"..., "fraction_clipped", "clip_bias_bound",
      "examples"}`` as scalars (NaN statistics when no example counts).

    Privacy: these are computed from private data without noise; they are not
    covered by ε (debugging and research only; do not publish them).

    Example:
      >>> import jax.numpy as jnp, jaxdp
      >>> s = jaxdp.gradient_norm_stats(jnp.array([0.5, 3.0, 9.0]), jnp.array([1, 1, 0]), l2_clip_norm=1.0)
      >>> float(s["clip_bias_bound"]), float(s["fraction_clipped"])
      (1.0, 0.5)
    """
    clip = rules.check_clip_norm(l2_clip_norm)
    keys = [f"grad_norm_q{100 * q:g}" for q in quantiles]
    if not all(0 <= q <= 1 for q in quantiles) or len(set(keys)) != len(keys):
        raise ValueError(f"quantiles={tuple(quantiles)!r} must be distinct numbers in [0, 1], e.g. (0.1, 0.5, 0.9).")
    norms = jnp.asarray(norms, jnp.float32)
    counted = (jnp.asarray(example_mask) > 0) & jnp.isfinite(norms)
    n = jnp.sum(counted)
    safe = jnp.where(counted, norms, 0.0)
    denom = jnp.where(n > 0, n, jnp.nan)
    stats = {
        "grad_norm_mean": jnp.sum(safe) / denom,
        "fraction_clipped": jnp.sum(counted & (norms > clip)) / denom,
        "clip_bias_bound": jnp.sum(jnp.maximum(safe - clip, 0.0)) / denom,
        "examples": n.astype(jnp.int32),
    }
    values = jnp.nanquantile(jnp.where(counted, norms, jnp.nan), jnp.asarray(quantiles, jnp.float32))
    stats.update(zip(keys, values, strict=True))
    return stats
