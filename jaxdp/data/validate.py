"""Checks every dataset once, as it is loaded: bad data is a one-line :class:`DataError`, before anything trains.

What :func:`validate` checks, for the train and the test split (or validation split) alike:

* features are numbers (float, int, uint, bool or complex; not strings or objects), one row per
  example (``(n, features)`` or ``(n, H, W, C)``), at least one row, and the same per-example
  shape in both splits;
* labels are one per row (``(n,)``), integers (an integer dtype, or floats that are exactly
  integral, e.g. labels saved from a float table; they become int32), in ``0..K-1`` with ``K``
  the dataset's ``num_classes``; where the dataset does not know ``K`` (your own ``.npz``), ``K``
  is the largest label + 1, the smallest label must be 0 and there must be at least two classes;
* no NaN or inf in the features of either split.

Cost: one vectorised pass. The finiteness check is a sum over the array (no temporary of the
array's size; a non-finite sum is then located exactly, block by block, to report where). For a
dataset read from disk (:class:`jaxdp.data.records.RecordArray`, larger than memory) the features
are *not* scanned: its shapes come from its first record and its labels from the labels pass that
loading already makes. For the TFDS image datasets this skips nothing, since their images are
uint8 (which cannot hold NaN or inf).

:class:`DataError` is a :class:`jaxdp.config.ConfigError`, so ``jaxdp train`` prints it as
``jaxdp: error: ...`` on one line and exits with status 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxdp.config import ConfigError
from jaxdp.data.records import RecordArray

__all__ = ["DataError", "validate"]

_NUMBERS = "numbers (float, int, uint, bool or complex)"
_BLOCK = 1 << 22  # elements per block when locating non-finite values


class DataError(ConfigError):
    """A dataset that cannot be trained on: says what was found, what is expected, and the fix (one line)."""


def _kind(dtype: np.dtype) -> str:
    if dtype.kind in "US":
        return f"dtype {dtype} (strings)"
    if dtype.kind == "O":
        return f"dtype {dtype} (Python objects)"
    return f"dtype {dtype}"


def _check_features(where: str, key: str, x: Any) -> None:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise DataError(f"{where}: {key} is a {type(x).__name__}; expected a numpy array of {_NUMBERS}.")
    dtype = np.dtype(dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise DataError(
            f"{where}: {key} has {_kind(dtype)}; expected {_NUMBERS}: convert it, e.g. {key}.astype(np.float32)."
        )
    if len(shape) < 2:
        raise DataError(
            f"{where}: {key} has shape {tuple(shape)}; expected one row per example, (n, features) or "
            f"(n, H, W, C): e.g. {key}.reshape(-1, 1) for a single feature."
        )
    if shape[0] == 0:
        raise DataError(f"{where}: {key} has 0 rows (shape {tuple(shape)}); expected at least one example in it.")
    if 0 in tuple(shape[1:]):
        raise DataError(f"{where}: {key} has shape {tuple(shape)}, no features per example; expected at least one.")


def _check_label_shape(where: str, key: str, y: Any, rows: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1 and y.shape[0] == rows:
        raise DataError(
            f"{where}: {key} has shape {y.shape}; expected (n,) integer labels, not one-hot rows: "
            f"use {key}.argmax(axis=1)."
        )
    if y.ndim != 1:
        raise DataError(
            f"{where}: {key} has shape {y.shape}; expected (n,), one integer label per row: {key}.reshape(-1)."
        )
    if len(y) != rows:
        split = key[2:]
        raise DataError(
            f"{where}: x_{split} has {rows} rows but {key} has {len(y)} labels; expected one label per row."
        )
    return y


def _as_int_labels(where: str, key: str, y: np.ndarray) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer):
        return y
    if y.dtype == np.bool_:  # two classes, False = 0 and True = 1
        return y.astype(np.int32)
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad) == 0:
            return y
        raise DataError(
            f"{where}: {key} has {len(bad)} non-integer label{'s' if len(bad) > 1 else ''} "
            f"(e.g. {y[bad[0]].item()!r} at row {bad[0]}); expected integer class labels 0..K-1."
        )
    raise DataError(
        f"{where}: {key} has {_kind(y.dtype)}; expected integer class labels 0..K-1: map the classes to integers, "
        f"e.g. np.unique({key}, return_inverse=True)[1] (the same mapping for both splits)."
    )


def _span(y: np.ndarray) -> str:
    lo, hi = int(y.min()), int(y.max())
    return f"label {lo}" if lo == hi else f"labels {lo}..{hi}"


def _shift(lo: int) -> str:
    return f"y {'+' if lo < 0 else '-'} {abs(lo)}"


def _check_finite(where: str, key: str, x: np.ndarray) -> None:
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.complexfloating)):
        return  # integers and bools cannot hold NaN or inf
    flat = x.reshape(-1)
    acc = np.float32 if x.dtype == np.float16 else None  # float16 sums overflow early
    with np.errstate(all="ignore"):  # overflow or inf - inf is what the sum is there to notice
        total = flat.sum(dtype=acc)
    if np.isfinite(total):
        return  # one pass; an overflowing sum of finite values only costs the exact pass below
    nans = infs = 0
    first = None
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK]
        nan, inf = np.isnan(block), np.isinf(block)
        nans, infs = nans + int(nan.sum()), infs + int(inf.sum())
        if first is None and (nans or infs):
            first = (start + int(np.flatnonzero(nan | inf)[0])) // (x.size // x.shape[0])
    if first is None:
        return
    found = " and ".join(f"{n} {what}" for n, what in ((nans, "NaN"), (infs, "inf")) if n)
    raise DataError(
        f"{where}: {key} has {found} value{'s' if nans + infs > 1 else ''} (first in row {first}); "
        "expected finite numbers: drop or impute those rows."
    )


def validate(dataset: Any, where: str | None = None) -> Any:
    """``dataset`` checked (see the module docstring), its labels as int32 and ``num_classes`` known.

    Args:
      dataset: a :class:`jaxdp.data.Dataset`; ``num_classes <= 0`` means "from the labels"
        (largest label + 1, with the smallest label 0 and at least two classes).
      where: how the message names the data (a file path, a dataset name); default ``dataset.name``.

    Returns:
      The dataset, labels as int32 and ``num_classes`` set; the features are not copied.

    Raises:
      DataError: one line naming the array, what it holds, what is expected and the fix.

    Example::

      >>> import numpy as np
      >>> from jaxdp.data import Dataset
      >>> x = np.zeros((4, 3), np.float32)
      >>> validate(Dataset("toy", x, np.array([0, 1, 1, 2]), x, np.array([0, 1, 2, 3]), 3))
      Traceback (most recent call last):
      ...
      jaxdp.data.validate.DataError: toy: y_test has labels 0..3; expected integers in 0..2 (num_classes=3).
    """
    where = where or dataset.name
    test = "test" if dataset.eval_split == "test" else dataset.eval_split
    splits = (("train", dataset.x_train, dataset.y_train), (test, dataset.x_test, dataset.y_test))
    labels = {}
    for split, x, y in splits:
        _check_features(where, f"x_{split}", x)
        labels[split] = _check_label_shape(where, f"y_{split}", y, x.shape[0])
    (_, x_tr, _), (_, x_te, _) = splits
    if tuple(x_tr.shape[1:]) != tuple(x_te.shape[1:]):
        raise DataError(
            f"{where}: x_train has examples of shape {tuple(x_tr.shape[1:])} but x_{test} has {tuple(x_te.shape[1:])}; "
            "expected the same shape per example in both splits."
        )
    complex_tr, complex_te = (np.issubdtype(np.dtype(x.dtype), np.complexfloating) for x in (x_tr, x_te))
    if complex_tr != complex_te:
        raise DataError(
            f"{where}: x_train has dtype {np.dtype(x_tr.dtype)} but x_{test} has {np.dtype(x_te.dtype)}; expected "
            "both real or both complex: convert one of them."
        )
    for split in labels:
        labels[split] = _as_int_labels(where, f"y_{split}", labels[split])
    k = int(dataset.num_classes)
    lo = min(int(y.min()) for y in labels.values())
    hi = max(int(y.max()) for y in labels.values())
    if k > 0:
        for split, y in labels.items():
            if y.min() < 0 or y.max() >= k:
                raise DataError(
                    f"{where}: y_{split} has {_span(y)}; expected integers in 0..{k - 1} (num_classes={k})."
                )
    else:  # K from the labels: only their smallest value can be wrong
        for split, y in labels.items():
            if y.min() < 0:
                raise DataError(
                    f"{where}: y_{split} has {_span(y)}; expected integers 0..K-1 for K classes: shift them to "
                    f"start at 0 ({_shift(lo)} in both splits)."
                )
        if lo > 0:
            raise DataError(
                f"{where}: the labels are {lo}..{hi} and no example has label 0; expected integers 0..K-1 (K "
                f"classes): shift them to start at 0 ({_shift(lo)} in both splits)."
            )
        if hi >= 2**31 - 1:
            raise DataError(
                f"{where}: the labels are {lo}..{hi}; expected class indices 0..K-1 (int32): map the classes to "
                "0..K-1, e.g. np.unique(y, return_inverse=True)[1] over both splits together."
            )
        if hi < 1:
            raise DataError(f"{where}: every label is 0; expected at least two classes (integer labels 0..K-1).")
        k = hi + 1
    for split, x, _ in splits:
        if not isinstance(x, RecordArray):  # a RecordArray on disk is not scanned (see the module docstring)
            _check_finite(where, f"x_{split}", np.asarray(x))
    return dataset._replace(
        y_train=labels["train"].astype(np.int32, copy=False),
        y_test=labels[test].astype(np.int32, copy=False),
        num_classes=k,
    )
