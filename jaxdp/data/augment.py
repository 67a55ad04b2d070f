"""On-device augmentation and augmentation multiplicity (De et al. 2022), per example.

Augmentation multiplicity: each example's gradient is the **average** of the
gradients of K augmented copies of that example, taken *before* clipping. It is
still a function of that one example (and public randomness), so the clipped
per-example gradient keeps sensitivity C and the accounting is unchanged; the
averaging reduces the gradient's variance at no privacy cost.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["multiplicity_loss", "random_crop_flip"]


def random_crop_flip(key: jax.Array, image: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
    """Zero-pad one HWC image by ``pad``, crop back to its size at a random offset, maybe flip left-right."""
    h, w, _ = image.shape
    k_crop_y, k_crop_x, k_flip = jax.random.split(key, 3)
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    dy = jax.random.randint(k_crop_y, (), 0, 2 * pad + 1)
    dx = jax.random.randint(k_crop_x, (), 0, 2 * pad + 1)
    out = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, image.shape[2]))
    if flip:
        out = jnp.where(jax.random.bernoulli(k_flip), out[:, ::-1, :], out)
    return out


def multiplicity_loss(
    loss_fn: Callable[..., jax.Array],
    *,
    multiplicity: int,
    augment: Callable[[jax.Array, jax.Array], jax.Array] = random_crop_flip,
) -> Callable[..., jax.Array]:
    """Turn ``loss_fn(params, x, y)`` into ``loss(params, x, y, key_data)`` averaged over K augmentations.

    ``key_data`` holds one raw PRNG key per example (shape ``(batch, 2)``,
    uint32). For each example, K augmented copies share its label; the loss is
    their mean, so ``jax.grad`` of it is the mean of the K gradients. Use it with
    :func:`jaxdp.clipped_grad`, which evaluates it one example at a time.
    """
    if not isinstance(multiplicity, int) or multiplicity < 1:
        raise ValueError(f"multiplicity={multiplicity!r} must be an int >= 1 (augmented copies per example).")

    def loss(params, x, y, key_data):
        def one(xi, yi, ki):
            keys = jax.random.split(jax.random.wrap_key_data(ki), multiplicity)
            copies = jax.vmap(augment, in_axes=(0, None))(keys, xi)
            return loss_fn(params, copies, jnp.repeat(yi[None], multiplicity, axis=0))

        return jnp.mean(jax.vmap(one)(x, y, key_data))

    return loss
