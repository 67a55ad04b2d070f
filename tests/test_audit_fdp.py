"""jaxdp.audit.fdp: the one-run f-DP test against the claimed mechanism's trade-off curve.

Moved from tests/test_audit.py (issue 17) with the module: the trade-off curves, the p-value against pure DP
and against a Monte Carlo of the honest digits mechanism, and the test's power against sigma/2.
"""

import math

import numpy as np
import pytest
from scipy import special, stats

from jaxdp.audit.fdp import (
    DEFAULT_FDP_GUESS_FRACTIONS,
    TradeoffCurve,
    fdp_audit,
    fdp_p_value,
    fdp_rejects,
    noise_ratio_bound,
)
from jaxdp.plan import PrivacyPlan

# Its module-scoped runs are shared by its tests: one xdist worker for the whole module (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("audit_fdp")

DIGITS_N, DIGITS_M = 1437, 1000
# The digits recipe as `jaxdp audit` runs it: N + m rows, q = 512/1437, 120 steps, sigma calibrated to eps = 3.
DIGITS_PLAN = PrivacyPlan(
    dataset_size=DIGITS_N + DIGITS_M,
    batch_size=round(512 / DIGITS_N * (DIGITS_N + DIGITS_M)),
    l2_clip_norm=1.0,
    noise_multiplier=5.969640517652399,
    num_steps=120,
)


@pytest.fixture(scope="module")
def digits_curve():
    return TradeoffCurve.from_plan(DIGITS_PLAN)


def _canary_scores(rng, trials, noise_multiplier, plan=DIGITS_PLAN, m=DIGITS_M):
    """Gradient-canary scores (units of C / B) of ``trials`` runs: exactly what the audit's canaries see.

    Canary j is in with probability 1/2; each of T steps samples it with probability q and adds its clipped
    gradient C on its own coordinate, plus N(0, (sigma C)^2) noise: score = Bin(T, q) [if in] + N(0, sigma^2 T).
    """
    included = rng.random((trials, m)) < 0.5
    signal = rng.binomial(plan.num_steps, plan.sampling_rate, (trials, m)) * included
    return signal + rng.normal(0.0, noise_multiplier * math.sqrt(plan.num_steps), (trials, m)), included


def _correct_guesses(scores, included, guesses):
    """W for each trial when guessing "in" for the top guesses/2 and "out" for the bottom guesses/2."""
    k, m = guesses // 2, scores.shape[1]
    order = np.argsort(-scores, axis=1, kind="stable")
    top = np.take_along_axis(included, order[:, :k], 1).sum(1)
    return top + (~np.take_along_axis(included, order[:, m - k :], 1)).sum(1)


@pytest.mark.parametrize("eps, r, v", [(0.5, 200, 150), (1.0, 100, 85), (1.0, 50, 45), (0.5, 100, 85)])
def test_fdp_p_value_of_pure_dp_is_just_above_the_binomial_tail(eps, r, v):
    # eps-randomised response on each canary is eps-DP and has W ~ Bin(r, e^eps/(1+e^eps)) exactly: a valid
    # bound cannot be below that tail; the f-DP bound of a pure-DP curve is nearly tight (within 25%).
    tail = stats.binom.sf(v - 1, r, special.expit(eps))
    got = fdp_p_value(num_canaries=1000, num_guesses=r, num_correct=v, curve=TradeoffCurve.epsilon_delta(eps))
    assert tail <= got <= 1.25 * tail
    assert fdp_p_value(num_canaries=1000, num_guesses=r, num_correct=r // 2, curve=TradeoffCurve.gaussian(1.0)) == 1


def test_tradeoff_curves(digits_curve):
    alpha = np.linspace(0.0, 1.0, 201)
    for mu in (0.5, 1.35):
        exact = stats.norm.cdf(stats.norm.ppf(1 - alpha) - mu)  # G_mu
        curve = TradeoffCurve.gaussian(mu)
        assert np.all(curve(alpha) <= exact + 1e-12) and np.all(curve(alpha) >= exact - 2e-3)
        for h in (1e-3, 0.01, 0.1, 0.5):  # the blow-up inverse undoes 1 - f
            assert curve.blowup_inverse(1 - float(curve(h))) == pytest.approx(h, abs=2e-3)
    # The plan's curve is at least its own (eps, delta) point's, is weaker with sigma/2, and is 0 without noise.
    eps = DIGITS_PLAN.epsilon(1e-5)
    f_eps = np.maximum.reduce([0 * alpha, 1 - 1e-5 - np.exp(eps) * alpha, np.exp(-eps) * (1 - 1e-5 - alpha)])
    assert np.all(digits_curve(alpha) >= f_eps - 1e-9)
    half = TradeoffCurve.from_plan(DIGITS_PLAN, noise_multiplier=DIGITS_PLAN.noise_multiplier / 2)
    assert np.all(half(alpha) <= digits_curve(alpha) + 1e-9) and half(0.05) < digits_curve(0.05) - 0.1
    assert np.all(TradeoffCurve.from_plan(DIGITS_PLAN, noise_multiplier=0.0)(alpha) == 0)


def test_fdp_p_value_dominates_a_monte_carlo_of_the_honest_mechanism(digits_curve):
    # Independent check of the bound: simulate the honest digits mechanism's canary scores (2000 runs) and
    # compare its tail P[W >= v] with the p-value at the run's likely counts. A bound computed from too
    # private a curve fails the same check: the mechanism at sigma is not f-DP for the curve of 1.25 sigma.
    rng = np.random.default_rng(0)
    scores, included = _canary_scores(rng, 2000, DIGITS_PLAN.noise_multiplier)
    too_private = TradeoffCurve.from_plan(DIGITS_PLAN, noise_multiplier=1.25 * DIGITS_PLAN.noise_multiplier)

    def violations(curve):
        found = []
        for r in (50, 150, 300):
            w = _correct_guesses(scores, included, r)
            for v in np.quantile(w, [0.5, 0.9, 0.99]).astype(int):
                tail = float(np.mean(w >= v))
                p = fdp_p_value(num_canaries=DIGITS_M, num_guesses=r, num_correct=int(v), curve=curve)
                if p < tail - 3 * math.sqrt(tail * (1 - tail) / len(w)):
                    found.append((r, int(v), p, tail))
        return found

    assert violations(digits_curve) == []
    assert len(violations(too_private)) >= 2
    # The test itself: its false-positive rate on the honest mechanism is at most beta (here far below).
    level = 0.05 / len(DEFAULT_FDP_GUESS_FRACTIONS)
    rejected = np.zeros(len(scores), bool)
    for f in DEFAULT_FDP_GUESS_FRACTIONS:
        r = 2 * round(f * DIGITS_M / 2)
        critical = next(
            v
            for v in range(r // 2, r + 2)
            if v > r
            or fdp_rejects(num_canaries=DIGITS_M, num_guesses=r, num_correct=v, curve=digits_curve, level=level)
        )
        rejected |= _correct_guesses(scores, included, r) >= critical
    assert rejected.mean() <= 0.05


@pytest.mark.parametrize("model", ["subsampled_gaussian", "gaussian_scores"])
def test_fdp_test_catches_half_noise_and_passes_the_claim(model, digits_curve):
    # The target at m = 1000: sigma/2 (mu about 1.35 against 0.66) fails >= 4 of 5 runs, the honest
    # mechanism passes >= 19 of 20. Simulated scores, 40 runs each: the digits mechanism against its PLD curve,
    # and plain N(mu, 1) vs N(0, 1) scores against G_0.66.
    rng = np.random.default_rng(1)
    runs = 40
    if model == "subsampled_gaussian":
        curve = digits_curve
        honest = _canary_scores(rng, runs, DIGITS_PLAN.noise_multiplier)
        half = _canary_scores(rng, runs, DIGITS_PLAN.noise_multiplier / 2)
    else:
        curve = TradeoffCurve.gaussian(0.66)
        included = rng.random((2, runs, DIGITS_M)) < 0.5
        honest = (rng.normal(size=(runs, DIGITS_M)) + 0.66 * included[0], included[0])
        half = (rng.normal(size=(runs, DIGITS_M)) + 1.35 * included[1], included[1])
    honest_passed = sum(fdp_audit(s, i, curve).passed for s, i in zip(*honest, strict=True))
    half_failed = sum(not fdp_audit(s, i, curve).passed for s, i in zip(*half, strict=True))
    assert honest_passed >= 38, honest_passed
    assert half_failed >= 32, half_failed


@pytest.mark.parametrize("r, v", [(100, 85), (100, 70), (300, 200), (50, 50)])
def test_fdp_rejects_exactly_at_the_p_value(r, v, digits_curve):
    # The public decision the tests and noise_ratio_bound use agrees with the p-value: rejected at a level
    # just above it, not at a level well below it (the bisection's resolution is 0.1%).
    for curve in (TradeoffCurve.epsilon_delta(1.0), digits_curve):
        p = fdp_p_value(num_canaries=1000, num_guesses=r, num_correct=v, curve=curve)
        args = {"num_canaries": 1000, "num_guesses": r, "num_correct": v, "curve": curve}
        if p < 1:
            assert fdp_rejects(**args, level=p * 1.001)
        assert not fdp_rejects(**args, level=p * 0.99)


def test_noise_ratio_bound_orders_the_claims():
    # Perfect separation of m = 1000 canaries certifies rho of about 0.43 on the digits curve (the floor m puts
    # under rho; see noise_ratio_bound), and fdp_audit rejects the claim; chance-level scores certify nothing.
    inc = np.arange(DIGITS_M) % 2 == 0
    ratio = noise_ratio_bound(inc.astype(float), inc, DIGITS_PLAN)
    assert 0.35 < ratio < 0.5, ratio
    assert not fdp_audit(inc.astype(float), inc, TradeoffCurve.from_plan(DIGITS_PLAN)).passed
    assert noise_ratio_bound(np.zeros(DIGITS_M), inc, DIGITS_PLAN) is None
    # Without noise nothing is claimed, so there is no ratio.
    no_noise = PrivacyPlan(dataset_size=2437, batch_size=868, l2_clip_norm=1.0, noise_multiplier=0.0, num_steps=120)
    assert noise_ratio_bound(inc.astype(float), inc, no_noise) is None


def test_bad_curve_inputs_go_through_the_rules():
    with pytest.raises(ValueError, match=r"mu=-1.0 must be a finite number > 0"):
        TradeoffCurve.gaussian(-1.0)
    with pytest.raises(ValueError, match=r"noise_multiplier=-1.0 must be a finite number >= 0 \(0 means no noise"):
        TradeoffCurve.from_plan(DIGITS_PLAN, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="same length"):
        TradeoffCurve([0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="num_correct <= num_guesses"):
        fdp_p_value(num_canaries=10, num_guesses=4, num_correct=5, curve=TradeoffCurve.gaussian(1.0))
    with pytest.raises(ValueError, match="confidence=0"):
        fdp_audit(np.zeros(10), np.ones(10, bool), TradeoffCurve.gaussian(1.0), confidence=0)
