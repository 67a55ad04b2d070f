"""The privacy plan (validation, dp-accounting event) and the Poisson sampler."""

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from scipy import stats

import jaxdp
from jaxdp.sampling import default_physical_batch_size

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


def test_poisson_inclusion_frequency_matches_q():
    sampler = jaxdp.PoissonSampler(dataset_size=500, sampling_rate=0.05, seed=3)
    steps = 2000
    counts = np.zeros(500)
    sizes = []
    for step in range(steps):
        idx = sampler.draw(step)
        counts[idx] += 1
        sizes.append(len(idx))
    # Each example's inclusion count is Binomial(steps, q): check the pooled rate...
    rate = counts.sum() / (500 * steps)
    assert abs(rate - 0.05) < 5 * math.sqrt(0.05 * 0.95 / (500 * steps))
    # ...and that per-example counts follow the binomial (no example favoured).
    expected = stats.binom(steps, 0.05)
    assert counts.var(ddof=1) == pytest.approx(expected.var(), rel=0.3)  # se of the ratio ~ 6%
    assert counts.min() > expected.ppf(1e-6) and counts.max() < expected.isf(1e-6)
    # Batch sizes vary (it is Poisson sampling, not fixed-size).
    assert np.std(sizes) == pytest.approx(math.sqrt(500 * 0.05 * 0.95), rel=0.1)


def test_chunks_pad_with_mask_zero_and_never_truncate():
    sampler = jaxdp.PoissonSampler(dataset_size=100, sampling_rate=0.3, physical_batch_size=16, seed=0)
    for step in range(50):
        idx = sampler.draw(step)
        chunks = sampler.chunks(idx)
        assert all(c[0].shape == (16,) and c[1].shape == (16,) for c in chunks)
        flat_idx = np.concatenate([c[0] for c in chunks])
        flat_mask = np.concatenate([c[1] for c in chunks])
        # Exactly the drawn examples have mask 1; padding has mask 0.
        np.testing.assert_array_equal(np.sort(flat_idx[flat_mask == 1]), idx)
        assert flat_mask.sum() == len(idx)
        assert len(chunks) == max(1, math.ceil(len(idx) / 16))
    assert len(sampler.chunks(np.array([], np.int64))) == 1  # an empty draw is still a (noisy) step


def test_sampler_is_deterministic_per_step():
    a = jaxdp.PoissonSampler(dataset_size=1000, sampling_rate=0.1, seed=5)
    b = jaxdp.PoissonSampler(dataset_size=1000, sampling_rate=0.1, seed=5)
    np.testing.assert_array_equal(a.draw(17), b.draw(17))
    assert not np.array_equal(a.draw(17), a.draw(18))


def test_default_physical_batch_size():
    size = default_physical_batch_size(256, 256 / 60000, multiple_of=8)
    assert size % 8 == 0 and 256 + 4 * math.sqrt(256) <= size < 256 + 4 * math.sqrt(256) + 8


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(dataset_size=0, sampling_rate=0.1), "dataset_size"),
        (dict(dataset_size=10, sampling_rate=0.0), "sampling_rate"),
        (dict(dataset_size=10, sampling_rate=1.5), "sampling_rate"),
        (dict(dataset_size=10, sampling_rate=0.5, physical_batch_size=6, multiple_of=4), "physical_batch_size"),
    ],
)
def test_sampler_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        jaxdp.PoissonSampler(**kwargs)


def test_plan_step_and_delta_arguments_are_checked():
    plan = jaxdp.PrivacyPlan(**PLAN)
    for bad in (-3, 2.5):
        with pytest.raises(ValueError, match="steps="):
            plan.epsilon(1e-5, bad)
        with pytest.raises(ValueError, match="steps="):
            plan.dp_event(bad)
    with pytest.raises(ValueError, match="delta=5.0"):
        plan.epsilon(5.0, 0)


def test_shuffle_visits_every_example_once_per_epoch():
    from jaxdp.sampling import ShuffleSampler

    s = ShuffleSampler(dataset_size=103, batch_size=10, seed=1, multiple_of=4)
    assert s.steps_per_epoch == 11 and s.physical_batch_size == 12
    for epoch in range(3):
        seen = []
        for _, chunks in s.steps(epoch * 11, (epoch + 1) * 11):
            ((idx, mask),) = chunks
            assert idx.shape == (12,) and mask[len(idx[mask == 1]) :].sum() == 0
            seen.extend(idx[mask == 1].tolist())
        assert sorted(seen) == list(range(103))  # every example exactly once
    first = np.concatenate([s.draw(i) for i in range(11)])
    second = np.concatenate([s.draw(11 + i) for i in range(11)])
    assert not np.array_equal(first, second)  # a fresh permutation each epoch


def test_shuffle_is_refused_for_private_plans_and_allowed_without_noise():
    with pytest.raises(ValueError, match="sampling='shuffle' with noise_multiplier=1.1"):
        jaxdp.PrivacyPlan(**{**PLAN, "sampling": "shuffle"})
    plan = jaxdp.PrivacyPlan(**{**PLAN, "sampling": "shuffle", "noise_multiplier": 0.0})
    assert plan.epsilon(1e-5) == math.inf
    assert type(plan.sampler(seed=0)).__name__ == "ShuffleSampler"
