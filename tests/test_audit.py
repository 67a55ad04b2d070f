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
    DEFAULT_FDP_GUESS_FRACTIONS,
    TradeoffCurve,
    _fdp_rejects,
    audit_training_run,
    epsilon_lower_bound,
    fdp_audit,
    fdp_p_value,
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


# -- the f-DP test (one-run f-DP auditing against the claimed curve) -------------------

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
        critical = next(v for v in range(r // 2, r + 2) if v > r or _fdp_rejects(digits_curve, DIGITS_M, r, v, level))
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
    assert result.fdp_passed and result.fdp.p_value > 0.05  # nor does the f-DP test reject its curve
    assert result.fdp.noise_ratio is None or result.fdp.noise_ratio > 1
    # Included canaries do score higher (the scores see the mechanism at all).
    assert result.scores[result.included].mean() > result.scores[~result.included].mean()


@pytest.mark.parametrize("sabotage", ["noise_off", "clipping_off"])
def test_broken_mechanism_fails_the_audit(problem, sabotage):
    result = _audit(problem, sabotage)
    assert result.claimed_epsilon == pytest.approx(CLAIM, abs=1e-3)  # the claim is unchanged
    assert not result.passed
    assert result.bound.epsilon > CLAIM + 2.0, result.bound
    # Rejected far below the claim; even perfect guesses leave a floor (m = 1000 canaries cannot rule out
    # the claimed mechanism with about a third of its noise, as they cannot certify eps above 5.1).
    assert not result.fdp_passed and result.fdp.noise_ratio < 0.5
    if sabotage == "noise_off":
        # Without noise the plumbing is exact: each step that sampled an included canary added its gradient
        # clipped from 100 C to C, divided by the expected batch size; an excluded canary never counts.
        plan = problem[0]
        counts = result.scores * plan.batch_size / plan.l2_clip_norm
        assert np.all(result.scores[~result.included] == 0)
        np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
        assert abs(counts[result.included].mean() - plan.sampling_rate * STEPS) < 0.5


def test_half_noise_fails_the_fdp_test_only(problem):
    # sigma/2 against the same claim keeps the (eps, delta) point out of one run's reach; the f-DP test sees it
    # (in about 70% of seeds for this small problem, simulated; seed 0, as in the other tests, is one of them).
    result = _audit(problem, "half_noise")
    assert result.noise_multiplier == problem[0].noise_multiplier  # the claim is the plan's sigma
    assert result.epsilon_passed and not result.fdp_passed and not result.passed
    assert result.fdp.p_value <= 0.05 and result.fdp.noise_ratio < 1
    # Scored against the executed mechanism's own curve (sigma/2), the same scores pass.
    executed = TradeoffCurve.from_plan(problem[0], noise_multiplier=problem[0].noise_multiplier / 2)
    assert fdp_audit(result.scores, result.included, executed).passed


def test_plan_must_count_the_canaries(problem):
    plan, loss_fn, params, x, y = problem
    with pytest.raises(ValueError, match=r"plan.dataset_size=1200 must be len\(x_train\) \+ num_canaries"):
        audit_training_run(plan, loss_fn, params, x, y, optimizer=optax.sgd(0.1), num_canaries=10, delta=DELTA)
    with pytest.raises(ValueError, match="sabotage='typo'"):
        audit_training_run(
            plan, loss_fn, params, x, y, optimizer=optax.sgd(0.1), num_canaries=M, delta=DELTA, sabotage="typo"
        )
    with pytest.raises(ValueError, match="tests=.*must be a non-empty selection"):
        audit_training_run(
            plan, loss_fn, params, x, y, optimizer=optax.sgd(0.1), num_canaries=M, delta=DELTA, tests=("typo",)
        )


# -- the command line -------------------------------------------------------------


def test_cli_prints_both_epsilons(capsys):
    args = ["audit", "--config", DIGITS, "--canaries", "300", "epochs=3", "privacy.noise_seed=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "accountant epsilon (rdp, upper bound): 3.000" in out
    assert "empirical epsilon lower bound (95% confidence):" in out
    assert "f-DP test against the claimed mechanism's PLD curve: p-value" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epsilon_accountant"] == pytest.approx(3.0, abs=1e-3)
    assert 0 <= summary["epsilon_lower_bound"] < summary["epsilon_accountant"]
    assert summary["canaries"] == 300 and summary["passed"] and summary["steps"] == 9
    assert summary["epsilon_passed"] and summary["fdp_passed"] and summary["tests"] == ["epsilon", "fdp"]


def test_cli_sabotaged_run_exits_1(capsys):
    args = ["audit", "--config", DIGITS, "--canaries", "600", "epochs=3", "privacy.noise_seed=0"]
    assert main([*args, "--sabotage", "noise_off"]) == 1
    out = capsys.readouterr().out
    assert "FAILED (epsilon and fdp)" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epsilon_lower_bound"] > 3.5 and summary["fdp_p_value"] <= 0.05


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
