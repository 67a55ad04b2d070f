"""Clipped per-example gradients: the sum of every example's gradient clipped to L2 norm C (sensitivity C).

The one function users need is :func:`clipped_grad`. The data path, one module a step:

* :mod:`jaxdp.clipping.fn` — :func:`clipped_grad` / :class:`ClippedGradFn`: argument
  checks, the choice of path, the microbatch scan;
* :mod:`jaxdp.clipping.vmap` — the vmap path: every example's gradient materialised
  (any model, any :data:`ExampleGradFn`);
* :mod:`jaxdp.clipping.ghost` — the ghost path: the norms from each layer's inputs and
  output gradients, after a check that every parameter is covered
  (:class:`GhostUnsupported` otherwise);
* :mod:`jaxdp.clipping.core` — where both paths end: clip factors from per-example
  squared norms and the scaled, masked sum;
* :mod:`jaxdp.clipping.diagnostics` — :func:`gradient_norm_stats` of the norms reported.
"""

from jaxdp.clipping.core import per_example_norms
from jaxdp.clipping.diagnostics import gradient_norm_stats
from jaxdp.clipping.fn import CLIPPING_IMPLS, ClippedGradAux, ClippedGradFn, batch_argnums, clipped_grad
from jaxdp.clipping.ghost import GhostUnsupported
from jaxdp.clipping.vmap import ExampleGradFn

__all__ = [
    "CLIPPING_IMPLS",
    "ClippedGradAux",
    "ClippedGradFn",
    "ExampleGradFn",
    "GhostUnsupported",
    "batch_argnums",
    "clipped_grad",
    "gradient_norm_stats",
    "per_example_norms",
]
