"""k-space data for the complex-valued experiment: the 2-D FFT of real images.

Registered datasets (``jaxdp.data.register_dataset``), all with the digits split:

* ``digits_kspace``       complex64 (n, 8, 8, 1): orthonormal 2-D FFT of each image;
* ``digits_kspace_reim``  float32 (n, 8, 8, 2): the same k-space, (Re, Im) as channels;
* ``mnist_kspace``, ``mnist_kspace_reim``: the same from a prepared TFDS mnist (``data_dir``).

The magnitude-image baseline uses ``digits`` itself: for a real image x,
|IFFT(FFT(x))| = x. Real k-space arrays of your own (e.g. MRI) load with
``dataset="npz:/path/file.npz"`` holding complex64 x_train/x_test of shape
(n, H, W, C) and integer labels (see ``jaxdp.data.NPZ_FORMAT``).
"""

from __future__ import annotations

import numpy as np

from jaxdp import data

__all__ = ["kspace", "register"]


def kspace(images: np.ndarray) -> np.ndarray:
    """Orthonormal 2-D FFT over (H, W) of NHWC images, as complex64."""
    return np.fft.fft2(images, axes=(1, 2), norm="ortho").astype(np.complex64)


def _derived(base: str, transform, suffix: str):
    def loader(data_dir):
        ds = data.load(base, data_dir)
        return data.Dataset(
            f"{base}_{suffix}", transform(ds.x_train), ds.y_train, transform(ds.x_test), ds.y_test, ds.num_classes
        )

    return loader


def _reim(images: np.ndarray) -> np.ndarray:
    k = kspace(images)
    return np.concatenate([k.real, k.imag], axis=-1).astype(np.float32)


def register() -> None:
    """Register the k-space datasets (idempotent)."""
    for name, loader in {
        "digits_kspace": _derived("digits", kspace, "kspace"),
        "digits_kspace_reim": _derived("digits", _reim, "kspace_reim"),
        "mnist_kspace": _derived("mnist", kspace, "kspace"),
        "mnist_kspace_reim": _derived("mnist", _reim, "kspace_reim"),
    }.items():
        if name not in data.available():
            data.register_dataset(name, loader)


register()
