"""Recipe models: the classic DP MNIST CNN and WRN-16-4 with GroupNorm + weight standardisation."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdp.models._nets import weight_standardize

__all__ = ["DPMnistCNN", "WSConv", "WideResNet", "max_pool"]


def max_pool(x: jax.Array, window: Sequence[int] = (2, 2), strides: Sequence[int] = (1, 1)) -> jax.Array:
    """``nnx.max_pool(x, window, strides)`` ('VALID', NHWC) as the maximum of one strided slice per window offset.

    Same values as ``nnx.max_pool``; the gradient is the same except on ties (``nnx.max_pool`` gives a tie to
    one element, this splits it: both are subgradients). Why: XLA's CPU backend lowers the gradient of
    ``reduce_window`` max to select-and-scatter, which took 9.3 ms of the DP MNIST CNN's 29 ms step at
    batch 256 (2x2, stride 1, 14x14x16); the slices' gradient took 0.9 ms (benchmarks/conv_lowering.py --ops).
    """
    (kh, kw), (sh, sw) = window, strides
    n, h, w, c = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    parts = [
        jax.lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    while len(parts) > 1:  # a balanced tree of maxima
        parts = [jnp.maximum(a, b) for a, b in zip(parts[::2], parts[1::2], strict=False)] + parts[
            len(parts) // 2 * 2 :
        ]
    return parts[0]


class DPMnistCNN(nnx.Module):
    """The tanh CNN of the DP MNIST literature (Papernot et al. 2020): 2 convs + 2 dense layers.

    conv 16@8x8/2 (SAME) → tanh → maxpool 2/1 → conv 32@4x4/2 (VALID) → tanh →
    maxpool 2/1 → dense 32 → tanh → dense classes. 28x28x1 inputs give 26,010 parameters.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, rngs: nnx.Rngs):
        h, w, c = input_shape
        self.conv1 = nnx.Conv(c, 16, (8, 8), strides=(2, 2), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (4, 4), strides=(2, 2), padding="VALID", rngs=rngs)
        h, w = -(-h // 2) - 1, -(-w // 2) - 1  # conv1 SAME/2, pool 2/1
        h, w = (h - 4) // 2 + 1 - 1, (w - 4) // 2 + 1 - 1  # conv2 VALID/2, pool 2/1
        if h < 1 or w < 1:
            raise ValueError(f"input_shape={tuple(input_shape)} is too small for the DP MNIST CNN (use 28x28).")
        self.fc1 = nnx.Linear(h * w * 32, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x):
        x = max_pool(jnp.tanh(self.conv1(x)), (2, 2), strides=(1, 1))
        x = max_pool(jnp.tanh(self.conv2(x)), (2, 2), strides=(1, 1))
        return self.fc2(jnp.tanh(self.fc1(x.reshape(x.shape[0], -1))))


class WSConv(nnx.Module):
    """Convolution with weight standardisation (zero mean, unit variance per output channel)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, stride: int = 1, rngs: nnx.Rngs):
        init = nnx.initializers.he_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, cin, cout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.stride = stride

    def __call__(self, x):
        k = weight_standardize(self.kernel[...])
        y = jax.lax.conv_general_dilated(
            x, k, (self.stride, self.stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + self.bias[...]


class _Block(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(cin, num_groups=min(groups, cin), rngs=rngs)
        self.conv1 = WSConv(cin, cout, stride=stride, rngs=rngs)
        self.norm2 = nnx.GroupNorm(cout, num_groups=min(groups, cout), rngs=rngs)
        self.conv2 = WSConv(cout, cout, rngs=rngs)
        self.shortcut = WSConv(cin, cout, 1, stride=stride, rngs=rngs) if (cin != cout or stride != 1) else None

    def __call__(self, x):
        h = jax.nn.relu(self.norm1(x))
        skip = self.shortcut(h) if self.shortcut is not None else x
        h = self.conv1(h)
        h = self.conv2(jax.nn.relu(self.norm2(h)))
        return h + skip


class WideResNet(nnx.Module):
    """WRN-depth-width with GroupNorm and weight standardisation (De et al. 2022): no BatchNorm.

    ``depth = 6n + 4``; WRN-16-4 has n = 2 blocks per stage and widths 64/128/256.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        depth: int = 16,
        width: int = 4,
        groups: int = 16,
        rngs: nnx.Rngs,
    ):
        if (depth - 4) % 6:
            raise ValueError(f"depth={depth} must be 6n + 4 (e.g. 16, 22, 28, 40).")
        n = (depth - 4) // 6
        c = input_shape[-1]
        self.stem = WSConv(c, 16, rngs=rngs)
        blocks, cin = [], 16
        for stage, cout in enumerate((16 * width, 32 * width, 64 * width)):
            for b in range(n):
                blocks.append(_Block(cin, cout, 2 if (stage > 0 and b == 0) else 1, groups, rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.norm = nnx.GroupNorm(cin, num_groups=min(groups, cin), rngs=rngs)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = jax.nn.relu(self.norm(x))
        return self.head(x.mean(axis=(1, 2)))


class ScatterLinear(nnx.Module):
    """Group normalisation without parameters, then one linear layer: Tramèr & Boneh (2021)'s
    "ScatterNet + linear" classifier for scattering features (NHWC, e.g. 7x7x81).

    The normalisation is per example (mean and variance over each group of channels and all
    positions), so nothing mixes examples, and it has no parameters: the only clipped gradient is
    the linear layer's.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, num_groups: int = 27, rngs: nnx.Rngs):
        *_, c = input_shape
        if c % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide the {c} feature channels.")
        self.num_groups = num_groups
        size = 1
        for d in input_shape:
            size *= int(d)
        self.head = nnx.Linear(size, num_classes, rngs=rngs)

    def __call__(self, x):
        n, c = x.shape[0], x.shape[-1]
        g = x.reshape(n, -1, self.num_groups, c // self.num_groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = g.var(axis=(1, 3), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + 1e-5)
        return self.head(g.reshape(n, -1))
