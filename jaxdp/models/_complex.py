"""Complex-valued, DP-compatible layers (Flax NNX): nothing here mixes examples.

Conventions: complex64 parameters, NHWC inputs. Parameters are initialised with
variance 1/fan_in split equally between real and imaginary parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdp.models._conv import conv_same
from jaxdp.models._nets import avg_pool, pooled_size

__all__ = [
    "ComplexCNN",
    "ComplexConv",
    "ComplexDense",
    "ComplexGroupNorm",
    "WEIGHT_STANDARDIZATIONS",
    "cardioid",
    "complex_avg_pool",
    "complex_conv_same",
    "complex_weight_standardize",
    "conjugate_mish",
    "magnitude",
    "mod_relu",
    "split_mish",
]


def _complex_normal(key: jax.Array, shape: Sequence[int], fan_in: int) -> jax.Array:
    kr, ki = jax.random.split(key)
    scale = jnp.sqrt(1.0 / (2.0 * fan_in))
    return (jax.random.normal(kr, shape) * scale + 1j * jax.random.normal(ki, shape) * scale).astype(jnp.complex64)


class ComplexDense(nnx.Module):
    """``z @ W + b`` with complex ``W`` and ``b``."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_complex_normal(rngs.params(), (in_features, out_features), in_features))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.complex64))

    def __call__(self, z: jax.Array) -> jax.Array:
        return z.astype(jnp.complex64) @ self.kernel[...] + self.bias[...]


WEIGHT_STANDARDIZATIONS = ("whiten", "modulus", "centre", "none")


def complex_weight_standardize(kernel: jax.Array, eps: float = 1e-5, *, mode: str = "whiten") -> jax.Array:
    """Standardise a complex kernel per output channel (last axis); statistics over all other axes.

    Args:
      kernel: complex kernel, output channels last (``HWIO`` for convolutions).
      eps: added to the variances (the authors' 1e-5).
      mode: ``"whiten"`` (the authors' default ``ComplexWSConv2D``: Re and Im centred separately, then
        whitened with the inverse square root of their 2×2 covariance, ``eps`` added to both variances,
        and scaled by 1/√2, so Re and Im come out uncorrelated with variance ½ each); ``"centre"`` (the
        authors' ``ComplexWSConv2DNoWhiten``: Re and Im centred, nothing rescaled); ``"modulus"`` (jaxdp's
        earlier variant: centred, divided by sqrt(mean |k − mean|² + eps); Re and Im keep their ratio and
        correlation); ``"none"``.

    Returns:
      The standardised kernel (same shape and dtype). Every mode gives E|k'|² ≈ 1 per output channel except
      ``"centre"`` and ``"none"``.
    """
    if mode not in WEIGHT_STANDARDIZATIONS:
        raise ValueError(f"weight standardisation mode={mode!r} must be one of {WEIGHT_STANDARDIZATIONS}.")
    if mode == "none":
        return kernel
    axes = tuple(range(kernel.ndim - 1))
    centred = kernel - jnp.mean(kernel, axis=axes, keepdims=True)  # = Re and Im centred separately
    if mode == "centre":
        return centred
    if mode == "modulus":
        return centred / jnp.sqrt(jnp.mean(jnp.abs(centred) ** 2, axis=axes, keepdims=True) + eps)
    re, im = jnp.real(centred), jnp.imag(centred)
    wrr, wii, wri = _inverse_sqrt_2x2(
        jnp.mean(re * re, axis=axes, keepdims=True) + eps,
        jnp.mean(im * im, axis=axes, keepdims=True) + eps,
        jnp.mean(re * im, axis=axes, keepdims=True),
    )
    scale = 2**-0.5
    return jax.lax.complex((wrr * re + wri * im) * scale, (wri * re + wii * im) * scale)


def _inverse_sqrt_2x2(vrr: jax.Array, vii: jax.Array, vri: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(wrr, wii, wri) of the inverse square root of the SPD matrix [[vrr, vri], [vri, vii]], in closed form."""
    s = jnp.sqrt(vrr * vii - vri * vri)
    t = jnp.sqrt(vrr + vii + 2 * s)
    inv = 1.0 / (s * t)
    return (vii + s) * inv, (vrr + s) * inv, -vri * inv


def complex_conv_same(z: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 'SAME' complex convolution (NHWC, HWIO) computed as one real convolution.

    (Re z, Im z) are stacked as 2·C_in real channels and convolved with the real block kernel
    [[Re W, Im W], [−Im W, Re W]] (2·C_in → 2·C_out), which gives (Re(z ⋆ W), Im(z ⋆ W)). The real
    convolution is :func:`jaxdp.models.conv_same`, whose weight gradient is an im2col matmul, so per-example
    gradients under ``vmap`` are one batched matmul instead of XLA's complex grouped convolution (measured
    ~10x slower on CPU). Values and gradients equal ``lax.conv_general_dilated`` on complex64 (tested).
    """
    wr, wi = jnp.real(kernel), jnp.imag(kernel)
    block = jnp.concatenate([jnp.concatenate([wr, wi], axis=-1), jnp.concatenate([-wi, wr], axis=-1)], axis=-2)
    x = jnp.concatenate([jnp.real(z), jnp.imag(z)], axis=-1).astype(block.dtype)
    out = conv_same(x, block)
    cout = kernel.shape[-1]
    return jax.lax.complex(out[..., :cout], out[..., cout:])


class ComplexConv(nnx.Module):
    """Stride-1 'SAME' complex 2-D convolution (:func:`complex_conv_same`), with complex weight standardisation.

    Args:
      in_features, out_features: complex channels in and out.
      kernel_size: ``(kh, kw)``.
      weight_standardization: a :func:`complex_weight_standardize` mode: ``"whiten"`` (the authors'
        default, the default here), ``"centre"``, ``"modulus"`` (jaxdp's earlier variant) or ``"none"``.
      rngs: ``nnx.Rngs`` (keyword-only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int] = (3, 3),
        *,
        weight_standardization: str = "whiten",
        rngs: nnx.Rngs,
    ):
        if weight_standardization not in WEIGHT_STANDARDIZATIONS:
            raise ValueError(
                f"weight_standardization={weight_standardization!r} must be one of {WEIGHT_STANDARDIZATIONS}."
            )
        kh, kw = kernel_size
        fan_in = kh * kw * in_features
        self.kernel = nnx.Param(_complex_normal(rngs.params(), (kh, kw, in_features, out_features), fan_in))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.complex64))
        self.weight_standardization = weight_standardization

    def __call__(self, z: jax.Array) -> jax.Array:
        kernel = complex_weight_standardize(self.kernel[...], mode=self.weight_standardization)
        return complex_conv_same(z.astype(jnp.complex64), kernel) + self.bias[...]


class ComplexGroupNorm(nnx.Module):
    """Group normalisation for complex features with 2×2 whitening of (Re, Im), per example.

    For every example and group, the (Re, Im) pairs are centred and whitened
    with the inverse square root of their 2×2 covariance (statistics over the
    spatial axes and the group's channels of *that example only*), then mapped by a
    learned 2×2 matrix per channel (init 1/√2·I) plus a complex bias.
    """

    def __init__(self, num_channels: int, num_groups: int, *, eps: float = 1e-5, rngs: nnx.Rngs | None = None):
        if num_channels % num_groups:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_groups={num_groups}.")
        del rngs
        self.num_groups, self.eps = num_groups, eps
        self.gamma_rr = nnx.Param(jnp.full((num_channels,), 2**-0.5, jnp.float32))
        self.gamma_ii = nnx.Param(jnp.full((num_channels,), 2**-0.5, jnp.float32))
        self.gamma_ri = nnx.Param(jnp.zeros((num_channels,), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((num_channels,), jnp.complex64))

    def __call__(self, z: jax.Array) -> jax.Array:
        shape = z.shape
        c = shape[-1]
        g = z.reshape(shape[0], -1, self.num_groups, c // self.num_groups)  # (N, spatial, G, C/G)
        axes = (1, 3)
        g = g - jnp.mean(g, axis=axes, keepdims=True)
        re, im = jnp.real(g), jnp.imag(g)
        vrr = jnp.mean(re * re, axis=axes, keepdims=True) + self.eps
        vii = jnp.mean(im * im, axis=axes, keepdims=True) + self.eps
        vri = jnp.mean(re * im, axis=axes, keepdims=True)
        wrr, wii, wri = _inverse_sqrt_2x2(vrr, vii, vri)
        re_w, im_w = wrr * re + wri * im, wri * re + wii * im
        re_w, im_w = re_w.reshape(shape), im_w.reshape(shape)
        out_re = self.gamma_rr[...] * re_w + self.gamma_ri[...] * im_w
        out_im = self.gamma_ri[...] * re_w + self.gamma_ii[...] * im_w
        return jax.lax.complex(out_re, out_im) + self.beta[...]


def _modulus(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(Re z, Im z, |z| with 1 where z = 0, z ≠ 0): a modulus whose gradient stays finite at z = 0."""
    re, im = jnp.real(z), jnp.imag(z)
    sq = re * re + im * im
    nonzero = sq > 0
    return re, im, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), nonzero


def cardioid(z: jax.Array) -> jax.Array:
    """½(1 + cos ∠z)·z: passes positive-real inputs, suppresses negative-real ones, keeps the phase.

    Computed as ½(1 + Re z/|z|)·z (cos ∠z = Re z/|z|; at z = 0 the factor is 1, as with ∠0 = 0, and the
    value 0): the same function without ``atan2`` and ``cos``, which are slow on CPU (experiments/complex_valued
    /bench.py times the old form beside it), and with a finite gradient at z = 0 (a zero-padded example's
    input).
    """
    re, im, mag, nonzero = _modulus(z)
    factor = 0.5 * (1.0 + jnp.where(nonzero, re / mag, 1.0))
    return jax.lax.complex(factor * re, factor * im)


def mod_relu(z: jax.Array, bias: jax.Array | float = -0.1) -> jax.Array:
    """ReLU(|z| + b)·z/|z| (0 at z = 0, with a finite gradient there): thresholds the magnitude, keeps the phase."""
    re, im, mag, nonzero = _modulus(z)
    scale = jnp.where(nonzero, jax.nn.relu(mag + bias) / mag, 0.0)
    return jax.lax.complex(scale * re, scale * im)


def split_mish(z: jax.Array) -> jax.Array:
    """Mish applied separately to the real and imaginary parts."""
    return jax.lax.complex(jax.nn.mish(jnp.real(z)), jax.nn.mish(jnp.imag(z)))


def conjugate_mish(z: jax.Array) -> jax.Array:
    """The authors' ConjugateMish: Re = mish(Re z) − mish(Im z), Im = mish(Re z) + mish(Im z).

    Riess, Ziller et al.'s ``ConjugateMish`` (their objax ``dptraining.models.complex.activations``),
    the complex product (1 + i)·(mish(Re z) + i·mish(Im z)) written out: split Mish followed by a
    rotation by 45° and a scaling by √2.
    """
    a, b = jax.nn.mish(jnp.real(z)), jax.nn.mish(jnp.imag(z))
    return jax.lax.complex(a - b, a + b)


def magnitude(z: jax.Array) -> jax.Array:
    """|z|: the bridge from complex features to a real-valued head."""
    return jnp.abs(z)


def complex_avg_pool(z: jax.Array, window: int = 2) -> jax.Array:
    """Mean of complex values over non-overlapping ``window × window`` patches (NHWC): :func:`avg_pool`."""
    return avg_pool(z, (window, window))


_ACTIVATIONS: dict[str, Callable] = {
    "cardioid": cardioid,
    "mod_relu": mod_relu,
    "split_mish": split_mish,
    "conjugate_mish": conjugate_mish,
}


class ComplexCNN(nnx.Module):
    """[ComplexConv(WS) → ComplexGroupNorm → activation → complex avg-pool]* → |z| → real linear head.

    Args:
      input_shape: ``(height, width, channels)`` of one complex example.
      num_classes: number of output logits.
      features: complex channels of each block.
      activation: ``"cardioid"`` (default), ``"conjugate_mish"`` (the authors' ConjugateMish), ``"mod_relu"``
        or ``"split_mish"``.
      groups: ComplexGroupNorm groups (at most the block's channels).
      weight_standardization: the :func:`complex_weight_standardize` mode of every convolution: ``"whiten"``
        (the authors' default, the default here), ``"centre"``, ``"modulus"`` or ``"none"``.
      rngs: ``nnx.Rngs`` for initialisation (keyword-only).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        features: Sequence[int] = (16, 32),
        activation: str = "cardioid",
        groups: int = 4,
        weight_standardization: str = "whiten",
        rngs: nnx.Rngs,
    ):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(_ACTIVATIONS)}.")
        head_in = pooled_size(input_shape, features)
        convs, norms = [], []
        for c, f in zip((input_shape[-1], *features), features, strict=False):
            convs.append(ComplexConv(c, f, weight_standardization=weight_standardization, rngs=rngs))
            norms.append(ComplexGroupNorm(f, min(groups, f)))
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.activation = activation
        self.head = nnx.Linear(head_in, num_classes, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            z = complex_avg_pool(act(norm(conv(z))))
        return self.head(magnitude(z).reshape(z.shape[0], -1))
