"""Noise calibration to a target ε, and its inverses (steps or epochs within a budget).

Place in the data path: before it. Calibration runs on the host when a run is
planned and fixes the noise multiplier σ that :func:`jaxdp.privatize` then uses;
:func:`smallest_sigma` is the root-finder shared with attack-risk calibration
(:mod:`jaxdp.accounting._risk`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scipy import optimize

from jaxdp import rules
from jaxdp.accounting._base import TooCostly, make_accountant, require_upper_bound
from jaxdp.accounting._gdp import gdp_epsilon, gdp_mu
from jaxdp.sampling import steps_per_epoch

__all__ = ["calibrate_noise_multiplier", "check_steps", "max_epochs", "max_steps", "smallest_sigma"]

_DIRECT_LIMIT = 2**20  # max_steps evaluates ε at its limit first only up to this many steps


def check_steps(steps, name: str = "steps") -> int:
    """The number of steps a calibration targets: an int >= 1 (a NumPy integer is not accepted)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}={steps!r} must be an int >= 1.")
    return steps


def smallest_sigma(value: Callable[[float], float], target: float, *, guess: float, rtol: float, what: str) -> float:
    """Smallest σ (to relative ``rtol``) with ``value(σ) <= target``; ``value`` must fall as σ grows.

    Brent's method on log σ from a bracket around ``guess`` (a few evaluations of
    the accountant instead of a full bisection), then a guard that the returned
    σ really meets the target.
    """
    if not (math.isfinite(guess) and guess > 0):
        guess = 1.0

    def f(log_sigma):
        return value(math.exp(log_sigma)) - target

    lo, hi = math.log(guess) - 0.2, math.log(guess) + 0.2
    f_lo, f_hi = f(lo), f(hi)
    while f_hi > 0:  # not enough noise yet at hi
        lo, f_lo = hi, f_hi
        hi += 0.7
        if hi > math.log(1e5):
            raise ValueError(f"no noise multiplier up to 1e5 reaches {what}; loosen the target or take fewer steps.")
        f_hi = f(hi)
    while f_lo <= 0:  # lo already meets the target: go lower
        hi, f_hi = lo, f_lo
        lo -= 0.7
        if lo < math.log(1e-4):
            return math.exp(hi)
        f_lo = f(lo)
    root = optimize.brentq(f, lo, hi, xtol=rtol / 4, rtol=1e-12)
    sigma = math.exp(root) * (1 + rtol / 2)
    while value(sigma) > target:
        sigma *= 1 + rtol / 2
    return sigma


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    accountant: str = "rdp",
    rtol: float = 1e-4,
    sampling: str = "poisson",
    bands: int = 1,
    allow_approximation: bool = False,
) -> float:
    """Smallest noise multiplier σ whose run spends at most ``target_epsilon``.

    Root-finding in log σ (Brent) over the named accountant's ε(δ) after ``steps``
    steps, started from the CLT (gdp) estimate. For amplified banded MF pass
    ``sampling="cyclic_poisson"``, ``bands=b`` and the per-group sampling rate.

    Returns:
      σ such that ε(σ) <= target_epsilon, and σ / (1 + rtol) does not meet the
      target (so σ is the smallest to relative tolerance ``rtol``, default 1e-4).

    Raises:
      ValueError: for non-positive or non-finite targets, δ outside (0, 1) or
        above q (:func:`jaxdp.accounting.check_delta`), a sampling rate outside
        (0, 1], steps < 1, or an unreachable target.

    Example:
      >>> round(calibrate_noise_multiplier(3.0, 1e-5, 0.01, 10000), 3)
      1.662
    """
    eps = rules.check_target_epsilon(target_epsilon, allow_none=False)
    q = rules.check_sampling_rate(sampling_rate)
    check_steps(steps)
    delta = rules.check_delta(delta, sampling_rate=q)
    require_upper_bound(accountant, allow_approximation)

    def epsilon(sigma):
        acc = make_accountant(accountant, sampling_rate=q, noise_multiplier=sigma, sampling=sampling, bands=bands)
        return acc.epsilon_for(delta, steps)

    return smallest_sigma(
        epsilon,
        eps,
        guess=_clt_guess(eps, delta, q, -(-steps // bands) if sampling == "cyclic_poisson" else steps),
        rtol=rtol,
        what=f"epsilon={eps} at delta={delta} in {steps} steps",
    )


def _clt_guess(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    """σ at which the CLT (gdp) reaches the target: a cheap starting point, not a result."""

    def meets(sigma):
        try:
            return gdp_epsilon(gdp_mu(q, sigma, steps), delta) <= target_epsilon
        except (OverflowError, ValueError, ZeroDivisionError):
            return False  # σ so small that μ overflows: far from meeting any target

    lo, hi = 1e-2, 1e3
    if meets(lo) or not meets(hi):
        return 1.0
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi


def max_steps(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    noise_multiplier: float,
    *,
    accountant: str = "rdp",
    limit: int = 10**8,
    sampling: str = "poisson",
    bands: int = 1,
    allow_approximation: bool = False,
) -> int:
    """Largest number of steps (at most ``limit``) whose ε stays <= ``target_epsilon``.

    0 if even one step exceeds the target.
    """
    eps = rules.check_target_epsilon(target_epsilon, allow_none=False)
    q = rules.check_sampling_rate(sampling_rate)
    delta = rules.check_delta(delta, sampling_rate=q)
    require_upper_bound(accountant, allow_approximation)
    acc = make_accountant(
        accountant,
        sampling_rate=q,
        noise_multiplier=noise_multiplier,
        sampling=sampling,
        bands=bands,
    )

    def ok(t):
        return acc.epsilon_for(delta, t) <= eps

    if not ok(1):
        return 0
    # A first look at ``limit`` settles the usual case (a run's planned steps fit) in one evaluation. Not for
    # huge limits (the default 1e8): pld's and prv's cost grows with the steps, so search up from one step.
    try:
        if limit <= _DIRECT_LIMIT and ok(limit):
            return limit
    except TooCostly:  # e.g. prv's grid for ``limit`` steps would not fit in memory
        pass
    lo, hi = 1, min(2, limit)
    while ok(hi):
        lo, hi = hi, min(hi * 2, limit)
    while hi - lo > 1:  # ok(lo) and not ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_epochs(
    target_epsilon: float,
    delta: float,
    dataset_size: int,
    batch_size: int,
    noise_multiplier: float,
    *,
    accountant: str = "rdp",
) -> int:
    """Whole epochs allowed within ``target_epsilon``, with training's epoch (round(N / B) steps)."""
    steps = max_steps(target_epsilon, delta, batch_size / dataset_size, noise_multiplier, accountant=accountant)
    return steps // steps_per_epoch(dataset_size, batch_size)
