"""Complex-valued layers: no cross-example mixing, whitening, standardisation, activations, per-example grads."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdp
from jaxdp.models import (
    ComplexCNN,
    ComplexConv,
    ComplexGroupNorm,
    GroupNormCNN,
    cardioid,
    check_dp_compatible,
    complex_avg_pool,
    complex_conv_same,
    complex_weight_standardize,
    conjugate_mish,
    mod_relu,
    split_mish,
    weight_standardize,
)


def crandn(rng, shape):
    return jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape), jnp.complex64)


def test_group_norm_does_not_mix_examples():
    rng = np.random.default_rng(0)
    norm = ComplexGroupNorm(8, 4)
    z = crandn(rng, (5, 4, 4, 8))
    out = norm(z)
    z2 = z.at[3].set(crandn(rng, (4, 4, 8)) * 100)  # change example 3 only
    out2 = norm(z2)
    np.testing.assert_array_equal(np.delete(np.asarray(out), 3, 0), np.delete(np.asarray(out2), 3, 0))
    assert not np.allclose(out[3], out2[3])


def test_group_norm_whitens_re_and_im():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(2, 16, 16, 4))
    # Strongly correlated, unequal-variance (Re, Im) with an offset.
    z = jnp.asarray(3 * base + 1j * (2 * base + 0.5 * rng.normal(size=base.shape)) + (5 - 2j), jnp.complex64)
    norm = ComplexGroupNorm(4, 1)
    norm.gamma_rr[...] = jnp.ones(4)
    norm.gamma_ii[...] = jnp.ones(4)
    out = np.asarray(norm(z))
    for i in range(2):
        re, im = out[i].real.ravel(), out[i].imag.ravel()
        cov = np.cov(np.stack([re, im]), bias=True)
        np.testing.assert_allclose(cov, np.eye(2), atol=1e-3)
        assert abs(re.mean()) < 1e-4 and abs(im.mean()) < 1e-4


def test_complex_weight_standardisation_modulus():
    k = complex_weight_standardize(crandn(np.random.default_rng(2), (3, 3, 4, 6)) * 7 + 3j, mode="modulus")
    k = np.asarray(k).reshape(-1, 6)
    np.testing.assert_allclose(k.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose((np.abs(k) ** 2).mean(0), 1, rtol=1e-3)


def _whiten_reference(kernel, eps=1e-5):
    """The authors' whitening WS, written independently in float64 numpy: per output channel, Re and Im
    centred, then multiplied by the inverse square root of their 2x2 covariance (eps on the variances,
    by eigendecomposition), then by 1/sqrt(2)."""
    k = np.asarray(kernel, np.complex128).reshape(-1, kernel.shape[-1])
    out = np.empty_like(k)
    for c in range(k.shape[1]):
        v = np.stack([k[:, c].real, k[:, c].imag])
        v = v - v.mean(1, keepdims=True)
        cov = (v @ v.T) / v.shape[1] + eps * np.eye(2)
        lam, u = np.linalg.eigh(cov)
        w = u @ np.diag(lam**-0.5) @ u.T @ v / np.sqrt(2)
        out[:, c] = w[0] + 1j * w[1]
    return out.reshape(kernel.shape)


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_complex_weight_standardisation_whiten_matches_reference(scale):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(3, 3, 4, 6))
    # Correlated, unequal-variance Re and Im with offsets, as a trained kernel may have.
    k = scale * (2 * base + 1j * (base + 0.3 * rng.normal(size=base.shape)) + (1 - 2j))
    kernel = jnp.asarray(k, jnp.complex64)
    got = np.asarray(complex_weight_standardize(kernel))  # "whiten" is the default
    np.testing.assert_allclose(got, _whiten_reference(kernel), rtol=2e-4, atol=2e-5)
    if scale == 1.0:  # (at 1e-3, eps dominates the tiny kernel's covariance, as in the authors' layer)
        flat = got.reshape(-1, 6)
        for c in range(6):
            cov = np.cov(np.stack([flat[:, c].real, flat[:, c].imag]), bias=True)
            np.testing.assert_allclose(cov, 0.5 * np.eye(2), atol=5e-4)  # eps shifts it by ~1e-4


def test_complex_weight_standardisation_centre_none_and_bad_mode():
    k = crandn(np.random.default_rng(5), (3, 3, 2, 4)) + (2 + 1j)
    flat = np.asarray(k).reshape(-1, 4)
    centred = np.asarray(complex_weight_standardize(k, mode="centre")).reshape(-1, 4)
    np.testing.assert_allclose(centred, flat - flat.mean(0), atol=1e-5)
    np.testing.assert_array_equal(complex_weight_standardize(k, mode="none"), k)
    with pytest.raises(ValueError, match="mode='bogus'.*whiten"):
        complex_weight_standardize(k, mode="bogus")
    with pytest.raises(ValueError, match="weight_standardization=True.*whiten"):
        ComplexConv(2, 4, weight_standardization=True, rngs=nnx.Rngs(0))


def test_complex_conv_as_real_block_conv_equals_complex_conv():
    """complex_conv_same (one real convolution on (Re, Im)) equals XLA's complex convolution: values and
    gradients with respect to the input and the complex kernel."""
    rng = np.random.default_rng(6)
    z, k = crandn(rng, (3, 6, 5, 2)), crandn(rng, (3, 3, 2, 4))
    w = crandn(rng, (3, 6, 5, 4))  # a complex cotangent direction

    def direct(z, k):
        return jax.lax.conv_general_dilated(z, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    np.testing.assert_allclose(complex_conv_same(z, k), direct(z, k), rtol=1e-5, atol=1e-5)

    def loss(f):
        return lambda z, k: jnp.sum(jnp.real(f(z, k) * jnp.conj(w)))

    got = jax.grad(loss(complex_conv_same), (0, 1))(z, k)
    want = jax.grad(loss(direct), (0, 1))(z, k)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def test_weight_standardize_real():
    k = weight_standardize(jnp.asarray(np.random.default_rng(7).normal(3, 5, size=(3, 3, 2, 5)), jnp.float32))
    flat = np.asarray(k).reshape(-1, 5)
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(flat.var(0), 1, rtol=1e-3)


def test_activations():
    z = jnp.array([2.0 + 0j, -2.0 + 0j, 1j, 0j], jnp.complex64)
    np.testing.assert_allclose(cardioid(z), [2.0, 0.0, 0.5j, 0.0], atol=1e-6)
    out = mod_relu(jnp.array([3 + 4j, 0.05 + 0j, 0j]), bias=-0.1)
    np.testing.assert_allclose(out, [(4.9 / 5) * (3 + 4j), 0, 0], atol=1e-6)
    w = jnp.array([0.3 - 1.2j, -0.7 + 0.4j])
    np.testing.assert_allclose(split_mish(w), jax.nn.mish(w.real) + 1j * jax.nn.mish(w.imag), rtol=1e-6)
    np.testing.assert_allclose(
        complex_avg_pool(jnp.arange(16.0).reshape(1, 4, 4, 1) * (1 + 1j))[0, :, :, 0],
        np.array([[2.5, 4.5], [10.5, 12.5]]) * (1 + 1j),
    )


def test_conjugate_mish_is_the_authors():
    """Riess, Ziller et al.'s ConjugateMish: Re = mish(Re z) - mish(Im z), Im = mish(Re z) + mish(Im z)."""
    a, b = np.array([0.3, -0.7, 2.0, -3.0]), np.array([-1.2, 0.4, 0.0, 5.0])

    def mish(x):
        return x * np.tanh(np.log1p(np.exp(x)))

    got = np.asarray(conjugate_mish(jnp.asarray(a + 1j * b, jnp.complex64)))
    np.testing.assert_allclose(got.real, mish(a) - mish(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.imag, mish(a) + mish(b), rtol=1e-5, atol=1e-6)


def test_cardioid_equals_its_angle_form_with_finite_gradients_at_zero():
    rng = np.random.default_rng(8)
    z = crandn(rng, (200,)) * jnp.asarray(10.0 ** rng.uniform(-6, 3, 200), jnp.float32)
    zz = np.asarray(z, np.complex128)
    err = np.abs(np.asarray(cardioid(z)) - 0.5 * (1 + np.cos(np.angle(zz))) * zz)
    assert np.all(err <= 1e-6 * np.abs(zz))  # float32 rounding of the factor in [0, 1], times |z|
    zero = jnp.zeros(3, jnp.complex64)  # a zero-padded example's activations
    for f in (cardioid, mod_relu):
        g = jax.grad(lambda v, f=f: jnp.sum(jnp.abs(f(v)) ** 2 + jnp.real(f(v))))(zero)
        assert np.all(np.isfinite(np.asarray(g))), f.__name__


def test_complex_batchnorm_is_refused():
    class ComplexBatchNorm(nnx.Module):
        def __init__(self):
            self.scale = nnx.Param(jnp.ones(3))

    class Net(nnx.Module):
        def __init__(self):
            self.bn = ComplexBatchNorm()

    with pytest.raises(ValueError, match="'bn' is ComplexBatchNorm.*ComplexGroupNorm"):
        check_dp_compatible(Net())
    check_dp_compatible(ComplexCNN((8, 8, 1), 3, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize(
    ("activation", "ws"), [("mod_relu", "modulus"), ("conjugate_mish", "whiten"), ("cardioid", "centre")]
)
def test_complex_cnn_clipped_grads_equal_loop(activation, ws):
    rng = np.random.default_rng(3)
    model = ComplexCNN(
        (8, 8, 1), 3, features=(4, 8), activation=activation, weight_standardization=ws, rngs=nnx.Rngs(0)
    )
    grads = _check_clipped_equals_loop(model, crandn(rng, (6, 8, 8, 1)), rng)
    assert any(jnp.iscomplexobj(v) for v in jax.tree_util.tree_leaves(grads))


def test_group_norm_cnn_clipped_grads_equal_loop_and_do_not_mix_examples():
    rng = np.random.default_rng(9)
    model = GroupNormCNN((8, 8, 2), 3, features=(4, 8), rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(6, 8, 8, 2)), jnp.float32)
    _check_clipped_equals_loop(model, x, rng)
    check_dp_compatible(model)
    out, out2 = model(x), model(x.at[2].set(jnp.asarray(rng.normal(size=(8, 8, 2)), jnp.float32)))
    np.testing.assert_array_equal(np.delete(np.asarray(out), 2, 0), np.delete(np.asarray(out2), 2, 0))
    assert not np.allclose(out[2], out2[2])
    with pytest.raises(ValueError, match="groups=3 must divide"):
        GroupNormCNN((8, 8, 1), 3, features=(4, 8), groups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation='gelu'"):
        GroupNormCNN((8, 8, 1), 3, activation="gelu", rngs=nnx.Rngs(0))


def _check_clipped_equals_loop(model, x, rng):
    """jaxdp's clipped sum and norms equal a loop over examples (batch of one, clip, add); returns the sum."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    y = jnp.asarray(rng.integers(0, 3, x.shape[0]))
    got, aux = jax.jit(jaxdp.clipped_grad(loss, l2_clip_norm=0.05, return_norms=True))(params, x, y)
    want = None
    one = jax.jit(jax.grad(loss))
    for i in range(x.shape[0]):
        g = one(params, x[i : i + 1], y[i : i + 1])
        norm = float(jaxdp.per_example_norms(jax.tree_util.tree_map(lambda v: v[None], g))[0])
        np.testing.assert_allclose(norm, float(aux.norms[i]), rtol=1e-4)
        g = jax.tree_util.tree_map(lambda v, n=norm: v * min(1.0, 0.05 / n), g)
        want = g if want is None else jax.tree_util.tree_map(jnp.add, want, g)
    for u, v in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-4, atol=1e-6)
    assert int(aux.num_clipped) > 0
    return got
