"""jaxdp.plan: the privacy plan (validation, dp-accounting event, from_target) and the pieces it builds."""

import dataclasses
import math

import dp_accounting
import pytest
from dp_accounting import rdp

import jaxdp

PLAN = dict(dataset_size=60000, batch_size=256, l2_clip_norm=1.0, noise_multiplier=1.1, num_steps=2340)


def test_plan_is_frozen_and_describes_poisson_gaussian():
    plan = jaxdp.PrivacyPlan(**PLAN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.noise_multiplier = 0.5
    event = plan.dp_event()
    assert isinstance(event, dp_accounting.SelfComposedDpEvent) and event.count == 2340
    inner = event.event
    assert isinstance(inner, dp_accounting.PoissonSampledDpEvent)
    assert inner.sampling_probability == pytest.approx(256 / 60000)
    assert inner.event.noise_multiplier == 1.1


@pytest.mark.parametrize(
    "q, sigma, steps",
    [(256 / 60000, 1.1, 2340), (512 / 1437, 5.99, 120), (0.01, 0.8, 1000), (0.1, 2.0, 50)],
)
def test_epsilon_matches_dp_accounting(q, sigma, steps):
    """The plan's epsilon is dp-accounting's RDP epsilon for the plan's event."""
    n = 100_000
    plan = jaxdp.PrivacyPlan(
        dataset_size=n, batch_size=round(q * n), l2_clip_norm=1.0, noise_multiplier=sigma, num_steps=steps
    )
    ref = rdp.RdpAccountant()  # dp-accounting's default orders
    ref.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(plan.sampling_rate, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    want = ref.get_epsilon(1e-5)
    got = plan.epsilon(1e-5)
    assert got == pytest.approx(want, rel=1e-12)


def test_epsilon_grows_with_steps_and_is_infinite_without_noise():
    plan = jaxdp.PrivacyPlan(**PLAN)
    eps = [plan.epsilon(1e-5, s) for s in (0, 100, 1000, 2340)]
    assert eps[0] == 0.0 and eps[1] < eps[2] < eps[3]
    assert jaxdp.PrivacyPlan(**{**PLAN, "noise_multiplier": 0.0}).epsilon(1e-5) == math.inf


@pytest.mark.parametrize(
    "change, name",
    [
        ({"batch_size": 70000}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"l2_clip_norm": -1.0}, "l2_clip_norm"),
        ({"l2_clip_norm": math.inf}, "l2_clip_norm"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"num_steps": -1}, "num_steps"),
        ({"sampling": "shuffle"}, "sampling"),
        ({"sampling": "bogus"}, "sampling"),
    ],
)
def test_plan_refuses_bad_values(change, name):
    with pytest.raises(ValueError, match=name):
        jaxdp.PrivacyPlan(**{**PLAN, **change})


def test_plan_builds_matching_pieces():
    plan = jaxdp.PrivacyPlan(**{**PLAN, "per_layer": True})
    fn = plan.clipped_grad(lambda p, x: (p * x).sum(), microbatch_size=8)
    assert fn.l2_clip_norm == 1.0 and fn.per_layer and fn.microbatch_size == 8
    sampler = plan.sampler(seed=0)
    assert sampler.sampling_rate == plan.sampling_rate and sampler.dataset_size == 60000


def test_plan_step_and_delta_arguments_are_checked():
    plan = jaxdp.PrivacyPlan(**PLAN)
    for bad in (-3, 2.5):
        with pytest.raises(ValueError, match="steps="):
            plan.epsilon(1e-5, bad)
        with pytest.raises(ValueError, match="steps="):
            plan.dp_event(bad)
    with pytest.raises(ValueError, match="delta=5.0"):
        plan.epsilon(5.0, 0)


def test_shuffle_is_refused_for_private_plans_and_allowed_without_noise():
    with pytest.raises(ValueError, match="sampling='shuffle' with noise_multiplier=1.1"):
        jaxdp.PrivacyPlan(**{**PLAN, "sampling": "shuffle"})
    plan = jaxdp.PrivacyPlan(**{**PLAN, "sampling": "shuffle", "noise_multiplier": 0.0})
    assert plan.epsilon(1e-5) == math.inf
    assert type(plan.sampler(seed=0)).__name__ == "ShuffleSampler"


FROM = dict(dataset_size=10000, batch_size=100, l2_clip_norm=1.0, planned_steps=500, delta=1e-5)


def test_from_target_calibrates_the_smallest_sigma_that_meets_the_target():
    plan = jaxdp.PrivacyPlan.from_target(**FROM, target_epsilon=2.0)
    assert plan.num_steps == 500 and plan.epsilon(1e-5) <= 2.0
    assert plan.noise_multiplier == pytest.approx(
        jaxdp.accounting.calibrate_noise_multiplier(2.0, 1e-5, 0.01, 500, accountant="rdp")
    )
    looser = dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier * 0.98)
    assert looser.epsilon(1e-5) > 2.0  # 2% less noise overspends: the calibration is tight


def test_from_target_caps_the_steps_when_a_given_sigma_would_overspend(capsys):
    plan = jaxdp.PrivacyPlan.from_target(**FROM, target_epsilon=1.3, noise_multiplier=1.0, verbose=True)
    assert 0 < plan.num_steps < 500
    assert plan.epsilon(1e-5) <= 1.3 < plan.epsilon(1e-5, steps=plan.num_steps + 1)
    assert f"after {plan.num_steps} of the 500 planned steps" in capsys.readouterr().out
    uncapped = jaxdp.PrivacyPlan.from_target(**FROM, noise_multiplier=1.0)
    assert uncapped.num_steps == 500 and uncapped.noise_multiplier == 1.0


def test_from_target_bands_run_as_cyclic_poisson():
    plan = jaxdp.PrivacyPlan.from_target(**FROM, noise_multiplier=1.0, bands=4)
    assert plan.sampling == "cyclic_poisson" and plan.sampling_rate == pytest.approx(0.04)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "privacy.target_epsilon and privacy.noise_multiplier are both None"),
        (dict(target_epsilon=3.0, noise_multiplier=0.0), "privacy.noise_multiplier=0 adds no noise"),
        (dict(target_epsilon=-1.0), "privacy.target_epsilon=-1.0 is invalid"),
        (dict(noise_multiplier=1.0, l2_clip_norm=0.0), "privacy.l2_clip_norm=0.0 is not a finite positive number"),
        (dict(noise_multiplier=1.0, delta=1e-3), "privacy.delta=0.001 is larger than 1/N = 1/10000"),
        (dict(noise_multiplier=1.0, accountant="gdp"), "privacy.accountant='gdp' is an approximation"),
        (dict(noise_multiplier=0.05, target_epsilon=0.01), "spends more than privacy.target_epsilon=0.01"),
        (dict(target_epsilon=3.0, sampling="shuffle"), "sampling='shuffle' with privacy.noise_multiplier=None"),
        (dict(noise_multiplier=0.0, bands=2, sampling="shuffle"), "bands=2 with sampling='shuffle'"),
    ],
)
def test_from_target_refuses_with_the_config_names(kwargs, message):
    with pytest.raises(ValueError) as e:
        jaxdp.PrivacyPlan.from_target(**{**FROM, **kwargs}, prefix="privacy.")
    assert message in str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset_size=0), "dataset_size=0 must be a positive int"),
        (dict(batch_size=0), "batch_size=0 must be a positive int"),
        (dict(batch_size=20000), "batch_size=20000 is larger than the dataset (10000 examples)"),
        (dict(bands=200), "privacy.bands=200 x batch_size=100 exceeds dataset_size=10000"),
        (dict(bands=2, sampling="shuffle", target_epsilon=3.0), "privacy.bands=2 with sampling='shuffle'"),
        (dict(sampling="shuffle"), "privacy.noise_multiplier=0 and privacy.target_epsilon=None"),
    ],
)
def test_from_target_checks_sizes_first_and_names_every_key(kwargs, message):
    args = {**FROM, "noise_multiplier": 1.0, **kwargs}
    with pytest.raises(ValueError) as e:
        jaxdp.PrivacyPlan.from_target(**args, prefix="privacy.")
    assert message in str(e.value)
