"""jaxdp.audit.canaries: gradient-canary audits of real runs that pass and fail, and ``jaxdp audit``.

The audit must be able to fail: a mechanism with its noise or its clipping switched
off (while the accountant still claims the calibrated ε) must give an empirical
lower bound clearly above the claim; the real mechanism must stay below it.
Moved from tests/test_audit.py (issue 17) with the module; the run goes through
jaxdp's one step runner (PrivateStep.init, run_private_step).
"""

import os

import numpy as np
import optax
import pytest
from conftest import nnx_loss
from flax import nnx

import jaxdp.audit.canaries as canaries
from jaxdp import accounting
from jaxdp.audit.canaries import audit_config, audit_training_run
from jaxdp.audit.fdp import TradeoffCurve, fdp_audit
from jaxdp.config import ConfigError, load_config
from jaxdp.models import MLP
from jaxdp.plan import PrivacyPlan

# Its module-scoped runs are shared by its tests: one xdist worker for the whole module (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("audit_canaries")

DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.py")

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


def test_the_run_is_the_shared_step_runner(monkeypatch):
    # One run_private_step per Poisson draw, from PrivateStep.init's state: the audit has no chunk loop of its own.
    # A tiny physical batch makes draws spill into several chunks, which must all reach the one step.
    calls = []
    real_run = canaries.run_private_step

    def counting(step, state, chunks, **kwargs):
        calls.append((int(state.step), len(chunks)))
        return real_run(step, state, chunks, **kwargs)

    monkeypatch.setattr(canaries, "run_private_step", counting)
    real_sampler = PrivacyPlan.sampler
    monkeypatch.setattr(PrivacyPlan, "sampler", lambda plan, **kw: real_sampler(plan, **kw, physical_batch_size=8))
    rng = np.random.default_rng(0)
    n, m, steps = 30, 20, 4
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 2, n).astype(np.int32)
    loss_fn, params = nnx_loss(MLP(4, 2, hidden=(4,), rngs=nnx.Rngs(0)))
    plan = PrivacyPlan(dataset_size=n + m, batch_size=25, l2_clip_norm=1.0, noise_multiplier=0.0, num_steps=steps)
    result = audit_training_run(
        plan, loss_fn, params, x, y, optimizer=optax.sgd(0.1), num_canaries=m, delta=1e-3, seed=3, tests="epsilon"
    )
    assert [s for s, _ in calls] == list(range(steps))  # the state's step counter advanced once per draw
    assert all(c >= 3 for _, c in calls)  # about 25 rows a draw, in chunks of 8
    # Without noise each included canary's score counts its draws exactly: C / B per step that sampled it.
    counts = result.scores * plan.batch_size / plan.l2_clip_norm
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    assert np.all(counts[~result.included] == 0) and counts.max() <= steps
    assert result.fdp is None and result.tests == ("epsilon",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_canaries": 1}, "--canaries=1 must be an int >= 2"),
        ({"confidence": 0.0}, r"--confidence=0.0 must lie in \(0, 1\)"),
        ({"sabotage": "typo"}, "--sabotage='typo' is not known"),
        ({"tests": ("typo",)}, r"--test=\('typo',\) must be a non-empty selection"),
    ],
)
def test_audit_config_names_the_flag(kwargs, message):
    # The same rules as audit_training_run, named by their command-line flags, before any data is loaded.
    with pytest.raises(ConfigError, match=message):
        audit_config(load_config(DIGITS), **kwargs)
