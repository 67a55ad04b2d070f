"""DP-compatible models, and the refusal of BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdp.models import CNN, MLP, avg_pool, check_dp_compatible, make_model, max_pool


class WithBatchNorm(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.dense(x))


class WithGroupAndLayerNorm(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=4, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)

    def __call__(self, x):
        return self.ln(self.gn(self.conv(x)))


def test_batchnorm_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"'norm' is BatchNorm.*GroupNorm.*LayerNorm"):
        check_dp_compatible(WithBatchNorm(nnx.Rngs(0)))


def test_nested_batchnorm_is_found():
    class Outer(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs), WithBatchNorm(rngs)])

    with pytest.raises(ValueError, match="blocks/1/norm"):
        check_dp_compatible(Outer(nnx.Rngs(0)))


def test_per_example_norms_and_our_models_are_accepted():
    check_dp_compatible(WithGroupAndLayerNorm(nnx.Rngs(0)))
    check_dp_compatible(MLP(4, 2, rngs=nnx.Rngs(0)))
    check_dp_compatible(CNN((8, 8, 1), 3, rngs=nnx.Rngs(0)))


def test_make_model_shapes_and_errors():
    assert make_model("cnn", input_shape=(8, 8, 1), num_classes=10, seed=0)(jnp.ones((2, 8, 8, 1))).shape == (2, 10)
    assert make_model("mlp", input_shape=(8, 8, 1), num_classes=3, seed=0)(jnp.ones((5, 8, 8, 1))).shape == (5, 3)
    with pytest.raises(ValueError, match="model='resnet'"):
        make_model("resnet", input_shape=(8, 8, 1), num_classes=10, seed=0)
    with pytest.raises(ValueError, match="too small"):
        make_model("cnn", input_shape=(2, 2, 1), num_classes=10, seed=0, features=(4, 4))


@pytest.mark.slow  # ~11 s: a performance layer; ghost and loop equality cover its gradients
def test_dpconv_matches_nnx_conv_values_and_gradients():
    """DPConv is nnx.Conv with a different weight-gradient formula: same numbers, batched or per example."""
    import jax
    import numpy as np

    from jaxdp.models import DPConv

    for kernel_size, cin, cout in [((3, 3), 2, 5), ((5, 3), 3, 4), ((1, 1), 1, 2)]:
        ours = DPConv(cin, cout, kernel_size, rngs=nnx.Rngs(0))
        ref = nnx.Conv(cin, cout, kernel_size=kernel_size, padding="SAME", rngs=nnx.Rngs(0))
        ref.kernel[...] = ours.kernel[...]
        ref.bias[...] = jnp.asarray(np.random.default_rng(1).normal(size=cout), jnp.float32)
        ours.bias[...] = ref.bias[...]
        x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 7, 6, cin)), jnp.float32)
        np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)

        def loss(module, xb):
            return jnp.sum(jnp.sin(module(xb)))

        g_ours = nnx.grad(loss)(ours, x)
        g_ref = nnx.grad(loss)(ref, x)
        np.testing.assert_allclose(g_ours.kernel[...], g_ref.kernel[...], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g_ours.bias[...], g_ref.bias[...], rtol=1e-4, atol=1e-5)
        # Per-example (vmap of grad) and input gradients agree too.
        gdef_o, p_o = nnx.split(ours)
        gdef_r, p_r = nnx.split(ref)

        def per_example(gdef, p, x=x):
            return jax.vmap(jax.grad(lambda p_, xi: loss(nnx.merge(gdef, p_), xi[None])), in_axes=(None, 0))(p, x)

        np.testing.assert_allclose(
            per_example(gdef_o, p_o)["kernel"][...], per_example(gdef_r, p_r)["kernel"][...], rtol=1e-4, atol=1e-5
        )
        gx_o = jax.grad(lambda xb, m=ours: loss(m, xb))(x)
        gx_r = jax.grad(lambda xb, m=ref: loss(m, xb))(x)
        np.testing.assert_allclose(gx_o, gx_r, rtol=1e-4, atol=1e-5)


def test_transformer_shapes_registry_and_no_example_mixing():
    """TransformerClassifier: (B, T) int tokens -> (B, classes); example i's logits and gradient see only example i."""
    import jax
    import numpy as np

    from jaxdp.models import TransformerClassifier

    model = TransformerClassifier(50, 3, max_len=8, dim=16, heads=4, depth=2, mlp_dim=32, rngs=nnx.Rngs(0))
    check_dp_compatible(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 50, size=(4, 8)), jnp.int32)
    logits = model(tokens)
    assert logits.shape == (4, 3) and logits.dtype == jnp.float32
    assert model(tokens[:, :5]).shape == (4, 3)  # shorter sequences use the first positions
    # Changing the other examples leaves example 0's logits unchanged.
    other = tokens.at[1:].set(jnp.asarray(rng.integers(0, 50, size=(3, 8)), jnp.int32))
    np.testing.assert_allclose(model(other)[0], logits[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model(tokens[:1])[0], logits[0], rtol=1e-5, atol=1e-6)
    # Per-example gradients (vmap of grad on batches of one) equal a python loop of batch-of-one gradients.
    graphdef, params = nnx.split(model)

    def loss(p, t):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(t)))

    batched = jax.jit(jax.vmap(jax.grad(lambda p, t: loss(p, t[None])), in_axes=(None, 0)))(params, tokens)
    grad_one = jax.jit(jax.grad(loss))  # compiled once for the four batches of one
    for i in range(4):
        single = grad_one(params, tokens[i : i + 1])
        for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(batched), strict=True):
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(a), rtol=1e-4, atol=1e-6)
    built = make_model("transformer", input_shape=(8,), num_classes=5, seed=0, vocab_size=50, dim=16)
    assert built(tokens).shape == (4, 5)
    with pytest.raises(ValueError, match="vocab_size"):
        make_model("transformer", input_shape=(8,), num_classes=5, seed=0)
    with pytest.raises(ValueError, match="input_shape"):
        make_model("transformer", input_shape=(8, 8, 1), num_classes=5, seed=0, vocab_size=50)
    with pytest.raises(ValueError, match="max_len=8"):
        model(jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(ValueError, match="heads=3"):
        TransformerClassifier(50, 3, max_len=8, dim=16, heads=3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("window,strides,shape", [((2, 2), (1, 1), (3, 14, 14, 5)), ((3, 2), (2, 1), (2, 9, 8, 3))])
def test_max_pool_equals_nnx_max_pool_with_its_gradient(window, strides, shape):
    """jaxdp.models.max_pool (strided slices; the DP MNIST CNN's pooling) has nnx.max_pool's values, and its gradient
    on inputs without ties."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    want = nnx.max_pool(x, window, strides=strides)
    np.testing.assert_array_equal(np.asarray(max_pool(x, window, strides)), np.asarray(want))
    g = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32)
    got_dx = jax.vjp(lambda x: max_pool(x, window, strides), x)[1](g)[0]
    want_dx = jax.vjp(lambda x: nnx.max_pool(x, window, strides=strides), x)[1](g)[0]
    np.testing.assert_allclose(np.asarray(got_dx), np.asarray(want_dx), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 8, 8, 4), (2, 7, 9, 3)])  # 7 x 9: the partial edge window is dropped
def test_avg_pool_equals_nnx_avg_pool_with_its_gradient(shape):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    want = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    np.testing.assert_allclose(np.asarray(avg_pool(x, (2, 2))), np.asarray(want), rtol=1e-6, atol=1e-7)
    g = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32)
    got_dx = jax.vjp(lambda x: avg_pool(x, (2, 2)), x)[1](g)[0]
    want_dx = jax.vjp(lambda x: nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2)), x)[1](g)[0]
    np.testing.assert_allclose(np.asarray(got_dx), np.asarray(want_dx), rtol=1e-6, atol=1e-7)
