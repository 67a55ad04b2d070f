"""Datasets, loaded entirely offline.

``load("digits")`` is scikit-learn's bundled handwritten digits (real data that
ships inside the installed scikit-learn package: 1,797 8x8 grey images, 10
classes) with a fixed stratified 80/20 train/test split.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "available", "load"]


class Dataset(NamedTuple):
    """In-memory arrays of one dataset; images are NHWC float32 in [0, 1]."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]  # pixel values are 0..16
    y = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10)


_BUILTIN = {"digits": _digits}


def available() -> list[str]:
    """Names :func:`load` accepts."""
    return sorted(_BUILTIN)


def load(name: str) -> Dataset:
    """Load a built-in dataset by name.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    if name not in _BUILTIN:
        raise ValueError(f"dataset={name!r} is not available; built-in datasets: {', '.join(available())}.")
    return _BUILTIN[name]()
