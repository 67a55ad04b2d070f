"""Banded matrix-factorization (BandMF): the strategies (jaxdp.noise.bandmf), and the feature end to end.

The streaming noise itself (jaxdp.noise.banded) is tested in test_noise.py, the
band choice and the cyclic-Poisson calibration (jaxdp.accounting) in
test_accounting.py. Here: the strategies, and the sampler, plan and training
loop that use them (until those move next to their own modules' tests).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdp
from jaxdp import accounting, rules
from jaxdp.noise import bandmf

# -- strategies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t, bands", [(6, 2), (20, 3), (20, 8), (64, 16)])
def test_optimal_coefficients_beat_dpsgd_with_unit_column_norm(t, bands):
    c = bandmf.optimal_coefficients(t, bands)
    dense = bandmf.dense_strategy(c, t)
    assert np.max(np.linalg.norm(dense, axis=0)) == pytest.approx(1.0, abs=1e-9)  # sensitivity 1
    # The O(T b) objective equals the dense one, ||A C^{-1}||_F^2 * max column norm^2.
    a = np.tril(np.ones((t, t)))
    dense_error = np.linalg.norm(a @ np.linalg.inv(dense)) ** 2 * np.max(np.linalg.norm(dense, axis=0)) ** 2
    assert bandmf.prefix_sum_error(c, t) == pytest.approx(dense_error, rel=1e-9)
    dpsgd = bandmf.prefix_sum_error([1.0], t)
    assert dpsgd == pytest.approx(t * (t + 1) / 2)
    assert bandmf.prefix_sum_error(c, t) < 0.9 * dpsgd
    # ... and at least as good as the truncated square-root factorisation it starts from.
    assert bandmf.prefix_sum_error(c, t) <= bandmf.prefix_sum_error(bandmf.sqrt_coefficients(bands), t) + 1e-9


def test_optimal_coefficients_long_runs_are_fast_and_cached():
    c = bandmf.optimal_coefficients(2000, 16)
    assert bandmf.optimal_coefficients(2000, 16) is not c  # a fresh array each call ...
    assert np.array_equal(bandmf.optimal_coefficients(2000, 16), c)  # ... of the cached values
    assert bandmf.prefix_sum_error(c, 2000) < 0.1 * bandmf.prefix_sum_error([1.0], 2000)
    assert np.array_equal(bandmf.optimal_coefficients(50, 1), [1.0])


def test_coefficient_errors_name_the_fix():
    with pytest.raises(ValueError, match="norm 2.*c / np.linalg.norm"):
        bandmf.check_coefficients([2.0])
    with pytest.raises(ValueError, match=r"coefficients\[0\]"):
        bandmf.check_coefficients([-1.0])
    with pytest.raises(ValueError, match="bands=5 exceeds num_steps=3"):
        bandmf.optimal_coefficients(3, 5)
    with pytest.raises(ValueError, match=r"coefficients=\[\] must be a non-empty 1-D sequence"):
        bandmf.check_coefficients([])
    np.testing.assert_array_equal(bandmf.check_coefficients((0.6, 0.8)), [0.6, 0.8])


def test_bands_follow_the_one_rule():
    """bands is checked by jaxdp.rules.check_bands (one message); a NumPy integer counts as the int it is."""
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError) as e:
            bandmf.sqrt_coefficients(bad)
        with pytest.raises(ValueError) as same:
            rules.check_bands(bad)
        assert str(e.value) == str(same.value)
        with pytest.raises(ValueError, match="bands="):
            bandmf.optimal_coefficients(10, bad)
    np.testing.assert_array_equal(bandmf.sqrt_coefficients(np.int64(3)), bandmf.sqrt_coefficients(3))
    np.testing.assert_array_equal(
        bandmf.optimal_coefficients(np.int64(10), np.int64(2)), bandmf.optimal_coefficients(10, 2)
    )
    with pytest.raises(ValueError, match="num_steps=0 must be a positive int"):
        bandmf.inverse_coefficients([1.0], 0)


def test_inverse_coefficients_are_the_first_column_of_the_inverse():
    c = bandmf.optimal_coefficients(12, 3)
    np.testing.assert_allclose(
        bandmf.inverse_coefficients(c, 12), np.linalg.inv(bandmf.dense_strategy(c, 12))[:, 0], rtol=1e-12, atol=1e-12
    )


# -- cyclic Poisson sampling ----------------------------------------------------------------------------


def test_cyclic_poisson_min_separation_rate_and_static_shapes():
    n, bands, q, steps = 1000, 4, 0.2, 400
    s = jaxdp.CyclicPoissonSampler(dataset_size=n, bands=bands, sampling_rate=q, seed=7)
    assert sorted(np.concatenate(s.groups).tolist()) == list(range(n))  # a partition
    last = np.full(n, -(10**9))
    counts = np.zeros(n)
    for step, chunks in s.steps(0, steps):
        idx = s.draw(step)
        assert np.all(step - last[idx] >= bands)  # b-min-separation
        assert np.all(np.isin(idx, s.groups[step % bands]))
        last[idx] = step
        counts[idx] += 1
        for ix, mask in chunks:
            assert ix.shape == mask.shape == (s.physical_batch_size,)
        got = np.concatenate([ix[m > 0] for ix, m in chunks])
        assert np.array_equal(got, idx)
    # Inclusion frequency within an example's group: each is eligible in steps/b steps.
    freq = counts / (steps / bands)
    se = math.sqrt(q * (1 - q) / (steps / bands) / n)
    assert abs(freq.mean() - q) < 5 * se
    # The padded shape is sized for one group (expected batch q * N / b), not for q * N.
    assert s.physical_batch_size < 1.6 * q * n / bands


def test_plan_refuses_banded_noise_without_min_separation():
    kw = dict(dataset_size=1000, batch_size=50, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=100)
    with pytest.raises(ValueError, match="sampling='cyclic_poisson'"):
        jaxdp.PrivacyPlan(**kw, bands=4)
    with pytest.raises(ValueError, match="exceeds dataset_size"):
        jaxdp.PrivacyPlan(**kw, bands=30, sampling="cyclic_poisson")
    with pytest.raises(ValueError, match="noise_coefficients has 2 entries but bands=4"):
        jaxdp.PrivacyPlan(**kw, bands=4, sampling="cyclic_poisson", noise_coefficients=(0.6, 0.8))
    with pytest.raises(ValueError, match="cyclic_poisson"):
        accounting.make_accountant("rdp", sampling_rate=0.1, noise_multiplier=1.0, bands=4)


def test_plan_builds_matching_sampler_noise_and_event():
    plan = jaxdp.PrivacyPlan(
        dataset_size=1000,
        batch_size=50,
        l2_clip_norm=1.0,
        noise_multiplier=1.0,
        num_steps=100,
        bands=4,
        sampling="cyclic_poisson",
    )
    assert plan.mechanism == "bandmf" and plan.sampling_rate == pytest.approx(0.2)
    sampler = plan.sampler(seed=0)
    assert isinstance(sampler, jaxdp.CyclicPoissonSampler) and sampler.bands == 4
    state = plan.privatizer(0).init({"w": jnp.zeros(3)})
    assert isinstance(state, jaxdp.BandedPrivatizeState) and state.history["w"].shape == (3, 3)
    np.testing.assert_allclose(plan.strategy(), bandmf.optimal_coefficients(100, 4))
    assert plan.dp_event().count == 25  # ceil(100 / 4) compositions
    dpsgd = jaxdp.PrivacyPlan(dataset_size=1000, batch_size=50, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=1)
    assert dpsgd.mechanism == "dpsgd" and isinstance(
        dpsgd.privatizer(0).init({"w": jnp.zeros(3)}), jaxdp.PrivatizeState
    )


# -- accounting -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_one_band_accounting_equals_dpsgd(name):
    kw = dict(dataset_size=60000, batch_size=256, l2_clip_norm=1.0, noise_multiplier=1.1, num_steps=700)
    dpsgd = jaxdp.PrivacyPlan(**kw, accountant=name)
    cyclic1 = jaxdp.PrivacyPlan(**kw, accountant=name, sampling="cyclic_poisson", bands=1)
    assert cyclic1.epsilon(1e-5) == dpsgd.epsilon(1e-5)
    assert cyclic1.epsilon(1e-5, steps=123) == dpsgd.epsilon(1e-5, steps=123)


@pytest.mark.parametrize("name, expected", [("rdp", 3.9275121474818455), ("pld", 3.455698205370313)])
def test_bandmf_epsilon_pinned(name, expected):
    """Pinned: N = 60000, B = 250, b = 8 (q_group = 1/30), σ = 1, T = 2000, δ = 1e-5.

    Obtained once with this code (dp-accounting 0.6.0); by the theorem it must equal
    DP-SGD with q = 1/30 for ceil(2000 / 8) = 250 steps, which is checked independently.
    """
    plan = jaxdp.PrivacyPlan(
        dataset_size=60000,
        batch_size=250,
        l2_clip_norm=1.0,
        noise_multiplier=1.0,
        num_steps=2000,
        bands=8,
        sampling="cyclic_poisson",
        accountant=name,
    )
    eps = plan.epsilon(1e-5)
    assert eps == pytest.approx(expected, rel=1e-9)
    same = accounting.make_accountant(name, sampling_rate=1 / 30, noise_multiplier=1.0).epsilon_for(1e-5, 250)
    assert eps == pytest.approx(same, rel=1e-12)
    # Steps 1993..2000 add no participation for group 0's 250th round boundary: ceil(T / b) is what counts.
    assert plan.epsilon(1e-5, steps=1993) == pytest.approx(eps, rel=1e-12)
    assert plan.epsilon(1e-5, steps=1992) < eps


# -- end to end -------------------------------------------------------------------------------------------


def test_train_bandmf_learns_and_resumes_bit_identical(tmp_path):
    """privacy.bands=2 through the real loop: ε as planned, it learns, the noise history is checkpointed."""
    import os
    import shutil

    import orbax.checkpoint as ocp

    from jaxdp.config import apply_overrides, load_config
    from jaxdp.train import train

    digits = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.py")
    common = [
        "privacy.bands=2",
        "batch_size=128",
        "epochs=4",
        "privacy.noise_seed=3",
        "checkpoint.every_epochs=1",
        "checkpoint.keep=6",
    ]
    ref_dir = str(tmp_path / "ref")
    ref = train(apply_overrides(load_config(digits), [*common, f"workdir={ref_dir}"]), progress=False)
    assert ref["mechanism"] == "bandmf" and ref["bands"] == 2
    assert ref["epsilon"] == pytest.approx(3.0, abs=0.01)
    assert 0.6 < ref["test_accuracy"] <= 1.0
    workdir = str(tmp_path / "resumed")
    shutil.copytree(ref_dir, workdir)
    for epoch in (3, 4):  # as if killed after epoch 2
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(epoch)))
    resumed = train(apply_overrides(load_config(digits), [*common, f"workdir={workdir}"]), progress=False, resume=True)
    assert resumed["test_accuracy"] == ref["test_accuracy"] and resumed["epsilon"] == ref["epsilon"]
    a = ocp.StandardCheckpointer().restore(os.path.join(ref_dir, "checkpoints", "4", "state"))
    b = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "4", "state"))
    history = a["train"]["opt_state"][0]["history"]  # the last b - 1 noises are in the checkpoint
    assert jax.tree_util.tree_leaves(history)[0].shape[0] == 1
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)
