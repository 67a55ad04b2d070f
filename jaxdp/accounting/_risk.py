"""Membership-inference risk read off the privacy profile, and calibration to it.

A run that is (ε, δ(ε))-DP for every ε (its *privacy profile*) limits any
membership-inference attack: at false-positive rate α its true-positive rate is
at most

    TPR(α) = min over ε of  min(1, δ(ε) + e^ε α, 1 − e^(−ε) (1 − δ(ε) − α)),

and the attacker's maximal advantage TPR − FPR is δ(0). (Kaissis et al. 2023,
"Bounding data reconstruction attacks with the hypothesis testing
interpretation of DP"; Dong, Roth & Su 2022, f-DP.)

Calibrating to an ε promises TPR(α) <= e^ε α + δ at *every* α at once — the
worst case of a straight line. The subsampled Gaussian's real curve lies well
below that line at small α, so calibrating σ directly to a target TPR at the α
you care about needs less noise than calibrating to the ε with the same
worst-case risk (attack-aware noise calibration; Kulynych et al. 2024).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

from jaxdp import rules
from jaxdp.accounting._base import Accountant, make_accountant, require_upper_bound
from jaxdp.accounting._calibrate import check_steps, smallest_sigma
from jaxdp.accounting._gdp import GdpAccountant, gdp_mu, gdp_tpr

__all__ = ["AttackRisk", "attack_risk", "calibrate_noise_multiplier_for_attack_risk", "tpr_at_fpr"]

_EPS_GRID = np.concatenate([np.linspace(0.0, 2.0, 81), np.linspace(2.05, 30.0, 120)])


class AttackRisk(NamedTuple):
    """Privacy of a run, beyond ε.

    Attributes:
      epsilon, delta: ε at the chosen δ.
      mu_clt: μ-GDP of the run by the central-limit approximation.
      advantage: maximal membership-inference advantage (TPR − FPR) = δ(0).
      tpr_at_fpr: maximal TPR at each requested FPR.
    """

    epsilon: float
    delta: float
    mu_clt: float
    advantage: float
    tpr_at_fpr: dict


def _profile(accountant: Accountant, steps: int) -> np.ndarray:
    if hasattr(accountant, "delta_curve"):
        return np.asarray(accountant.delta_curve(_EPS_GRID, steps), float)
    return np.asarray([accountant.delta_for(float(e), steps) for e in _EPS_GRID], float)


def _tpr_from_profile(deltas: np.ndarray, fpr: float) -> float:
    e = _EPS_GRID
    line = deltas + np.exp(e) * fpr
    other = 1.0 - np.exp(-e) * (1.0 - deltas - fpr)
    return float(np.clip(np.min(np.minimum(line, other)), fpr, 1.0))


def tpr_at_fpr(accountant: Accountant, fpr: float, steps: int | None = None) -> float:
    """Maximal membership-inference TPR at ``fpr`` after ``steps`` (default: composed) steps."""
    steps = accountant.steps if steps is None else steps
    if not 0 < fpr < 1:
        raise ValueError(f"fpr={fpr!r} must lie in (0, 1).")
    if steps == 0:
        return fpr
    if isinstance(accountant, GdpAccountant):
        return gdp_tpr(accountant.mu(steps), fpr)
    return _tpr_from_profile(_profile(accountant, steps), fpr)


def attack_risk(
    accountant: Accountant, *, delta: float, fprs: tuple[float, ...] = (0.01, 0.001), steps: int | None = None
) -> AttackRisk:
    """ε, μ (CLT), maximal advantage and TPR at each FPR for a run.

    Uses the accountant's own privacy profile (PLD: tight; RDP: an upper bound
    via its δ(ε) conversion; GDP: closed form).
    """
    delta = rules.check_delta(delta, sampling_rate=accountant.sampling_rate)
    steps = accountant.steps if steps is None else steps
    mu = gdp_mu(accountant.sampling_rate, accountant.noise_multiplier, steps)
    if steps == 0:
        return AttackRisk(0.0, delta, 0.0, 0.0, {f: f for f in fprs})
    eps = accountant.epsilon_for(delta, steps)
    if isinstance(accountant, GdpAccountant):
        m = accountant.mu(steps)
        advantage = float(math.erf(m / (2 * math.sqrt(2))))  # 2Φ(μ/2) − 1
        tprs = {f: gdp_tpr(m, f) for f in fprs}
    else:
        deltas = _profile(accountant, steps)
        advantage = float(min(1.0, deltas[0]))
        tprs = {f: _tpr_from_profile(deltas, f) for f in fprs}
    return AttackRisk(float(eps), delta, float(mu), advantage, tprs)


def calibrate_noise_multiplier_for_attack_risk(
    target_tpr: float,
    fpr: float,
    sampling_rate: float,
    steps: int,
    *,
    accountant: str = "pld",
    rtol: float = 1e-3,
    allow_approximation: bool = False,
) -> float:
    """Smallest σ whose run keeps membership-inference TPR at ``fpr`` <= ``target_tpr``.

    Example: ``calibrate_noise_multiplier_for_attack_risk(0.05, 0.01, q, T)``
    bounds every attack at 1% FPR to at most 5% TPR.
    """
    target = rules.positive_finite("target_tpr", target_tpr)
    if not 0 < fpr < 1 or not fpr < target <= 1:
        raise ValueError(
            f"need 0 < fpr < target_tpr <= 1; got fpr={fpr!r}, target_tpr={target_tpr!r} "
            "(a TPR at or below the FPR would demand no information at all)."
        )
    q = rules.check_sampling_rate(sampling_rate)
    check_steps(steps)
    require_upper_bound(accountant, allow_approximation)
    # A coarser PLD grid is faster and still pessimistic (an upper bound on risk).
    options = {"value_discretization_interval": 1e-3} if accountant == "pld" else {}

    def tpr(sigma):
        acc = make_accountant(accountant, sampling_rate=q, noise_multiplier=sigma, **options)
        return tpr_at_fpr(acc, fpr, steps)

    # Start where the CLT (μ-GDP, closed form) puts the target TPR.
    mu_target = float(stats.norm.ppf(target) - stats.norm.ppf(fpr))
    guess = 1.0
    if mu_target > 0:
        ratio = (mu_target / q) ** 2 / steps  # = expm1(1/σ²)
        guess = 1.0 / math.sqrt(math.log1p(ratio)) if ratio > 0 else 1.0
    return smallest_sigma(tpr, target, guess=guess, rtol=rtol, what=f"TPR <= {target} at FPR {fpr} in {steps} steps")
