"""PyTorch twins of the benchmark models, for the Opacus reference (imports torch: bench extra only).

Same layers, shapes, padding and parameter counts as the Flax models in
:mod:`jaxdp.models` (checked by ``tests/test_bench_refs.py``). Inputs are NCHW;
tensors are flattened in NHWC order so dense weights copy over unchanged.
``load_flax(model, params)`` copies Flax parameters in, for equivalence checks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MnistCNN", "WideResNet", "load_flax", "make"]


def _pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """XLA's "SAME" padding (the extra row/column, if any, goes at the end)."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dim first
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class _SameConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(_pad_same(x, self.kernel_size[0], self.stride[0]))


class MnistCNN(nn.Module):
    """Twin of :class:`jaxdp.models.DPMnistCNN` (26,010 parameters for 28x28x1)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = _SameConv(1, 16, 8, stride=2)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.fc1 = nn.Linear(4 * 4 * 32, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2, stride=1)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2, stride=1)
        x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC order, as in Flax
        return self.fc2(torch.tanh(self.fc1(x)))


class WSConv(nn.Module):
    """Weight-standardised convolution (zero mean, unit variance per output channel), "SAME" padding.

    No registered Opacus grad sampler: Opacus computes its per-example gradients
    with functorch (``torch.func.vmap``), as it does for any custom layer.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel) * math.sqrt(2.0 / (cin * kernel * kernel)))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(_pad_same(x, self.kernel, self.stride), w, self.bias, stride=self.stride)


def _group_norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, c), c, eps=1e-6)  # Flax's default epsilon


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(cin, groups)
        self.conv1 = WSConv(cin, cout, stride=stride)
        self.norm2 = _group_norm(cout, groups)
        self.conv2 = WSConv(cout, cout)
        self.shortcut = WSConv(cin, cout, 1, stride=stride) if (cin != cout or stride != 1) else None

    def forward(self, x):
        h = F.relu(self.norm1(x))
        skip = self.shortcut(h) if self.shortcut is not None else x
        h = self.conv1(h)
        h = self.conv2(F.relu(self.norm2(h)))
        return h + skip


class WideResNet(nn.Module):
    """Twin of :class:`jaxdp.models.WideResNet` (GroupNorm + weight standardisation, no BatchNorm)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, depth: int = 16, width: int = 4, groups: int = 16):
        super().__init__()
        n = (depth - 4) // 6
        self.stem = WSConv(in_channels, 16)
        blocks, cin = [], 16
        for stage, cout in enumerate((16 * width, 32 * width, 64 * width)):
            for b in range(n):
                blocks.append(_Block(cin, cout, 2 if (stage > 0 and b == 0) else 1, groups))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.norm = _group_norm(cin, groups)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def make(model_name: str) -> nn.Module:
    """The twin of the benchmark model ``model_name`` (see :data:`jaxdp.bench.refs.REFERENCE_MODELS`)."""
    if model_name == "mnist_cnn":
        return MnistCNN()
    if model_name == "wrn16_4":
        return WideResNet()
    raise ValueError(f"model_name={model_name!r} has no PyTorch twin; choose 'mnist_cnn' or 'wrn16_4'.")


def load_flax(model: nn.Module, params) -> None:
    """Copy a Flax NNX ``nnx.Param`` state into the twin (conv kernels HWIO -> OIHW, dense kernels transposed)."""
    from flax import nnx

    flat = {".".join(str(k) for k in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(params)}
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in flat.items():
            tname = name.replace("kernel", "weight").replace("scale", "weight")
            if tname not in named:
                raise KeyError(f"Flax parameter {name!r} has no PyTorch twin (looked for {tname!r}).")
            if value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)
            elif value.ndim == 2:
                value = value.T
            target = named[tname]
            if tuple(target.shape) != value.shape:
                raise ValueError(f"{name}: Flax shape {value.shape} vs PyTorch {tuple(target.shape)}.")
            target.copy_(torch.from_numpy(np.array(value, dtype=np.float32)))  # a writable copy
        if len(flat) != len(named):
            raise ValueError(f"{len(flat)} Flax parameters vs {len(named)} PyTorch parameters.")
