"""``gdp``: μ-Gaussian DP of Poisson-subsampled Gaussian steps by the central limit theorem.

Bu, Dong, Long & Su (2020), "Deep learning with Gaussian differential privacy":
T steps with sampling rate q and noise multiplier σ are approximately μ-GDP with

    μ = q · sqrt(T · (exp(1/σ²) − 1)),

and μ-GDP is (ε, δ(ε))-DP for every ε with
δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2).

When it is accurate: many steps (T in the thousands), small q (q·sqrt(T) of
order one) and σ not much below 1 — the regime of the CLT. When it is not: few
steps, large q, or small σ; there it can *under*-state ε (it is an
approximation, not a bound; Dong et al. 2021 show the CLT can be optimistic).
So ``gdp`` is for reporting and comparison: :func:`jaxdp.train.train` refuses
to rely on it (``is_upper_bound = False``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special, stats

from jaxdp.accounting._base import Accountant, register_accountant

__all__ = ["GdpAccountant", "gdp_delta", "gdp_epsilon", "gdp_mu"]


def gdp_mu(sampling_rate: float, noise_multiplier: float, steps: int) -> float:
    """CLT μ of ``steps`` Poisson-subsampled Gaussian steps."""
    return sampling_rate * math.sqrt(steps * math.expm1(1.0 / noise_multiplier**2))


def gdp_delta(mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP (computed in log space, stable for large ε)."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = special.log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    return float(np.exp(a) * -np.expm1(b - a)) if a > b else 0.0


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest ε >= 0 with δ(ε) <= delta for μ-GDP."""
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(mu, hi) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-10))


def gdp_tpr(mu: float, fpr: float) -> float:
    """Best membership-inference TPR at a given FPR for μ-GDP: Φ(Φ⁻¹(fpr) + μ)."""
    return float(stats.norm.cdf(stats.norm.ppf(fpr) + mu))


class GdpAccountant(Accountant):
    """μ-GDP by the CLT (an approximation; see the module docstring for when it holds)."""

    is_upper_bound = False

    def mu(self, steps: int | None = None) -> float:
        return gdp_mu(self.sampling_rate, self.noise_multiplier, self.steps if steps is None else steps)

    def epsilon_for(self, delta: float, steps: int) -> float:
        return gdp_epsilon(self.mu(steps), delta)

    def delta_for(self, epsilon: float, steps: int) -> float:
        return gdp_delta(self.mu(steps), epsilon)


register_accountant("gdp", GdpAccountant)
