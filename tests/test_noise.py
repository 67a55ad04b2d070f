"""The noise package: Gaussian noise (jaxdp.noise.gaussian) and banded correlated noise (jaxdp.noise.banded).

Gaussian: statistically the right standard deviation, reproducible, per part for
complex. Banded: the streaming recursion is C^{-1} z, b = 1 is DP-SGD bit for bit.
The strategies themselves are tested in test_bandmf.py.
"""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp import noise as noise_pkg
from jaxdp import rules
from jaxdp.noise import bandmf
from jaxdp.noise.gaussian import check_privatize_args, standard_normal_like

NOISE_DIR = pathlib.Path(jaxdp.__file__).parent / "noise"

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
    with pytest.raises(ValueError, match=name):  # the banded privatizer applies the same rules
        jaxdp.privatize_banded(key=0, coefficients=[1.0], **kwargs)


# -- the shared pieces: one source of draws, one argument check -----------------------------------------


def test_standard_normal_like_is_the_draw_add_noise_uses():
    key = jax.random.key(4)
    tree = {"f": jnp.ones(1000), "h": jnp.zeros((4, 5), jnp.bfloat16), "c": jnp.zeros(3, jnp.complex64)}
    z = standard_normal_like(key, tree)
    assert jax.tree_util.tree_structure(z) == jax.tree_util.tree_structure(tree)
    # Drawn in at least float32: a bfloat16 leaf gets a float32 draw; complex gets both parts.
    assert z["f"].dtype == jnp.float32 and z["h"].dtype == jnp.float32 and z["c"].dtype == jnp.complex64
    assert np.all(np.imag(np.asarray(z["c"])) != 0)
    again = standard_normal_like(key, tree)
    for a, b in zip(jax.tree_util.tree_leaves(z), jax.tree_util.tree_leaves(again), strict=True):
        assert np.array_equal(a, b)  # the same key gives the same z
    np.testing.assert_array_equal(jaxdp.add_noise(key, tree, 2.0)["f"], 1.0 + 2.0 * np.asarray(z["f"]))
    assert standard_normal_like(key, {}) == {}
    with pytest.raises(TypeError, match="dtype int32"):
        standard_normal_like(key, {"n": jnp.zeros(2, jnp.int32)})


def test_the_draw_never_depends_on_what_the_leaves_hold():
    """standard_normal_like waits for the tree (a cond on one value of each leaf, so XLA cannot draw the noise
    while the gradient is still being formed) but draws the same z whatever the leaves hold: a NaN in the value
    it looks at, an empty leaf, jitted or not. And z is the plain draw: one key split per leaf, N(0, 1) each."""
    key = jax.random.key(11)
    tree = {"a": jnp.ones((3, 4)), "b": jnp.zeros(5, jnp.bfloat16), "c": jnp.zeros(2, jnp.complex64)}
    nan_tree = {"a": tree["a"].at[0, 0].set(jnp.nan), "b": tree["b"].at[0].set(jnp.inf), "c": tree["c"] * jnp.nan}
    keys = jax.random.split(key, 3)  # leaves in tree order: a, b, c
    kr, ki = jax.random.split(keys[2])
    plain = {
        "a": jax.random.normal(keys[0], (3, 4)),
        "b": jax.random.normal(keys[1], (5,)),
        "c": jax.lax.complex(jax.random.normal(kr, (2,)), jax.random.normal(ki, (2,))),
    }
    jitted = jax.jit(standard_normal_like)
    for t in (tree, nan_tree):
        for z in (standard_normal_like(key, t), jitted(key, t)):
            for name in plain:
                np.testing.assert_array_equal(np.asarray(z[name]), np.asarray(plain[name]))
    empty = {"e": jnp.zeros((0, 3)), "a": tree["a"]}
    z = jitted(key, empty)
    assert z["e"].shape == (0, 3)
    np.testing.assert_array_equal(z["a"], jax.random.normal(jax.random.split(key, 2)[0], (3, 4)))
    only_empty = standard_normal_like(key, {"e": jnp.zeros(0)})
    assert only_empty["e"].shape == (0,)


def test_check_privatize_args_returns_stddev_batch_and_key():
    stddev, batch, key = check_privatize_args(0.5, 2.0, np.int64(16), 7)
    assert stddev == 1.0 and batch == 16 and type(batch) is int
    assert np.array_equal(jax.random.key_data(key), jax.random.key_data(jaxdp.key_from_secret(7)))
    assert check_privatize_args(1.0, 0, 1, 0)[0] == 0.0  # sigma = 0: no noise (tests and audits)
    with pytest.raises(ValueError, match="expected_batch_size=True"):
        check_privatize_args(1.0, 1.0, True, 0)
    # C and sigma follow jaxdp.rules: the one message per rule, whatever the entry point.
    for bad in ("1.0", None, 0.0, float("inf")):
        with pytest.raises(ValueError) as e:
            check_privatize_args(bad, 1.0, 8, 0)
        with pytest.raises(ValueError) as same:
            rules.check_clip_norm(bad)
        assert str(e.value) == str(same.value)
    with pytest.raises(ValueError) as e:
        check_privatize_args(1.0, -1.0, 8, 0)
    with pytest.raises(ValueError) as same:
        rules.check_noise_multiplier(-1.0)
    assert str(e.value) == str(same.value)


def test_noise_package_face_and_it_imports_no_accounting():
    """The face keeps the public names; device math never reaches the accountant, nor private names."""
    face = {"add_noise", "privatize", "privatize_banded", "PrivatizeState", "BandedPrivatizeState"}
    assert face <= set(noise_pkg.__all__)
    assert noise_pkg.bandmf is bandmf and jaxdp.privatize is noise_pkg.privatize
    for path in NOISE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                modules, names = [node.module or ""], [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                modules, names = [a.name for a in node.names], []
            else:
                continue
            assert not any(m.startswith("jaxdp.accounting") for m in modules), (path.name, modules)
            assert not any(n.startswith("_") for n in names), (path.name, names)


# -- banded (BandMF) noise: the streaming recursion is C^{-1} z ------------------------------------------


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
        z = standard_normal_like(noise_key, tree)
        out.append(np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree_util.tree_leaves(z)]))
    return np.stack(out)


def banded(c, key=0, sigma=1.0, batch=1):
    return jaxdp.privatize_banded(
        l2_clip_norm=1.0, noise_multiplier=sigma, expected_batch_size=batch, key=key, coefficients=c
    )


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


def test_banded_refuses_coefficients_without_unit_norm():
    with pytest.raises(ValueError, match="norm"):
        banded([0.5, 0.5])
