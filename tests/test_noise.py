"""Gaussian noise: statistically the right standard deviation, reproducible, per part for complex."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp

N = 400_000  # samples per variance check: std of the sample std is sigma / sqrt(2N) ~ 0.11%


def assert_std(samples, expected):
    """Sample std within 5 standard errors of `expected`; rejects a wrong sigma by far."""
    samples = np.asarray(samples, np.float64).ravel()
    se = expected / np.sqrt(2 * samples.size)
    assert abs(samples.std() - expected) < 5 * se, (samples.std(), expected)
    assert abs(samples.mean()) < 5 * expected / np.sqrt(samples.size)


def test_add_noise_std_matches():
    tree = {"a": jnp.zeros((N // 2,)), "b": jnp.zeros((N // 4, 2))}
    noisy = jaxdp.add_noise(jax.random.key(0), tree, 2.5)
    assert_std(np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(noisy)]), 2.5)
    # The check is sharp enough to tell sigma from 1.01 sigma or sigma / sqrt(2).
    with pytest.raises(AssertionError):
        assert_std(noisy["a"], 2.5 * 1.02)
    with pytest.raises(AssertionError):
        assert_std(noisy["a"], 2.5 / np.sqrt(2))


def test_add_noise_keys():
    tree = {"w": jnp.zeros(1000), "v": jnp.ones((3, 4))}
    a = jaxdp.add_noise(jax.random.key(1), tree, 1.0)
    b = jaxdp.add_noise(jax.random.key(1), tree, 1.0)
    c = jaxdp.add_noise(jax.random.key(2), tree, 1.0)
    assert np.array_equal(a["w"], b["w"]) and np.array_equal(a["v"], b["v"])
    assert not np.allclose(a["w"], c["w"])
    # Leaves get independent noise, not the same draw reused.
    assert not np.allclose(a["w"][:12], (a["v"] - 1.0).ravel())


def test_complex_leaves_get_full_variance_per_part():
    noisy = jaxdp.add_noise(jax.random.key(3), jnp.zeros((N,), jnp.complex64), 1.5)
    assert noisy.dtype == jnp.complex64
    assert_std(np.real(noisy), 1.5)
    assert_std(np.imag(noisy), 1.5)
    # jax.random.normal's complex convention (variance 1/2 per part) would fail this check.
    half = 1.5 * jax.random.normal(jax.random.key(3), (N,), jnp.complex64)
    with pytest.raises(AssertionError):
        assert_std(np.real(half), 1.5)


def test_integer_leaves_refused():
    with pytest.raises(TypeError, match="dtype"):
        jaxdp.add_noise(jax.random.key(0), {"n": jnp.zeros(3, jnp.int32)}, 1.0)


def test_privatize_is_noisy_mean_of_sum():
    sigma, clip, batch = 1.3, 0.8, 64
    grad_sum = {"w": jnp.full((N,), 5.0)}
    tx = jaxdp.privatize(noise_multiplier=sigma, l2_clip_norm=clip, expected_batch_size=batch, key=7)
    state = tx.init(grad_sum)
    out, state2 = tx.update(grad_sum, state)
    noise = np.asarray(out["w"]) * batch - 5.0
    assert_std(noise, sigma * clip)
    # A second step draws fresh noise.
    out2, _ = tx.update(grad_sum, state2)
    assert not np.allclose(out["w"], out2["w"])
    # Without noise it is exactly the sum over the *expected* batch size.
    tx0 = jaxdp.privatize(noise_multiplier=0.0, l2_clip_norm=clip, expected_batch_size=batch, key=7)
    out0, _ = tx0.update(grad_sum, tx0.init(grad_sum))
    np.testing.assert_array_equal(out0["w"], np.full((N,), 5.0 / batch, np.float32))


def test_privatize_chains_with_optax_and_jits():
    params = {"w": jnp.ones(4)}
    tx = optax.chain(
        jaxdp.privatize(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=8, key=jax.random.key(0)),
        optax.sgd(0.1),
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    u1, state = step(params, state, params)
    u2, state = step(params, state, params)
    assert u1["w"].shape == (4,) and not np.allclose(u1["w"], u2["w"])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(noise_multiplier=-1.0, l2_clip_norm=1.0, expected_batch_size=8), "noise_multiplier"),
        (dict(noise_multiplier=float("nan"), l2_clip_norm=1.0, expected_batch_size=8), "noise_multiplier"),
        (dict(noise_multiplier=1.0, l2_clip_norm=0.0, expected_batch_size=8), "l2_clip_norm"),
        (dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=0), "expected_batch_size"),
        (dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=8.5), "expected_batch_size"),
    ],
)
def test_privatize_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        jaxdp.privatize(key=0, **kwargs)
