"""k-space data for the complex-valued experiment: the 2-D FFT of real images, with and without phase.

The k-space of a real image is Hermitian (k(−u) = conj k(u)): it holds no information the image lacks,
and half of it is redundant. MRI data is not like that: coil sensitivities, field inhomogeneity and
motion put a smooth, spatially varying phase on the image before it is sampled. ``*_phase`` datasets
model that: each image x is multiplied by exp(i·φ) with φ a smooth random map of its own (a quadratic
polynomial over the image with random coefficients, :func:`smooth_phase`), drawn from a public seed and
independent of the label, and then Fourier-transformed. Their k-space is not Hermitian, and the phase
is a nuisance the network has to see past; the magnitude image |IFFT(k)| = x still carries every label.

Registered datasets (``jaxdp.data.register_dataset``), for ``BASE`` in ``digits``, ``fashion_mnist``
(TFDS, from a prepared ``data_dir``), ``fashion_mnist_10k`` (a stratified subset of 10,000 of its 60,000
training images, public seed 1, with the whole test set; itself registered) and ``mnist``:

* ``BASE_kspace``              complex64 (n, H, W, 1): orthonormal 2-D FFT of each image (Hermitian);
* ``BASE_kspace_reim``         float32 (n, H, W, 2): the same k-space, (Re, Im) as channels;
* ``BASE_kspace_phase``        complex64 (n, H, W, 1): FFT of x·exp(iφ) (not Hermitian);
* ``BASE_kspace_phase_reim``   float32 (n, H, W, 2): that k-space, (Re, Im) as channels;
* ``BASE_phase_magnitude``     float32 (n, H, W, 1): |IFFT(k)| of the phase k-space, i.e. the magnitude
                               image a scanner shows (equal to x up to float rounding);
* ``BASE_image_phase``         complex64 (n, H, W, 1): IFFT(k) of the phase k-space, the complex image x·exp(iφ);
* ``BASE_image_phase_reim``    float32 (n, H, W, 2): that complex image, (Re, Im) as channels.

Real k-space arrays of your own (e.g. MRI) load with ``dataset="npz:/path/file.npz"`` holding complex64
x_train/x_test of shape (n, H, W, C) and integer labels (see ``jaxdp.data.NPZ_FORMAT``).
"""

from __future__ import annotations

import numpy as np

from jaxdp import data

__all__ = ["PHASE_SEEDS", "complex_image", "kspace", "magnitude_image", "register", "smooth_phase", "with_phase"]

#: Public seeds of the phase maps (train, test): the maps are a fixed part of the data set.
PHASE_SEEDS = (20261206, 20261207)
BASES = ("digits", "fashion_mnist", "fashion_mnist_10k", "mnist")
SUBSETS = {"fashion_mnist_10k": ("fashion_mnist", 10_000)}  # name: (TFDS dataset, training images kept)
SUFFIXES = (
    "kspace",
    "kspace_reim",
    "kspace_phase",
    "kspace_phase_reim",
    "phase_magnitude",
    "image_phase",
    "image_phase_reim",
)


def kspace(images: np.ndarray) -> np.ndarray:
    """Orthonormal 2-D FFT over (H, W) of NHWC images (real or complex), as complex64."""
    return np.fft.fft2(images, axes=(1, 2), norm="ortho").astype(np.complex64)


def complex_image(k: np.ndarray) -> np.ndarray:
    """IFFT(k) over (H, W), complex64: the complex image of NHWC k-space."""
    return np.fft.ifft2(k, axes=(1, 2), norm="ortho").astype(np.complex64)


def magnitude_image(k: np.ndarray) -> np.ndarray:
    """|IFFT(k)| over (H, W), float32: the magnitude image of NHWC k-space."""
    return np.abs(complex_image(k)).astype(np.float32)


def smooth_phase(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """``n`` smooth random phase maps (n, H, W, 1), float32 radians.

    φ(u, v) = a₀ + a₁u + a₂v + a₃u² + a₄uv + a₅v² on u, v ∈ [−1, 1]: a₀ uniform on [−π, π) (a global
    phase), the other coefficients N(0, (π/2)²) (a linear term shifts k-space by a₁/π pixels on average;
    the quadratic ones spread it). Smooth on the scale of the image, like coil and B₀ phase; drawn from
    ``seed`` only, so it is independent of the label.
    """
    rng = np.random.default_rng(seed)
    coef = rng.normal(0.0, np.pi / 2, size=(n, 6))
    coef[:, 0] = rng.uniform(-np.pi, np.pi, size=n)
    u = np.linspace(-1.0, 1.0, height)[:, None]
    v = np.linspace(-1.0, 1.0, width)[None, :]
    basis = np.stack(
        np.broadcast_arrays(np.ones_like(u * v), u + 0 * v, 0 * u + v, u * u + 0 * v, u * v, 0 * u + v * v)
    )
    phase = np.einsum("nk,khw->nhw", coef, basis)
    return phase[..., None].astype(np.float32)


def with_phase(images: np.ndarray, seed: int) -> np.ndarray:
    """Complex64 images x·exp(iφ), φ from :func:`smooth_phase` (one map per image, from ``seed``)."""
    n, h, w, _ = images.shape
    return (images * np.exp(1j * smooth_phase(n, h, w, seed))).astype(np.complex64)


def _reim(k: np.ndarray) -> np.ndarray:
    return np.concatenate([k.real, k.imag], axis=-1).astype(np.float32)


def _variants(ds: data.Dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The derived (x_train, x_test) of one base dataset (computed together, once)."""
    k_tr, k_te = kspace(ds.x_train), kspace(ds.x_test)
    p_tr = kspace(with_phase(ds.x_train, PHASE_SEEDS[0]))
    p_te = kspace(with_phase(ds.x_test, PHASE_SEEDS[1]))
    return {
        "kspace": (k_tr, k_te),
        "kspace_reim": (_reim(k_tr), _reim(k_te)),
        "kspace_phase": (p_tr, p_te),
        "kspace_phase_reim": (_reim(p_tr), _reim(p_te)),
        "phase_magnitude": (magnitude_image(p_tr), magnitude_image(p_te)),
        "image_phase": (image_tr := complex_image(p_tr), image_te := complex_image(p_te)),
        "image_phase_reim": (_reim(image_tr), _reim(image_te)),
    }


_CACHE: dict[tuple[str, str], dict] = {}


def _loader(base: str, suffix: str):
    def load(data_dir):
        key = (base, data_dir or "")
        if key not in _CACHE:  # one process trains several variants of one base: load and transform once
            _CACHE.clear()
            ds = data.load(base, data_dir)
            _CACHE[key] = {"base": ds, **_variants(ds)}
        ds, (x_tr, x_te) = _CACHE[key]["base"], _CACHE[key][suffix]
        return data.Dataset(f"{base}_{suffix}", x_tr, ds.y_train, x_te, ds.y_test, ds.num_classes)

    return load


def _subset_loader(name: str):
    base, size = SUBSETS[name]

    def load(data_dir):
        full = data.load(base, data_dir)
        sub = data.holdout(full, size, seed=1)  # its evaluation split is the stratified subset
        return data.Dataset(name, np.asarray(sub.x_test), sub.y_test, full.x_test, full.y_test, full.num_classes)

    return load


def register() -> None:
    """Register the k-space datasets (idempotent)."""
    for name in SUBSETS:
        if name not in data.available():
            data.register_dataset(name, _subset_loader(name))
    for base in BASES:
        for suffix in SUFFIXES:
            name = f"{base}_{suffix}"
            if name not in data.available():
                data.register_dataset(name, _loader(base, suffix))


register()
