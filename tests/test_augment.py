"""Augmentation multiplicity: mean of K augmented gradients, per example, before clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import nnx_loss
from flax import nnx

import jaxdp
from jaxdp.config import apply_overrides, load_config
from jaxdp.data.augment import multiplicity_loss, random_crop_flip
from jaxdp.models import CNN
from jaxdp.train import train


def test_random_crop_flip_is_a_shift_and_a_mirror():
    img = jnp.arange(36.0).reshape(6, 6, 1)
    for seed in range(20):
        out = np.asarray(random_crop_flip(jax.random.key(seed), img, pad=2, flip=True))
        assert out.shape == (6, 6, 1)
        padded = np.pad(np.asarray(img), ((2, 2), (2, 2), (0, 0)))
        found = any(
            np.array_equal(out, crop) or np.array_equal(out, crop[:, ::-1])
            for dy in range(5)
            for dx in range(5)
            for crop in [padded[dy : dy + 6, dx : dx + 6]]
        )
        assert found
    assert np.array_equal(random_crop_flip(jax.random.key(0), img, pad=0, flip=False), img)


def problem():
    rng = np.random.default_rng(0)
    loss_fn, params = nnx_loss(CNN((8, 8, 1), 3, features=(4,), rngs=nnx.Rngs(0)))
    x = jnp.asarray(rng.normal(size=(5, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 5), jnp.int32)
    keys = jax.random.key_data(jax.random.split(jax.random.key(1), 5))
    return loss_fn, params, x, y, keys


def test_per_example_gradient_is_the_mean_over_k_augmented_copies():
    loss_fn, params, x, y, keys = problem()
    k = 3
    mloss = multiplicity_loss(loss_fn, multiplicity=k, augment=lambda key, im: random_crop_flip(key, im, pad=1))
    g, aux = jaxdp.clipped_grad(mloss, l2_clip_norm=1e6, return_norms=True)(params, x, y, keys)
    want = None
    for i in range(5):
        copies = jax.random.split(jax.random.wrap_key_data(keys[i]), k)
        for c in range(k):
            xi = random_crop_flip(copies[c], x[i], pad=1)[None]
            gi = jax.grad(loss_fn)(params, xi, y[i : i + 1])
            gi = jax.tree_util.tree_map(lambda v: v / k, gi)
            want = gi if want is None else jax.tree_util.tree_map(jnp.add, want, gi)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_multiplicity_keeps_examples_separate_and_clipped():
    loss_fn, params, x, y, keys = problem()
    mloss = multiplicity_loss(loss_fn, multiplicity=4, augment=lambda key, im: random_crop_flip(key, im, pad=1))
    fn = jax.jit(jaxdp.clipped_grad(mloss, l2_clip_norm=0.01))
    only0 = jnp.zeros(5).at[0].set(1.0)
    g_a, _ = fn(params, x, y, keys, example_mask=only0)
    g_b, _ = fn(params, x.at[1:].set(100.0), y, keys, example_mask=only0)  # other examples changed
    for a, b in zip(jax.tree_util.tree_leaves(g_a), jax.tree_util.tree_leaves(g_b), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(optax.tree.norm(g_a)) <= 0.01 * (1 + 1e-6)
    with pytest.raises(ValueError, match="multiplicity=0"):
        multiplicity_loss(loss_fn, multiplicity=0)


def test_training_with_multiplicity_spends_the_same_epsilon(tmp_path):
    import os

    digits = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "digits.py")
    base = ["privacy.noise_seed=0"]  # two runs, two workdirs (a workdir holding a run is not written over)
    plain = train(apply_overrides(load_config(f"{digits}:smoke"), [*base, f"workdir={tmp_path}/plain"]), progress=False)
    aug_overrides = [*base, f"workdir={tmp_path}/aug", "augment.multiplicity=2"]
    aug = train(apply_overrides(load_config(f"{digits}:smoke"), aug_overrides), progress=False)
    assert aug["epsilon"] == plain["epsilon"] and aug["steps"] == plain["steps"]
    assert aug["test_accuracy"] != plain["test_accuracy"]  # the augmentation really ran
