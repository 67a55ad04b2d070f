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
* :mod:`jaxdp.nnx` — the Flax NNX front end (``from jaxdp import nnx as dpnnx``):
  ``value_and_clipped_grad`` (the private ``nnx.value_and_grad``), ``make_private_step``
  and ``private_step`` (one Poisson draw with an ``nnx.Optimizer``).

Importing :mod:`jaxdp` is cheap: each name above is imported on first use
(PEP 562 module ``__getattr__``), so ``jaxdp --help`` and ``import jaxdp.config``
never load JAX; ``from jaxdp import clipped_grad`` imports JAX then.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
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
    from jaxdp.step import (
        PrivateStep,
        TrainState,
        init_state,
        make_nonprivate_step,
        make_private_step,
        run_private_step,
    )

__version__ = "0.1.0"

# Public name -> the module it lives in (the same imports as the TYPE_CHECKING block above;
# tests/test_cli_startup.py checks that the two agree).
_HOMES = {
    "CLIPPING_IMPLS": "jaxdp.clipping",
    "ClippedGradAux": "jaxdp.clipping",
    "ClippedGradFn": "jaxdp.clipping",
    "ExampleGradFn": "jaxdp.clipping",
    "GhostUnsupported": "jaxdp.clipping",
    "clipped_grad": "jaxdp.clipping",
    "gradient_norm_stats": "jaxdp.clipping",
    "per_example_norms": "jaxdp.clipping",
    "key_from_secret": "jaxdp.keys",
    "new_secret": "jaxdp.keys",
    "BandedPrivatizeState": "jaxdp.noise",
    "PrivatizeState": "jaxdp.noise",
    "add_noise": "jaxdp.noise",
    "privatize": "jaxdp.noise",
    "privatize_banded": "jaxdp.noise",
    "conjugate_complex": "jaxdp.optimizers",
    "dp_optimizer": "jaxdp.optimizers",
    "PrivacyPlan": "jaxdp.plan",
    "CyclicPoissonSampler": "jaxdp.sampling",
    "PoissonSampler": "jaxdp.sampling",
    "PrivateStep": "jaxdp.step",
    "TrainState": "jaxdp.step",
    "init_state": "jaxdp.step",
    "make_nonprivate_step": "jaxdp.step",
    "make_private_step": "jaxdp.step",
    "run_private_step": "jaxdp.step",
}
# Subpackages reachable as attributes after a bare ``import jaxdp`` (as when the package imported them eagerly).
_SUBMODULES = (
    "accounting",
    "audit",
    "clipping",
    "config",
    "data",
    "distributed",
    "keys",
    "metrics",
    "models",
    "nnx",
    "noise",
    "optimizers",
    "plan",
    "rules",
    "sampling",
    "step",
    "train",
)

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


def __getattr__(name: str):
    """Import a public name (or a subpackage) on first use and cache it in the package (PEP 562)."""
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    elif name in _SUBMODULES or (not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}")):
        value = importlib.import_module(f"{__name__}.{name}")  # any submodule, as after ``import jaxdp.<name>``
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
