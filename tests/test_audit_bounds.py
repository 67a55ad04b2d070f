"""jaxdp.audit.bounds: the one-run (ε, δ) statistic in closed form, its validity and its power.

Moved from tests/test_audit.py (issue 17) with the module: the p-value is the binomial tail plus the δ term,
all-correct guesses give the closed form, chance-level guesses give 0, and the bound from scores is valid
and not vacuous on randomised response.
"""

import math

import numpy as np
import pytest
from scipy import special, stats

from jaxdp.audit.bounds import (
    DEFAULT_GUESS_FRACTIONS,
    AuditBound,
    epsilon_lower_bound,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)


@pytest.mark.parametrize("r, v, eps", [(10, 10, 0.0), (100, 70, 0.5), (400, 390, 3.0), (50, 20, 1.0)])
def test_p_value_without_delta_is_the_binomial_tail(r, v, eps):
    p = math.exp(eps) / (1 + math.exp(eps))
    want = sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(v, r + 1))
    got = one_run_p_value(num_canaries=2 * r, num_guesses=r, num_correct=v, epsilon=eps, delta=0.0)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_p_value_delta_term_is_the_max_over_windows():
    m, r, v, eps, delta = 1000, 200, 180, 1.5, 1e-4
    p = special.expit(eps)
    pmf = [stats.binom.pmf(j, r, p) for j in range(r + 1)]
    alpha = max(sum(pmf[v - i : v]) / i for i in range(1, v + 1))  # P[v - i <= Bin < v] / i
    want = stats.binom.sf(v - 1, r, p) + 2 * m * delta * alpha
    got = one_run_p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps, delta=delta)
    assert got == pytest.approx(want, rel=1e-9)
    assert got > one_run_p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps, delta=0.0)


@pytest.mark.parametrize("r, confidence", [(100, 0.95), (800, 0.99), (20, 0.9)])
def test_all_guesses_correct_gives_the_closed_form(r, confidence):
    # delta = 0, v = r: the p-value is p^r, so the bound solves p = beta^(1/r): eps = logit(beta^(1/r)).
    beta = 1 - confidence
    want = special.logit(beta ** (1 / r))
    got = one_run_epsilon_lower_bound(num_canaries=r, num_guesses=r, num_correct=r, delta=0.0, confidence=confidence)
    assert got == pytest.approx(want, abs=1e-5)
    assert got <= want  # the returned point is always rejected
    # delta > 0 can only lower the bound
    with_delta = one_run_epsilon_lower_bound(
        num_canaries=r, num_guesses=r, num_correct=r, delta=1e-5, confidence=confidence
    )
    assert with_delta <= got


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_half_correct_gives_zero(r):
    assert one_run_epsilon_lower_bound(num_canaries=r, num_guesses=r, num_correct=r // 2, delta=1e-5) == 0.0
    assert one_run_epsilon_lower_bound(num_canaries=r, num_guesses=r, num_correct=0, delta=0.0) == 0.0


def test_bound_from_scores_is_valid_and_has_power_on_randomised_response():
    # eps0-randomised response on each canary is exactly eps0-DP in that canary. The bound may exceed eps0 in
    # at most beta = 5% of runs (Monte Carlo slack: 12/150); and it must not be vacuous (median > eps0 / 2).
    eps0, m, trials = 1.0, 1000, 150
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < special.expit(eps0)
        report = np.where(truthful, included, ~included)
        scores = report + 0.5 * rng.random(m)  # public jitter orders the ties
        bounds.append(epsilon_lower_bound(scores, included, delta=0.0, confidence=0.95).epsilon)
    bounds = np.array(bounds)
    assert np.sum(bounds > eps0) <= 12, np.sort(bounds)[-15:]
    assert np.median(bounds) > eps0 / 2


def test_ties_are_broken_by_index_not_membership():
    # All scores equal: the guesses cannot see membership, so nothing is rejected.
    included = np.arange(400) % 2 == 0
    assert epsilon_lower_bound(np.zeros(400), included, delta=0.0).epsilon == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_correct": 11}, "num_correct <= num_guesses"),
        ({"num_guesses": 20}, "num_guesses <= num_canaries"),
        ({"delta": 1.5}, "delta=1.5"),
        ({"confidence": 1.0}, "confidence=1.0"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, message):
    args = {"num_canaries": 10, "num_guesses": 10, "num_correct": 8, "delta": 0.0, "confidence": 0.95, **kwargs}
    with pytest.raises(ValueError, match=message):
        one_run_epsilon_lower_bound(**args)
    with pytest.raises(ValueError, match="guess_fractions"):
        epsilon_lower_bound(np.zeros(10), np.ones(10, bool), delta=0.0, guess_fractions=(0.0,))


def test_the_bound_reports_the_guess_count_that_gave_it():
    inc = np.arange(400) % 2 == 0
    bound = epsilon_lower_bound(inc.astype(float), inc, delta=1e-5)
    assert isinstance(bound, AuditBound)
    assert bound.guess_counts == tuple(2 * round(f * 400 / 2) for f in DEFAULT_GUESS_FRACTIONS)
    assert bound.num_guesses in bound.guess_counts and bound.num_correct == bound.num_guesses  # perfect guesses
    # The reported epsilon is that guess count's bound at the Bonferroni level.
    level = 1 - 0.05 / len(bound.guess_counts)
    assert bound.epsilon == one_run_epsilon_lower_bound(
        num_canaries=400, num_guesses=bound.num_guesses, num_correct=bound.num_correct, delta=1e-5, confidence=level
    )
    assert bound.to_dict()["epsilon"] == bound.epsilon


@pytest.mark.parametrize("epsilon", [-1.0, math.nan, math.inf, "1"])
def test_epsilon_of_the_null_goes_through_the_epsilon_rule(epsilon):
    # The same rule (and message) as Accountant.delta(epsilon): rules.positive_finite("epsilon", allow_zero=True).
    with pytest.raises(ValueError, match=r"epsilon=.* must be a finite number >= 0; pass epsilon >= 0"):
        one_run_p_value(num_canaries=10, num_guesses=10, num_correct=8, epsilon=epsilon, delta=0.0)
