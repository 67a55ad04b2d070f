"""Banded matrix-factorization noise (BandMF): strategy, streaming noise, cyclic Poisson sampling, accounting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdp
from jaxdp import accounting, bandmf
from jaxdp.noise import _standard_normal_like


def run_noise(tx, tree, steps):
    """Outputs of ``steps`` updates of zero gradients (the noise stream itself), flattened per step."""
    state = tx.init(tree)
    update = jax.jit(tx.update)
    out = []
    for _ in range(steps):
        noisy, state = update(tree, state)
        out.append(np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree_util.tree_leaves(noisy)]))
    return np.stack(out), state


def fresh_draws(key, tree, steps):
    """The z_t a privatizer with ``key`` draws: the same key splitting, one split per step."""
    out = []
    for _ in range(steps):
        key, noise_key = jax.random.split(key)
        z = _standard_normal_like(noise_key, tree)
        out.append(np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree_util.tree_leaves(z)]))
    return np.stack(out)


def banded(c, key=0, sigma=1.0, batch=1):
    return jaxdp.privatize_banded(
        l2_clip_norm=1.0, noise_multiplier=sigma, expected_batch_size=batch, key=key, coefficients=c
    )


# -- the streaming recursion is C^{-1} z -------------------------------------------------------------


@pytest.mark.parametrize("bands", [2, 4, 7])
def test_streaming_noise_equals_dense_inverse(bands):
    t = 14
    c = bandmf.optimal_coefficients(t, bands)
    tree = {"a": jnp.zeros((3, 5)), "b": jnp.zeros(7)}
    noise, state = run_noise(banded(c, key=3, sigma=2.0, batch=4), tree, t)
    z = fresh_draws(jaxdp.key_from_secret(3), tree, t)  # what key=3 means
    dense = np.linalg.inv(bandmf.dense_strategy(c, t)) @ z  # rows: steps
    np.testing.assert_allclose(noise, 2.0 * dense / 4, rtol=2e-5, atol=2e-6)
    assert int(state.count) == t
    assert jax.tree_util.tree_leaves(state.history)[0].shape[0] == bands - 1  # O(b * model) memory


def test_one_band_is_dpsgd_bit_for_bit():
    tree = {"w": jnp.linspace(-1, 1, 300).reshape(20, 15), "c": jnp.ones(4, jnp.complex64)}
    plain = jaxdp.privatize(l2_clip_norm=0.7, noise_multiplier=1.3, expected_batch_size=32, key=11)
    band1 = jaxdp.privatize_banded(
        l2_clip_norm=0.7, noise_multiplier=1.3, expected_batch_size=32, key=11, coefficients=[1.0]
    )
    sp, sb = plain.init(tree), band1.init(tree)
    for _ in range(3):
        up, sp = jax.jit(plain.update)(tree, sp)
        ub, sb = jax.jit(band1.update)(tree, sb)
        for a, b in zip(jax.tree_util.tree_leaves(up), jax.tree_util.tree_leaves(ub), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_noise_covariance_across_steps_matches_factorisation():
    """Empirical T x T covariance over 40k coordinates == C^{-1} C^{-T}, entry by entry (6 standard errors)."""
    t, bands, n = 8, 3, 40_000
    c = bandmf.optimal_coefficients(t, bands)
    cinv = np.linalg.inv(bandmf.dense_strategy(c, t))
    target = cinv @ cinv.T

    def consistent(samples, sigma):
        emp = samples @ samples.T / samples.shape[1]
        se = np.sqrt((np.outer(np.diag(sigma), np.diag(sigma)) + sigma**2) / samples.shape[1])
        return np.all(np.abs(emp - sigma) < 6 * se)

    noise, _ = run_noise(banded(c, key=5), {"w": jnp.zeros(n)}, t)
    assert consistent(noise, target)
    # The test has power: independent noise (DP-SGD's) is rejected against this covariance,
    # and the correlated stream is rejected as independent.
    independent, _ = run_noise(banded([1.0], key=5), {"w": jnp.zeros(n)}, t)
    assert not consistent(independent, target)
    assert not consistent(noise, np.eye(t))
    assert np.min(target - np.diag(np.diag(target))) < -0.1  # the correlation cancels noise across steps


def test_banded_noise_complex_leaves_and_state_is_a_params_like_pytree():
    tree = {"z": jnp.zeros((2, 3), jnp.complex64), "r": jnp.zeros(5, jnp.float32)}
    tx = banded(bandmf.optimal_coefficients(10, 3))
    state = tx.init(tree)
    assert state.history["z"].shape == (2, 2, 3) and state.history["z"].dtype == jnp.complex64
    out, state = tx.update(tree, state)
    assert out["z"].dtype == jnp.complex64 and np.all(np.imag(np.asarray(out["z"])) != 0)


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
    with pytest.raises(ValueError, match="norm"):
        banded([0.5, 0.5])


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


def test_bandmf_calibration_and_accountant_state():
    q, steps, bands = 8 * 250 / 60000, 2000, 8
    sigma = accounting.calibrate_noise_multiplier(3.0, 1e-5, q, steps, sampling="cyclic_poisson", bands=bands)
    acc = accounting.make_accountant(
        "rdp", sampling_rate=q, noise_multiplier=sigma, sampling="cyclic_poisson", bands=bands
    )
    assert acc.epsilon_for(1e-5, steps) <= 3.0
    smaller = accounting.make_accountant(
        "rdp", sampling_rate=q, noise_multiplier=sigma / 1.001, sampling="cyclic_poisson", bands=bands
    )
    assert smaller.epsilon_for(1e-5, steps) > 3.0
    assert sigma == pytest.approx(1.1410909566170746, rel=1e-3)  # pinned with this code
    # One band: the DP-SGD calibration exactly.
    assert accounting.calibrate_noise_multiplier(
        3.0, 1e-5, 250 / 60000, steps, sampling="cyclic_poisson", bands=1
    ) == accounting.calibrate_noise_multiplier(3.0, 1e-5, 250 / 60000, steps)
    acc.compose(100)
    restored = accounting.make_accountant(
        "rdp", sampling_rate=q, noise_multiplier=sigma, sampling="cyclic_poisson", bands=bands
    ).load_state_dict(acc.state_dict())
    assert restored.steps == 100 and restored.epsilon(1e-5) == acc.epsilon(1e-5)
    other = accounting.make_accountant(
        "rdp", sampling_rate=q, noise_multiplier=sigma, sampling="cyclic_poisson", bands=4
    )
    with pytest.raises(ValueError, match="bands"):
        other.load_state_dict(acc.state_dict())


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


def test_choose_bands_prefers_dpsgd_at_small_epsilon_on_small_data():
    """Predicted error σ_b² · error(c_b) relative to DP-SGD: b = 1 at ε = 1, b > 1 at ε = 8 (digits-sized run)."""
    kw = dict(dataset_size=1437, batch_size=64, num_steps=880, candidates=(2, 4, 8))
    best, rel = bandmf.choose_bands(1.0, 1e-5, **kw)
    assert best == 1 and rel[1] == 1.0 and min(rel[b] for b in (2, 4, 8)) > 1.0
    best, rel = bandmf.choose_bands(8.0, 1e-5, **kw)
    assert best > 1 and rel[best] < 0.8
