"""jaxdp: fast differentially private training in JAX.

Public API (everything else is an implementation detail):

* :func:`clipped_grad` — sum of per-example clipped gradients of any batch loss
  (optionally of a per-example gradient estimator, ``example_grad=``).
* :func:`gradient_norm_stats` — clipping diagnostics: norm statistics, fraction
  clipped and the clipping bias bound.
* :func:`add_noise`, :func:`privatize` — Gaussian noise, as a function and as an
  optax ``GradientTransformation`` that yields the noisy average.
* :class:`PrivacyPlan` — the frozen object tying sampler, clipping, noise and
  accounting together.
* :class:`PoissonSampler` — Poisson sampling with static padded shapes + masks.
"""

from jaxdp.clipping import (
    ClippedGradAux,
    ClippedGradFn,
    ExampleGradFn,
    clipped_grad,
    gradient_norm_stats,
    per_example_norms,
)
from jaxdp.noise import PrivatizeState, add_noise, privatize
from jaxdp.optimizers import conjugate_complex, dp_optimizer
from jaxdp.plan import PrivacyPlan
from jaxdp.sampling import PoissonSampler

__version__ = "0.1.0"

__all__ = [
    "ClippedGradAux",
    "ClippedGradFn",
    "ExampleGradFn",
    "PoissonSampler",
    "PrivacyPlan",
    "PrivatizeState",
    "add_noise",
    "clipped_grad",
    "conjugate_complex",
    "dp_optimizer",
    "gradient_norm_stats",
    "per_example_norms",
    "privatize",
]
