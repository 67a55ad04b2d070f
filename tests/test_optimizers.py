"""jaxdp.optimizers: the private optimizer chain, complex parameters (conjugation, clipping over Re and Im
together, exact per-example grads) and the kept last update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tree_allclose

import jaxdp


def complex_problem(seed=0, n=9, d=5):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=(n, d)) + 1j * rng.normal(size=(n, d)), jnp.complex64)
    w_true = jnp.asarray(rng.normal(size=d) + 1j * rng.normal(size=d), jnp.complex64)
    b = a @ w_true
    return a, b, w_true


def lsq(w, a, b):
    return jnp.mean(jnp.abs(a @ w["w"] - b) ** 2)


def test_complex_per_example_grads_equal_loop_and_respect_the_bound():
    a, b, _ = complex_problem()
    params = {"w": jnp.zeros(5, jnp.complex64)}
    clip = 0.7
    fn = jax.jit(jaxdp.clipped_grad(lsq, l2_clip_norm=clip, return_norms=True))
    got, aux = fn(params, a, b)
    total = np.zeros(5, np.complex128)
    for i in range(a.shape[0]):
        g = np.asarray(jax.grad(lsq)(params, a[i : i + 1], b[i : i + 1])["w"], np.complex128)
        norm = np.sqrt(np.sum(g.real**2 + g.imag**2))  # Re and Im together
        np.testing.assert_allclose(float(aux.norms[i]), norm, rtol=1e-5)
        total += g * min(1.0, clip / norm)
        one = jnp.zeros(a.shape[0]).at[i].set(1.0)
        gi, _ = fn(params, a, b, example_mask=one)
        assert float(jnp.sqrt(jnp.sum(jnp.abs(gi["w"]) ** 2))) <= clip * (1 + 1e-6)
    tree_allclose(got, {"w": total}, rtol=1e-4, atol=1e-6)
    assert got["w"].dtype == jnp.complex64


def _train(conjugate: bool, steps=300):
    a, b, w_true = complex_problem(n=64)
    params = {"w": jnp.zeros(5, jnp.complex64)}
    grad_fn = jaxdp.clipped_grad(lsq, l2_clip_norm=1e3)  # no clipping active
    priv = jaxdp.privatize(l2_clip_norm=1e3, noise_multiplier=0.0, expected_batch_size=64, key=0)
    opt = optax.sgd(0.05)
    tx = jaxdp.dp_optimizer(priv, opt) if conjugate else optax.chain(priv, opt)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        g, _ = grad_fn(params, a, b)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return float(jnp.linalg.norm(params["w"] - w_true)), float(lsq(params, a, b))


def test_complex_least_squares_converges_only_with_conjugation():
    err, loss = _train(conjugate=True)
    assert err < 1e-3 and loss < 1e-5
    err_wrong, loss_wrong = _train(conjugate=False)
    assert err_wrong > 1.0 or not np.isfinite(err_wrong)  # the imaginary part goes the wrong way


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_conjugation_makes_any_optax_optimizer_descend(name):
    opt = optax.sgd(0.1) if name == "sgd" else optax.adam(0.1)
    tx = optax.chain(jaxdp.conjugate_complex(), opt)
    z = jnp.array([0.0 + 0.0j])
    c = jnp.array([1.0 + 2.0j])
    state = tx.init(z)
    for _ in range(200):
        g = jax.grad(lambda z: jnp.sum(jnp.abs(z - c) ** 2))(z)
        u, state = tx.update(g, state, z)
        z = optax.apply_updates(z, u)
    np.testing.assert_allclose(np.asarray(z), np.asarray(c), atol=0.05)


def test_real_leaves_pass_through_unchanged():
    tx = jaxdp.conjugate_complex()
    g = {"r": jnp.array([1.0, -2.0]), "c": jnp.array([1 + 1j])}
    out, _ = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(out["r"], g["r"])
    np.testing.assert_array_equal(out["c"], jnp.array([1 - 1j]))


def test_keep_last_update_passes_updates_through_and_keeps_them_in_float32():
    tx = jaxdp.optimizers.keep_last_update()
    params = {"w": jnp.zeros(3, jnp.bfloat16)}
    state = tx.init(params)
    assert state.last_update["w"].dtype == jnp.float32 and not np.any(np.asarray(state.last_update["w"]))
    g = {"w": jnp.array([1.0, -2.0, 0.5], jnp.bfloat16)}
    out, state = tx.update(g, state)
    assert out is g  # unchanged
    np.testing.assert_array_equal(np.asarray(state.last_update["w"]), np.array([1.0, -2.0, 0.5], np.float32))


def test_dp_optimizer_privatizes_first_then_conjugates_then_optimizes():
    """chain(privatizer, conjugate, sgd): the noisy average of a complex gradient sum is conjugated before SGD."""
    key = jaxdp.key_from_secret(11)
    privatizer = jaxdp.privatize(l2_clip_norm=1.0, noise_multiplier=0.5, expected_batch_size=4, key=key)
    tx = jaxdp.dp_optimizer(privatizer, optax.sgd(1.0))
    params = {"z": jnp.zeros(2, jnp.complex64)}
    g_sum = {"z": jnp.array([1 + 2j, -1 + 0.5j], jnp.complex64)}
    updates, _ = tx.update(g_sum, tx.init(params), params)
    noisy, _ = privatizer.update(g_sum, privatizer.init(params))
    np.testing.assert_allclose(np.asarray(updates["z"]), -np.conj(np.asarray(noisy["z"])), rtol=1e-6)
