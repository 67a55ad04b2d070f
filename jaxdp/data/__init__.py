"""Datasets, loaded entirely offline.

``load("digits")`` is scikit-learn's bundled handwritten digits (real data that
ships inside the installed scikit-learn package: 1,797 8x8 grey images, 10
classes) with a fixed stratified 80/20 train/test split.

``load("mnist", data_dir=...)`` (also ``fashion_mnist``, ``cifar10``,
``cifar100``, or any image-classification TFDS name) reads a TFDS dataset that
was *prepared beforehand* in the array_record format; nothing is downloaded. A
dataset that is not there is a one-line error saying how to prepare it.

``load("npz:PATH")`` reads your own arrays (see ``NPZ_FORMAT``).

Every dataset is checked once as it is loaded (:func:`jaxdp.data.validate.validate`: shapes,
dtypes, labels in 0..K-1, no NaN/inf, no empty split); bad data is a one-line
:class:`DataError` (a :class:`jaxdp.config.ConfigError`: ``jaxdp train`` prints it and exits 2).
"""

from __future__ import annotations

import os
import zipfile
from typing import NamedTuple

import numpy as np

from jaxdp.data.validate import DataError, validate

__all__ = ["NPZ_FORMAT", "DataError", "Dataset", "available", "holdout", "load", "register_dataset", "validate"]


class Dataset(NamedTuple):
    """In-memory arrays of one dataset; images are NHWC float32 in [0, 1]."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    eval_split: str = "test"  # what x_test/y_test hold: "test", or "validation" after holdout()

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
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def register_dataset(name: str, loader) -> None:
    """Make ``loader(data_dir) -> Dataset`` loadable by ``name`` (configs, ``jaxdp train``).

    Experiments use it for derived data (e.g. k-space of images) without
    editing jaxdp. Built-in names cannot be replaced.
    """
    if name in _BUILTIN or name in TFDS_DATASETS:
        raise ValueError(f"dataset name {name!r} is taken by a built-in dataset; choose another name.")
    _REGISTERED[name] = loader


_REGISTERED: dict = {}


def available() -> list[str]:
    """Names :func:`load` accepts (TFDS ones need a prepared ``data_dir``)."""
    return sorted(_BUILTIN) + list(TFDS_DATASETS) + sorted(_REGISTERED)


def _records(source):
    """Every record of a TFDS data source, read in batches of 4096 (batched random access where it has it)."""
    n = len(source)
    for start in range(0, n, 4096):
        idx = list(range(start, min(n, start + 4096)))
        try:
            yield from source.__getitems__(idx)  # batched random access (array_record)
        except (AttributeError, TypeError):
            yield from (source[i] for i in idx)


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for r in _records(source):
        images.append(r["image"])
        labels.append(r["label"])
    return np.stack(images), np.asarray(labels, np.int32)


def _labels(name: str, split: str, data_dir: str | None) -> np.ndarray:
    """A split's labels alone (images left encoded: a pass over the records, no image decoding)."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(
        name, split=split, data_dir=data_dir or None, download=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    return np.asarray([r["label"] for r in _records(source)], np.int32)


def _tfds(name: str, data_dir: str | None, memory_mb: float | None = None) -> Dataset:
    import tensorflow_datasets as tfds

    where = data_dir or "the default TFDS directory (~/tensorflow_datasets)"
    how = (
        f"TFDS dataset {name!r} is not prepared in {where}; nothing is downloaded at run time. Run "
        f"`jaxdp data prepare {name} --data_dir DIR` (from local files: add --source FOLDER; on a machine with a "
        f"network TFDS downloads them, or `tfds build {name} --file_format=array_record --data_dir DIR` there and "
        "copy DIR here), then set data_dir=DIR."
    )
    try:
        train = tfds.data_source(name, split="train", data_dir=data_dir or None, download=False)
        test = tfds.data_source(name, split="test", data_dir=data_dir or None, download=False)
        on_disk = False
        if memory_mb is not None:
            from jaxdp.data.records import RecordArray

            x_tr, x_te = RecordArray(train), RecordArray(test)
            on_disk = (x_tr.nbytes + x_te.nbytes) / 2**20 > memory_mb  # read by random access, batch by batch
        if on_disk:
            y_tr, y_te = _labels(name, "train", data_dir), _labels(name, "test", data_dir)
        else:
            x_tr, y_tr = _read_split(train)
            x_te, y_te = _read_split(test)
    except (FileNotFoundError, NotImplementedError, AssertionError, ValueError, KeyError) as e:
        raise ValueError(f"{how} ({type(e).__name__})") from None
    # Known datasets have a fixed K; any other TFDS name takes K from its labels (validate, 0 = from the data).
    num_classes = _NUM_CLASSES.get(name, 0)
    if on_disk:  # shapes from the first record, labels from the labels pass; the images are not scanned
        return validate(Dataset(name, x_tr, y_tr, x_te, y_te, num_classes))
    x_tr, y_tr, x_te, y_te, num_classes = validate(Dataset(name, x_tr, y_tr, x_te, y_te, num_classes))[1:6]
    scale = 255.0 if x_tr.dtype == np.uint8 else 1.0
    return Dataset(
        name,
        x_tr.astype(np.float32) / scale,
        y_tr,
        x_te.astype(np.float32) / scale,
        y_te,
        num_classes,
    )


NPZ_FORMAT = (
    "an .npz file with arrays x_train (n, H, W, C) or (n, features), y_train (n,) integer labels 0..K-1, "
    "x_test, y_test; float or complex arrays (e.g. k-space) are used as they are, uint8 images are scaled "
    "to [0, 1]"
)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_SAVEZ = 'np.savez("data.npz", x_train=..., y_train=..., x_test=..., y_test=...)'


def _npz_arrays(path: str) -> dict[str, np.ndarray]:
    """The four arrays of a user's .npz file, or a one-line DataError naming what the file is instead."""
    if not os.path.isfile(path):
        raise DataError(f"dataset file {path!r} not found; provide {NPZ_FORMAT}.")
    expected = f"an .npz archive with {', '.join(NPZ_KEYS)}: save with {_SAVEZ}"
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty (0 bytes); expected {expected}.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not numpy's, pickled, truncated
        raise DataError(f"{path} is not a numpy file ({type(e).__name__}: {e}); expected {expected}.") from None
    if isinstance(loaded, np.ndarray):  # np.save's .npy: one array, not four
        raise DataError(f"{path} is a .npy array {loaded.shape} {loaded.dtype}, not {expected}.")
    with loaded as f:
        missing = [k for k in NPZ_KEYS if k not in f.files]
        if missing:
            found = ", ".join(f.files) or "no arrays"
            raise DataError(f"{path} lacks {missing} (it has {found}); expected {NPZ_FORMAT}.")
        try:
            return {k: f[k] for k in NPZ_KEYS}
        except ValueError as e:  # object arrays (allow_pickle=False), a corrupt member
            raise DataError(
                f"{path}: cannot read its arrays ({e}); expected numeric arrays: save them as numbers, e.g. "
                "x.astype(np.float32)."
            ) from None
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: cannot read its arrays ({type(e).__name__}: {e}); expected {expected}.") from None


def _npz(path: str) -> Dataset:
    name = os.path.splitext(os.path.basename(path))[0]
    a = _npz_arrays(path)
    ds = validate(Dataset(name, a["x_train"], a["y_train"], a["x_test"], a["y_test"], 0), where=path)

    def images(x):
        return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x

    return ds._replace(x_train=images(ds.x_train), x_test=images(ds.x_test))


def holdout(dataset: Dataset, size: int, seed: int = 0) -> Dataset:
    """Carve a validation split of ``size`` examples out of the training set, stratified by label.

    The result trains on the rest and evaluates on the held-out part (``x_test``/``y_test``, with
    ``eval_split="validation"``); the test set is dropped so that hyperparameters chosen on what a run
    reports are never chosen on the test set. The split depends only on ``seed`` (public, fixed by default),
    not on the model or noise seeds, so every trial of a search sees the same split.
    """
    n = len(dataset.y_train)
    if not 0 < size < n:
        raise ValueError(f"validation_size={size} is invalid: need 0 < size < {n} (the training set's size).")
    rng = np.random.default_rng(seed)
    # Stratified: each class gives its share of the validation split, in a random order within the class.
    val = []
    counts = np.bincount(dataset.y_train, minlength=dataset.num_classes)
    share = np.floor(counts * size / n).astype(int)
    share[np.argsort(-(counts * size / n - share))[: size - share.sum()]] += 1  # largest remainders
    for c in range(len(counts)):
        members = np.flatnonzero(dataset.y_train == c)
        val.append(rng.permutation(members)[: share[c]])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(n), val)

    from jaxdp.data.records import RecordArray

    def rows(x, i):  # a RecordArray stays on disk
        return x.view(i) if isinstance(x, RecordArray) else x[i]

    return Dataset(
        dataset.name,
        rows(dataset.x_train, train),
        dataset.y_train[train],
        rows(dataset.x_train, val),
        dataset.y_train[val],
        dataset.num_classes,
        "validation",
    )


def load(name: str, data_dir: str | None = None, memory_mb: float | None = None) -> Dataset:
    """Load a dataset by name: built-in (``digits``) or a prepared TFDS dataset.

    Args:
      name: ``digits``, a TFDS image-classification dataset name, or
        ``npz:PATH`` for your own arrays (see ``NPZ_FORMAT``).
      data_dir: where the TFDS dataset was prepared (ignored for built-ins).
      memory_mb: a TFDS dataset whose images take more than this (as float32) is not loaded: its
        ``x_train``/``x_test`` are :class:`jaxdp.data.records.RecordArray`, read from the array_record
        files batch by batch (the same values). None: always load whole.

    Raises:
      DataError: data that cannot be trained on (see :func:`jaxdp.data.validate.validate`), a missing,
        empty or unreadable npz file, or one without the four arrays; one line saying what was found,
        what is expected and the fix. It is a ConfigError, hence a ValueError.
      ValueError: for an unknown name, or a TFDS dataset that is not prepared
        (the message says how to prepare it).
    """
    if name in _BUILTIN:
        return validate(_BUILTIN[name]())
    if name in TFDS_DATASETS:
        return _tfds(name, data_dir, memory_mb)
    if name.startswith("npz:"):
        return _npz(name[4:])
    if name in _REGISTERED:
        return validate(_REGISTERED[name](data_dir))
    if name.endswith((".npz", ".npy")) or os.path.isfile(name):
        raise ValueError(f"dataset={name!r} is not a dataset name; for your own arrays use dataset=npz:{name}.")
    raise ValueError(
        f"dataset={name!r} is not available; built-in: {', '.join(sorted(_BUILTIN))}; "
        f"TFDS (prepared data_dir): {', '.join(TFDS_DATASETS)}; your own arrays: npz:PATH"
        + (f"; registered: {', '.join(sorted(_REGISTERED))}" if _REGISTERED else "")
        + "."
    )
