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
    ComplexGroupNorm,
    cardioid,
    check_dp_compatible,
    complex_avg_pool,
    complex_weight_standardize,
    conjugate_mish,
    mod_relu,
    split_mish,
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


def test_complex_weight_standardisation():
    k = complex_weight_standardize(crandn(np.random.default_rng(2), (3, 3, 4, 6)) * 7 + 3j)
    k = np.asarray(k).reshape(-1, 6)
    np.testing.assert_allclose(k.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose((np.abs(k) ** 2).mean(0), 1, rtol=1e-3)


def test_activations():
    z = jnp.array([2.0 + 0j, -2.0 + 0j, 1j, 0j], jnp.complex64)
    np.testing.assert_allclose(cardioid(z), [2.0, 0.0, 0.5j, 0.0], atol=1e-6)
    out = mod_relu(jnp.array([3 + 4j, 0.05 + 0j, 0j]), bias=-0.1)
    np.testing.assert_allclose(out, [(4.9 / 5) * (3 + 4j), 0, 0], atol=1e-6)
    w = jnp.array([0.3 - 1.2j, -0.7 + 0.4j])
    np.testing.assert_allclose(split_mish(w), jax.nn.mish(w.real) + 1j * jax.nn.mish(w.imag), rtol=1e-6)
    np.testing.assert_allclose(conjugate_mish(w), jax.nn.mish(w.real) - 1j * jax.nn.mish(-w.imag), rtol=1e-6)
    np.testing.assert_allclose(
        complex_avg_pool(jnp.arange(16.0).reshape(1, 4, 4, 1) * (1 + 1j))[0, :, :, 0],
        np.array([[2.5, 4.5], [10.5, 12.5]]) * (1 + 1j),
    )


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


def test_complex_cnn_clipped_grads_equal_loop():
    rng = np.random.default_rng(3)
    model = ComplexCNN((8, 8, 1), 3, features=(4, 8), activation="mod_relu", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    x, y = crandn(rng, (6, 8, 8, 1)), jnp.asarray(rng.integers(0, 3, 6))
    got, aux = jax.jit(jaxdp.clipped_grad(loss, l2_clip_norm=0.05, return_norms=True))(params, x, y)
    want = None
    one = jax.jit(jax.grad(loss))
    for i in range(6):
        g = one(params, x[i : i + 1], y[i : i + 1])
        norm = float(jaxdp.per_example_norms(jax.tree_util.tree_map(lambda v: v[None], g))[0])
        np.testing.assert_allclose(norm, float(aux.norms[i]), rtol=1e-4)
        g = jax.tree_util.tree_map(lambda v, n=norm: v * min(1.0, 0.05 / n), g)
        want = g if want is None else jax.tree_util.tree_map(jnp.add, want, g)
    for u, v in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-4, atol=1e-6)
    assert int(aux.num_clipped) > 0
    assert any(jnp.iscomplexobj(v) for v in jax.tree_util.tree_leaves(got))
