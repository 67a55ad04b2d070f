"""Empirical auditing: the one-run statistic in closed form, and audits that pass and fail.

The audit must be able to fail: a mechanism with its noise or its clipping switched
off (while the accountant still claims the calibrated ε) must give an empirical
lower bound clearly above the claim; the real mechanism must stay below it.
"""

import json
import math
import os

import numpy as np
import optax
import pytest
from conftest import nnx_loss
from flax import nnx
from scipy import special, stats

from jaxdp import accounting
from jaxdp.audit import (
    audit_training_run,
    epsilon_lower_bound,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from jaxdp.cli import main
from jaxdp.models import MLP
from jaxdp.plan import PrivacyPlan

DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.py")


# -- the statistic ----------------------------------------------------------


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


# -- audits of real runs --------------------------------------------------------

N_REAL, M, STEPS, CLAIM, DELTA = 200, 1000, 40, 2.0, 1e-5


@pytest.fixture(scope="module")
def problem():
    """A small MLP on random data; plan calibrated to CLAIM over the real + canary rows (q = 0.25)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_REAL, 8)).astype(np.float32)
    y = rng.integers(0, 3, N_REAL).astype(np.int32)
    loss_fn, params = nnx_loss(MLP(8, 3, hidden=(8,), rngs=nnx.Rngs(0)))
    batch = round(0.25 * (N_REAL + M))
    sigma = accounting.calibrate_noise_multiplier(CLAIM, DELTA, batch / (N_REAL + M), STEPS)
    plan = PrivacyPlan(
        dataset_size=N_REAL + M, batch_size=batch, l2_clip_norm=1.0, noise_multiplier=sigma, num_steps=STEPS
    )
    return plan, loss_fn, params, x, y


def _audit(problem, sabotage=None, seed=0):
    plan, loss_fn, params, x, y = problem
    return audit_training_run(
        plan, loss_fn, params, x, y, optimizer=optax.sgd(0.1), num_canaries=M, delta=DELTA, seed=seed, sabotage=sabotage
    )


def test_correct_mechanism_stays_below_its_claim(problem):
    result = _audit(problem)
    assert result.claimed_epsilon == pytest.approx(CLAIM, abs=1e-3)
    assert result.passed
    assert result.bound.epsilon < CLAIM
    # Included canaries do score higher (the scores see the mechanism at all).
    assert result.scores[result.included].mean() > result.scores[~result.included].mean()


@pytest.mark.parametrize("sabotage", ["noise_off", "clipping_off"])
def test_broken_mechanism_fails_the_audit(problem, sabotage):
    result = _audit(problem, sabotage)
    assert result.claimed_epsilon == pytest.approx(CLAIM, abs=1e-3)  # the claim is unchanged
    assert not result.passed
    assert result.bound.epsilon > CLAIM + 2.0, result.bound
    if sabotage == "noise_off":
        # Without noise the plumbing is exact: each step that sampled an included canary added its gradient
        # clipped from 100 C to C, divided by the expected batch size; an excluded canary never counts.
        plan = problem[0]
        counts = result.scores * plan.batch_size / plan.l2_clip_norm
        assert np.all(result.scores[~result.included] == 0)
        np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
        assert abs(counts[result.included].mean() - plan.sampling_rate * STEPS) < 0.5


def test_plan_must_count_the_canaries(problem):
    plan, loss_fn, params, x, y = problem
    with pytest.raises(ValueError, match=r"plan.dataset_size=1200 must be len\(x_train\) \+ num_canaries"):
        audit_training_run(plan, loss_fn, params, x, y, optimizer=optax.sgd(0.1), num_canaries=10, delta=DELTA)
    with pytest.raises(ValueError, match="sabotage='typo'"):
        audit_training_run(
            plan, loss_fn, params, x, y, optimizer=optax.sgd(0.1), num_canaries=M, delta=DELTA, sabotage="typo"
        )


# -- the command line -------------------------------------------------------------


def test_cli_prints_both_epsilons(capsys):
    args = ["audit", "--config", DIGITS, "--canaries", "300", "epochs=3", "privacy.noise_seed=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "accountant epsilon (rdp, upper bound): 3.000" in out
    assert "empirical epsilon lower bound (95% confidence):" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epsilon_accountant"] == pytest.approx(3.0, abs=1e-3)
    assert 0 <= summary["epsilon_lower_bound"] < summary["epsilon_accountant"]
    assert summary["canaries"] == 300 and summary["passed"] and summary["steps"] == 9


def test_cli_sabotaged_run_exits_1(capsys):
    args = ["audit", "--config", DIGITS, "--canaries", "600", "epochs=3", "privacy.noise_seed=0"]
    assert main([*args, "--sabotage", "noise_off"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out
    assert json.loads(out.strip().splitlines()[-1])["epsilon_lower_bound"] > 3.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--canaries", "1"], "--canaries=1 must be an int >= 2"),
        (["--confidence", "1.5"], "--confidence=1.5 must lie in (0, 1)"),
        (["augment.multiplicity=2"], "augment.multiplicity=2 is not supported"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, message, capsys):
    assert main(["audit", "--config", DIGITS, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
