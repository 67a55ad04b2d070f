"""Complex-valued, DP-compatible layers (Flax NNX): nothing here mixes examples.

Conventions: complex64 parameters, NHWC inputs. Parameters are initialised with
variance 1/fan_in split equally between real and imaginary parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "ComplexCNN",
    "ComplexConv",
    "ComplexDense",
    "ComplexGroupNorm",
    "cardioid",
    "complex_avg_pool",
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


def complex_weight_standardize(kernel: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Per output channel (last axis): subtract the complex mean, divide by sqrt(mean |k − mean|² + eps)."""
    axes = tuple(range(kernel.ndim - 1))
    centred = kernel - jnp.mean(kernel, axis=axes, keepdims=True)
    var = jnp.mean(jnp.abs(centred) ** 2, axis=axes, keepdims=True)
    return centred / jnp.sqrt(var + eps)


class ComplexConv(nnx.Module):
    """Stride-1 'SAME' complex 2-D convolution, optionally with complex weight standardisation."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int] = (3, 3),
        *,
        weight_standardization: bool = True,
        rngs: nnx.Rngs,
    ):
        kh, kw = kernel_size
        fan_in = kh * kw * in_features
        self.kernel = nnx.Param(_complex_normal(rngs.params(), (kh, kw, in_features, out_features), fan_in))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.complex64))
        self.weight_standardization = weight_standardization

    def __call__(self, z: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        if self.weight_standardization:
            kernel = complex_weight_standardize(kernel)
        out = jax.lax.conv_general_dilated(
            z.astype(jnp.complex64), kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return out + self.bias[...]


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
        # Inverse square root of [[vrr, vri], [vri, vii]] in closed form.
        s = jnp.sqrt(vrr * vii - vri * vri)
        t = jnp.sqrt(vrr + vii + 2 * s)
        inv = 1.0 / (s * t)
        wrr, wii, wri = (vii + s) * inv, (vrr + s) * inv, -vri * inv
        re_w, im_w = wrr * re + wri * im, wri * re + wii * im
        re_w, im_w = re_w.reshape(shape), im_w.reshape(shape)
        out_re = self.gamma_rr[...] * re_w + self.gamma_ri[...] * im_w
        out_im = self.gamma_ri[...] * re_w + self.gamma_ii[...] * im_w
        return jax.lax.complex(out_re, out_im) + self.beta[...]


def cardioid(z: jax.Array) -> jax.Array:
    """½(1 + cos ∠z)·z: passes positive-real inputs, suppresses negative-real ones, keeps the phase."""
    return 0.5 * (1.0 + jnp.cos(jnp.angle(z))) * z


def mod_relu(z: jax.Array, bias: jax.Array | float = -0.1) -> jax.Array:
    """ReLU(|z| + b)·z/|z| (0 at z = 0): thresholds the magnitude, keeps the phase."""
    mag = jnp.abs(z)
    scale = jax.nn.relu(mag + bias) / jnp.where(mag > 0, mag, 1.0)
    return scale * z


def split_mish(z: jax.Array) -> jax.Array:
    """Mish applied separately to the real and imaginary parts."""
    return jax.lax.complex(jax.nn.mish(jnp.real(z)), jax.nn.mish(jnp.imag(z)))


def conjugate_mish(z: jax.Array) -> jax.Array:
    """conj(split_mish(conj z)) = mish(Re z) − i·mish(−Im z): split Mish mirrored on the imaginary axis.

    (Our definition of a "conjugate" Mish-type activation; it is odd-symmetric in
    Im z's sign convention where split Mish is not.)
    """
    return jnp.conj(split_mish(jnp.conj(z)))


def magnitude(z: jax.Array) -> jax.Array:
    """|z|: the bridge from complex features to a real-valued head."""
    return jnp.abs(z)


def complex_avg_pool(z: jax.Array, window: int = 2) -> jax.Array:
    """Mean of complex values over non-overlapping ``window × window`` patches (NHWC)."""
    n, h, w, c = z.shape
    h2, w2 = h // window, w // window
    z = z[:, : h2 * window, : w2 * window]
    return z.reshape(n, h2, window, w2, window, c).mean(axis=(2, 4))


_ACTIVATIONS: dict[str, Callable] = {
    "cardioid": cardioid,
    "mod_relu": mod_relu,
    "split_mish": split_mish,
    "conjugate_mish": conjugate_mish,
}


class ComplexCNN(nnx.Module):
    """[ComplexConv(WS) → ComplexGroupNorm → activation → complex avg-pool]* → |z| → real linear head."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        features: Sequence[int] = (16, 32),
        activation: str = "cardioid",
        groups: int = 4,
        rngs: nnx.Rngs,
    ):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(_ACTIVATIONS)}.")
        h, w, c = input_shape
        convs, norms = [], []
        for f in features:
            convs.append(ComplexConv(c, f, rngs=rngs))
            norms.append(ComplexGroupNorm(f, min(groups, f)))
            c, h, w = f, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input_shape={tuple(input_shape)} is too small for {len(features)} pooling blocks.")
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.activation = activation
        self.head = nnx.Linear(h * w * c, num_classes, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            z = complex_avg_pool(act(norm(conv(z))))
        return self.head(magnitude(z).reshape(z.shape[0], -1))
