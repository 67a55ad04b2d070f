"""The one table of benchmarked models: how to build each, its data, and its training budget.

Data: ``mnist_cnn`` trains on Fashion-MNIST when it is prepared in the TFDS data directory
(``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``; ``jaxdp bench --data_dir``), and otherwise on
scikit-learn's bundled digits (8x8) upsampled x3 and padded to 28x28, saying which; ``wrn16_4`` and ``transformer`` use
synthetic, learnable data at their shapes (32x32x3 images, token sequences), labelled
as such in every output. ``mlp`` (not in the default grid) is a tiny model for tests
and smoke runs. The reference implementations (:mod:`jaxdp.bench.refs`) time the same
models on :func:`random_batch` inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxdp.data import Dataset, load
from jaxdp.models import MLP, DPMnistCNN, TransformerClassifier, WideResNet
from jaxdp.train import classification_loss

__all__ = ["DEFAULT_MODELS", "MODELS", "ModelSpec", "param_count", "random_batch", "split_model"]

# A vocabulary of 1,000: the embedding table is then most of the model, as in real token models,
# and its per-example gradients are what the vmap path pays for.
VOCAB, SEQ_LEN, TOKEN_CLASSES = 1000, 32, 4


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: how to build it, its data, and its training budget."""

    build: Callable[[int], nnx.Module]  # seed -> module
    input_shape: tuple[int, ...]  # one example
    num_classes: int
    data: Callable[[], Dataset]
    data_labels: dict[str, str]  # Dataset.name -> how every output names that data
    optimizer: tuple[str, float]  # (name, learning rate) for the accuracy runs
    quick_batches: tuple[int, ...]
    full_batches: tuple[int, ...]
    quick_epochs: int  # 0 = no accuracy run in --quick
    full_epochs: int
    # Other (quick, full) epochs for some data (by Dataset.name): a real dataset 40x larger than the digits.
    epochs_by_data: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def data_label(self) -> str:
        return self.data_labels[self.data().name]

    def epochs(self, full: bool) -> int:
        quick, long = self.epochs_by_data.get(self.data().name, (self.quick_epochs, self.full_epochs))
        return long if full else quick


def data_dir() -> str:
    """Where the bench looks for prepared TFDS data: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


@functools.cache
def _mnist_shaped(where: str) -> Dataset:
    try:  # real 28x28 data when it is prepared (jaxdp data prepare fashion_mnist ...)
        return load("fashion_mnist", where)
    except ValueError:
        return _digits28()


def _digits28() -> Dataset:
    d = load("digits")

    def resize(x):  # (n, 8, 8, 1) -> (n, 28, 28, 1): nearest x3, then 2 pixels of zero padding
        x = np.repeat(np.repeat(x, 3, axis=1), 3, axis=2)
        return np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))

    return Dataset("digits28", resize(d.x_train), d.y_train, resize(d.x_test), d.y_test, 10)


def _synthetic_images(n_train=2048, n_test=512, shape=(32, 32, 3), classes=10, seed=0) -> Dataset:
    """Class templates (smooth random patterns) plus per-example noise: learnable, CIFAR-shaped."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(classes, 4, 4, shape[2]))
    templates = np.repeat(np.repeat(coarse, shape[0] // 4, axis=1), shape[1] // 4, axis=2)

    def split(n):
        y = rng.integers(0, classes, n).astype(np.int32)
        x = 0.5 * templates[y] + rng.normal(size=(n, *shape))
        return x.astype(np.float32), y

    x_tr, y_tr = split(n_train)
    x_te, y_te = split(n_test)
    return Dataset("synthetic_cifar_shape", x_tr, y_tr, x_te, y_te, classes)


def _synthetic_tokens(n_train=2048, n_test=512, seed=0) -> Dataset:
    """Token sequences whose class sets how often 8 class-specific tokens appear: learnable by attention + pooling."""
    rng = np.random.default_rng(seed)
    signature = rng.permutation(VOCAB)[: 8 * TOKEN_CLASSES].reshape(TOKEN_CLASSES, 8)

    def split(n):
        y = rng.integers(0, TOKEN_CLASSES, n).astype(np.int32)
        x = rng.integers(0, VOCAB, (n, SEQ_LEN))
        marked = rng.random((n, SEQ_LEN)) < 0.15
        x = np.where(marked, signature[y][np.arange(n)[:, None], rng.integers(0, 8, (n, SEQ_LEN))], x)
        return x.astype(np.int32), y

    x_tr, y_tr = split(n_train)
    x_te, y_te = split(n_test)
    return Dataset("synthetic_tokens", x_tr, y_tr, x_te, y_te, TOKEN_CLASSES)


MODELS: dict[str, ModelSpec] = {
    "mnist_cnn": ModelSpec(
        lambda seed: DPMnistCNN((28, 28, 1), 10, rngs=nnx.Rngs(seed)),
        (28, 28, 1),
        10,
        lambda: _mnist_shaped(data_dir()),
        {
            "fashion_mnist": "Fashion-MNIST (real: 60,000 train / 10,000 test, prepared TFDS)",
            "digits28": "digits 8x8 upsampled to 28x28 (real; no prepared Fashion-MNIST found)",
        },
        ("adam", 2e-3),
        quick_batches=(256,),
        full_batches=(128, 256, 512),
        quick_epochs=15,
        full_epochs=40,
        epochs_by_data={"fashion_mnist": (1, 15)},
    ),
    "wrn16_4": ModelSpec(
        lambda seed: WideResNet((32, 32, 3), 10, depth=16, width=4, rngs=nnx.Rngs(seed)),
        (32, 32, 3),
        10,
        _synthetic_images,
        {"synthetic_cifar_shape": "synthetic 32x32x3, 10 classes"},
        ("adam", 1e-3),
        quick_batches=(32,),  # the batch of the ghost-path target (private / non-private >= 0.7)
        full_batches=(32, 64),
        quick_epochs=0,  # a WRN-16-4 epoch takes minutes on 2 CPU cores: timing only in --quick
        full_epochs=2,
    ),
    "transformer": ModelSpec(
        lambda seed: TransformerClassifier(VOCAB, TOKEN_CLASSES, max_len=SEQ_LEN, rngs=nnx.Rngs(seed)),
        (SEQ_LEN,),
        TOKEN_CLASSES,
        _synthetic_tokens,
        {"synthetic_tokens": f"synthetic tokens (T={SEQ_LEN}, vocab {VOCAB}, {TOKEN_CLASSES} classes)"},
        ("adam", 3e-3),
        quick_batches=(256,),
        full_batches=(64, 256, 1024),
        quick_epochs=4,
        full_epochs=15,
    ),
    # Not in the default grid: a tiny model for tests and smoke runs.
    "mlp": ModelSpec(
        lambda seed: MLP(64, 10, hidden=(32,), rngs=nnx.Rngs(seed)),
        (8, 8, 1),
        10,
        lambda: load("digits"),
        {"digits": "digits 8x8 (real)"},
        ("adam", 1e-2),
        quick_batches=(64,),
        full_batches=(64, 256),
        quick_epochs=3,
        full_epochs=20,
    ),
}
DEFAULT_MODELS = ("mnist_cnn", "wrn16_4", "transformer")


def split_model(
    name: str, seed: int = 0, dtype: str | None = None
) -> tuple[nnx.GraphDef, Any, Any, Callable[..., jax.Array]]:
    """``(graphdef, params, rest, loss_fn)`` of the model ``name`` built from ``seed``.

    ``params`` is its ``nnx.Param`` state (float32) and ``loss_fn(params, x, y)`` the mean
    cross-entropy (:func:`jaxdp.train.classification_loss`), computed in ``dtype`` (a config's
    ``model.dtype``; None: float32).
    """
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not a benchmarked model; choose from {', '.join(MODELS)}.")
    graphdef, params, rest = nnx.split(MODELS[name].build(seed), nnx.Param, ...)
    return graphdef, params, rest, classification_loss(graphdef, rest, dtype)


def random_batch(
    input_shape: tuple[int, ...], num_classes: int, batch: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 inputs of ``input_shape`` (standard normal) and int32 labels: the same for every implementation."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an int >= 1.")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *input_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, batch).astype(np.int32)
    return x, y


def param_count(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(np.size(v) for v in jax.tree_util.tree_leaves(params)))
