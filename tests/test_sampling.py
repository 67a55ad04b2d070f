"""jaxdp.sampling: Poisson draws (inclusion rate, padded chunks with masks, determinism) and shuffled epochs."""

import math

import numpy as np
import pytest
from scipy import stats

import jaxdp
from jaxdp.sampling import default_physical_batch_size


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
