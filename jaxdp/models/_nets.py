"""Small DP-compatible networks (no BatchNorm) written with Flax NNX."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdp.clipping.reparam import standardize_kernel
from jaxdp.models._conv import DPConv, conv_same


def pooled_size(input_shape: Sequence[int], features: Sequence[int]) -> int:
    """Features the head sees after ``len(features)`` conv blocks that each halve H and W (2x2 pooling).

    Raises ValueError when the input is too small for that many blocks.
    """
    h, w, c = input_shape
    n = len(features)
    h, w = h // 2**n, w // 2**n
    if h < 1 or w < 1:
        raise ValueError(
            f"input_shape={tuple(input_shape)} is too small for {n} pooling blocks; "
            "use fewer `features` or a larger input."
        )
    return h * w * (features[-1] if n else c)


def weight_standardize(kernel: jax.Array, eps: float = 1e-5) -> jax.Array:
    """(k − mean) / sqrt(var + eps) per output channel (last axis), statistics over all other axes.

    Ghost clipping (:mod:`jaxdp.clipping.ghost`) recognises this function, called with a constant
    ``eps > 0`` on one kernel (not under ``jax.vmap``), as a verified reparametrisation of the kernel it standardises, and takes per-example
    norms through it without per-example gradients; the same formula written inline is refused
    there (and ``auto`` uses the vmap path), and so is ``eps = 0`` (a constant channel's derivative is
    not finite). The body is :func:`jaxdp.clipping.reparam.standardize_kernel`.
    """
    return standardize_kernel(kernel, eps)


def avg_pool(x: jax.Array, window: Sequence[int] = (2, 2)) -> jax.Array:
    """``nnx.avg_pool(x, window, strides=window)`` ('VALID', NHWC: non-overlapping windows) as a reshape and a mean.

    Same values, complex ones too (:func:`jaxdp.models.complex_avg_pool` is this); its gradient is a broadcast,
    where XLA's CPU backend lowers ``reduce_window``'s to a padded window reduction: 1.16 vs 0.18 ms at
    256 x 16 x 16 x 32.
    """
    kh, kw = window
    n, h, w, c = x.shape
    x = x[:, : h // kh * kh, : w // kw * kw]  # VALID: a partial window at the edge is dropped
    return x.reshape(n, h // kh, kh, w // kw, kw, c).mean(axis=(2, 4))


class MLP(nnx.Module):
    """Flatten, ``len(hidden)`` tanh layers, then a linear classifier.

    Args:
      in_features: number of input features after flattening.
      num_classes: number of output logits.
      hidden: widths of the hidden layers.
      rngs: ``nnx.Rngs`` for initialisation (keyword-only).
    """

    def __init__(self, in_features: int, num_classes: int, *, hidden: Sequence[int] = (64,), rngs: nnx.Rngs):
        widths = [in_features, *hidden]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for layer in self.hidden:
            x = jnp.tanh(layer(x))
        return self.head(x)


class CNN(nnx.Module):
    """Small tanh CNN: [conv3x3 -> tanh -> avg-pool 2]* -> linear head.

    Uses no normalisation at all, so nothing mixes examples. Input is NHWC. The
    convolutions are :class:`DPConv` (same values as ``nnx.Conv``, faster
    per-example gradients).

    Args:
      input_shape: ``(height, width, channels)`` of one example.
      num_classes: number of output logits.
      features: channels of each conv block.
      conv: ``"dp"`` (:class:`DPConv`, default) or ``"nnx"`` (``nnx.Conv``); same
        function and parameter layout, different speed of per-example gradients.
      rngs: ``nnx.Rngs`` for initialisation (keyword-only).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        features: Sequence[int] = (16, 32),
        conv: str = "dp",
        rngs: nnx.Rngs,
    ):
        if conv not in ("dp", "nnx"):
            raise ValueError(f"conv={conv!r} must be 'dp' (DPConv) or 'nnx' (nnx.Conv).")
        head_in = pooled_size(input_shape, features)
        convs = []
        for c, f in zip((input_shape[-1], *features), features, strict=False):
            if conv == "dp":
                convs.append(DPConv(c, f, kernel_size=(3, 3), rngs=rngs))
            else:
                convs.append(nnx.Conv(c, f, kernel_size=(3, 3), padding="SAME", rngs=rngs))
        self.convs = nnx.List(convs)
        self.head = nnx.Linear(head_in, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = jnp.tanh(conv(x))
            x = avg_pool(x, (2, 2))
        return self.head(x.reshape((x.shape[0], -1)))


_REAL_ACTIVATIONS = {"mish": jax.nn.mish, "tanh": jnp.tanh, "relu": jax.nn.relu}


class GroupNormCNN(nnx.Module):
    """[conv3x3 (weight-standardised) -> GroupNorm -> activation -> avg-pool 2]* -> linear head.

    The real-valued twin of :class:`jaxdp.models.ComplexCNN` (same blocks, same normalisation per
    example), used as its control. The convolutions are :func:`conv_same` (im2col weight gradients,
    fast per-example gradients). GroupNorm normalises each example on its own: nothing mixes examples.

    Args:
      input_shape: ``(height, width, channels)`` of one example.
      num_classes: number of output logits.
      features: channels of each conv block.
      activation: ``"mish"`` (default, the real counterpart of the authors' ConjugateMish), ``"tanh"`` or
        ``"relu"``.
      groups: GroupNorm groups (at most the block's channels).
      weight_standardization: standardise each conv kernel per output channel (:func:`weight_standardize`).
      rngs: ``nnx.Rngs`` for initialisation (keyword-only).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        features: Sequence[int] = (16, 32),
        activation: str = "mish",
        groups: int = 4,
        weight_standardization: bool = True,
        rngs: nnx.Rngs,
    ):
        if activation not in _REAL_ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(_REAL_ACTIVATIONS)}.")
        head_in = pooled_size(input_shape, features)
        convs, norms = [], []
        for c, f in zip((input_shape[-1], *features), features, strict=False):
            convs.append(DPConv(c, f, kernel_size=(3, 3), rngs=rngs))
            g = min(groups, f)
            if f % g:
                raise ValueError(f"groups={groups} must divide every block's channels; features={tuple(features)}.")
            norms.append(nnx.GroupNorm(f, num_groups=g, rngs=rngs))
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.activation, self.weight_standardization = activation, weight_standardization
        self.head = nnx.Linear(head_in, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _REAL_ACTIVATIONS[self.activation]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            kernel = conv.kernel[...]
            if self.weight_standardization:
                kernel = weight_standardize(kernel)
            x = act(norm(conv_same(x, kernel) + conv.bias[...]))
            x = avg_pool(x, (2, 2))
        return self.head(x.reshape((x.shape[0], -1)))


def make_model(name: str, *, input_shape: Sequence[int], num_classes: int, seed: int, **kwargs) -> nnx.Module:
    """Build a model by config name: ``"mlp"``, ``"cnn"``, ``"gn_cnn"``, ``"dp_mnist_cnn"``, ``"scatter_linear"``, ``"wrn"``, ``"complex_cnn"``
    or ``"transformer"`` (inputs are int token ids of shape ``input_shape = (length,)``; pass
    ``vocab_size=`` in ``kwargs``)."""
    rngs = nnx.Rngs(seed)
    try:
        return _build(name, input_shape, num_classes, rngs, kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(
            f"model.kwargs={kwargs} do not fit model {name!r} ({e}); 'mlp' takes hidden=(...), "
            "'cnn' takes features=(...)."
        ) from None


def _build(name, input_shape, num_classes, rngs, kwargs):
    if name == "mlp":
        in_features = 1
        for d in input_shape:
            in_features *= int(d)
        return MLP(in_features, num_classes, rngs=rngs, **kwargs)
    if name in ("cnn", "gn_cnn"):
        if len(input_shape) != 3:
            raise ValueError(
                f"model {name!r} needs (height, width, channels) inputs, got input_shape={tuple(input_shape)}."
            )
        return {"cnn": CNN, "gn_cnn": GroupNormCNN}[name](input_shape, num_classes, rngs=rngs, **kwargs)
    if name == "dp_mnist_cnn":
        from jaxdp.models._recipes import DPMnistCNN

        return DPMnistCNN(input_shape, num_classes, rngs=rngs, **kwargs)
    if name == "scatter_linear":
        from jaxdp.models._recipes import ScatterLinear

        return ScatterLinear(input_shape, num_classes, rngs=rngs, **kwargs)
    if name == "wrn":
        from jaxdp.models._recipes import WideResNet

        return WideResNet(input_shape, num_classes, rngs=rngs, **kwargs)
    if name == "complex_cnn":
        from jaxdp.models._complex import ComplexCNN

        return ComplexCNN(input_shape, num_classes, rngs=rngs, **kwargs)
    if name == "transformer":
        from jaxdp.models._transformer import TransformerClassifier

        if len(input_shape) != 1:
            raise ValueError(
                f"model 'transformer' needs token sequences, input_shape=(length,), got input_shape={tuple(input_shape)}."
            )
        if "vocab_size" not in kwargs:
            raise ValueError("model 'transformer' needs model.kwargs.vocab_size (number of token ids), e.g. 256.")
        return TransformerClassifier(num_classes=num_classes, max_len=int(input_shape[0]), rngs=rngs, **kwargs)
    raise ValueError(
        f"model={name!r} is not a known model; choose 'mlp', 'cnn', 'gn_cnn', 'dp_mnist_cnn', 'wrn', 'complex_cnn' "
        "or 'transformer'."
    )
