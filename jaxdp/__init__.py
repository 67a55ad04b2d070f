"""jaxdp: fast differentially private training in JAX.

Public API (everything else is an implementation detail):

* :func:`clipped_grad` — sum of per-example clipped gradients of any batch loss
  (optionally of a per-example gradient estimator, ``example_grad=``).
* :func:`gradient_norm_stats` — clipping diagnostics: norm statistics, fraction
  clipped and the clipping bias bound.
* :func:`add_noise`, :func:`privatize` — Gaussian noise, as a function and as an
  optax ``GradientTransformation`` that yields the noisy average;
  :func:`privatize_banded` — the same with noise correlated across steps by a
  banded matrix factorization (BandMF; strategies in :mod:`jaxdp.noise.bandmf`).
* :func:`new_secret`, :func:`key_from_secret` — a 128-bit secret from the OS and
  the noise key built from all of its bits (never ``jax.random.key(int)``, which
  keeps 32 bits with x64 off).
* :class:`PrivacyPlan` — the frozen object tying sampler, clipping, noise and
  accounting together (:meth:`PrivacyPlan.from_target` calibrates σ to an ε);
  every privacy rule it applies is one function of :mod:`jaxdp.rules`.
* :func:`make_private_step`, :func:`run_private_step`, :class:`TrainState` — one
  private step over a whole Poisson draw (every chunk clipped and summed, the
  noise added once, the optimizer applied, the accountant stepped); the loop of
  ``jaxdp train``, the audit and the benchmarks all run it.
* :class:`PoissonSampler` — Poisson sampling with static padded shapes + masks;
  :class:`CyclicPoissonSampler` — its b-group cyclic variant for BandMF.
"""

from jaxdp import rules
from jaxdp.clipping import (
    CLIPPING_IMPLS,
    ClippedGradAux,
    ClippedGradFn,
    ExampleGradFn,
    GhostUnsupported,
    clipped_grad,
    gradient_norm_stats,
    per_example_norms,
)
from jaxdp.keys import key_from_secret, new_secret
from jaxdp.noise import BandedPrivatizeState, PrivatizeState, add_noise, privatize, privatize_banded
from jaxdp.optimizers import conjugate_complex, dp_optimizer
from jaxdp.plan import PrivacyPlan
from jaxdp.sampling import CyclicPoissonSampler, PoissonSampler
from jaxdp.step import PrivateStep, TrainState, init_state, make_nonprivate_step, make_private_step, run_private_step

__version__ = "0.1.0"

__all__ = [
    "CLIPPING_IMPLS",
    "BandedPrivatizeState",
    "ClippedGradAux",
    "ClippedGradFn",
    "CyclicPoissonSampler",
    "ExampleGradFn",
    "GhostUnsupported",
    "PoissonSampler",
    "PrivacyPlan",
    "PrivateStep",
    "TrainState",
    "PrivatizeState",
    "add_noise",
    "clipped_grad",
    "conjugate_complex",
    "dp_optimizer",
    "gradient_norm_stats",
    "init_state",
    "key_from_secret",
    "make_nonprivate_step",
    "make_private_step",
    "new_secret",
    "per_example_norms",
    "privatize",
    "privatize_banded",
    "rules",
    "run_private_step",
]
