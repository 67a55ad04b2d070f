"""ScatterNet features (Mallat's 2-d wavelet scattering transform), in JAX: fixed, data-independent features.

Tramèr & Boneh (ICLR 2021) train linear models with DP-SGD on these features and beat end-to-end CNNs
at the same privacy budget. The transform has no learned part and reads no other data, so computing it
on the private images is post-processing-free preprocessing: privacy is that of the DP-SGD run on it.

Filters are Morlet wavelets ``psi_{j,theta}`` (j < J scales, L orientations) and a Gaussian low-pass
``phi_J`` (Mallat 2012; Bruna & Mallat 2013), with the parameters the scattering literature uses
(sigma = 0.8 * 2**j, xi = 3*pi/4 / 2**j, slant 4/L). For an image x:

    S0 = x * phi_J,   S1 = |x * psi_{j1}| * phi_J,   S2 = ||x * psi_{j1}| * psi_{j2}| * phi_J  (j2 > j1)

each subsampled by 2**J. Convolutions are products in the Fourier domain on the image reflect-padded by
2**J on each side; unlike kymatio, U1 is kept at full resolution (no intermediate subsampling). J = 2,
L = 8 on 28x28 gives 1 + 16 + 64 = 81 channels of 7x7, the features of Tramèr & Boneh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["num_channels", "scattered", "scattering", "scattering_filters"]


def num_channels(J: int, L: int) -> int:
    """1 + J L + L^2 J (J - 1) / 2: the order-0, -1 and -2 coefficients."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def _gabor(M: int, N: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A 2-d Gabor filter on an M x N periodic grid (summed over neighbouring periods)."""
    R = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    D = np.diag([1.0, slant * slant])
    curv = R @ D @ R.T / (2 * sigma * sigma)
    out = np.zeros((M, N), np.complex128)
    for ex in (-2, -1, 0, 1, 2):
        for ey in (-2, -1, 0, 1, 2):
            xx, yy = np.mgrid[ex * M : M + ex * M, ey * N : N + ey * N]
            arg = -(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy)
            arg = arg + 1j * (xx * xi * math.cos(theta) + yy * xi * math.sin(theta))
            out += np.exp(arg)
    return out / (2 * math.pi * sigma * sigma / slant)


def _morlet(M, N, sigma, theta, xi, slant):
    """A Gabor filter minus the Gaussian that makes its mean zero (a wavelet)."""
    wave = _gabor(M, N, sigma, theta, xi, slant)
    envelope = _gabor(M, N, sigma, theta, 0.0, slant)
    return wave - (wave.sum() / envelope.sum()) * envelope


def scattering_filters(M: int, N: int, J: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Fourier transforms of the wavelets, shape (J, L, M, N), and of the low-pass, shape (M, N)."""
    psi = np.zeros((J, L, M, N), np.complex64)
    for j in range(J):
        for t in range(L):
            theta = (int(L - L / 2 - 1) - t) * math.pi / L
            psi[j, t] = np.fft.fft2(_morlet(M, N, 0.8 * 2**j, theta, 3.0 / 4.0 * math.pi / 2**j, 4.0 / L))
    phi = np.fft.fft2(_gabor(M, N, 0.8 * 2**J, 0.0, 0.0, 1.0)).astype(np.complex64)
    return psi, phi


def scattering(images, J: int = 2, L: int = 8, batch_size: int = 1024) -> np.ndarray:
    """Scattering coefficients of grey images ``(n, H, W)`` or ``(n, H, W, 1)``: ``(n, H/2^J, W/2^J, C)``,
    C = :func:`num_channels`, float32 (NHWC, channels ordered order 0, then 1 by (j1, theta1), then 2)."""
    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        if images.shape[-1] != 1:
            raise ValueError(f"scattering takes grey images; got {images.shape[-1]} channels.")
        images = images[..., 0]
    n, H, W = images.shape
    step = 2**J
    if H % step or W % step:
        raise ValueError(f"scattering with J={J} needs sides divisible by {step}; got {H}x{W}.")
    M, N = H + 2 * step, W + 2 * step
    psi, phi = (jnp.asarray(f) for f in scattering_filters(M, N, J, L))

    def lowpass(u_hat):  # (..., M, N) Fourier -> (..., H/step, W/step) real, unpadded
        s = jnp.fft.ifft2(u_hat * phi).real[..., ::step, ::step]
        return s[..., 1:-1, 1:-1]

    @jax.jit
    def one_batch(x):
        x = jnp.pad(x, ((0, 0), (step, step), (step, step)), mode="reflect")
        x_hat = jnp.fft.fft2(x)
        out = [lowpass(x_hat)[:, None]]
        u1 = jnp.abs(jnp.fft.ifft2(x_hat[:, None, None] * psi[None]))  # (n, J, L, M, N)
        u1_hat = jnp.fft.fft2(u1)
        out.append(lowpass(u1_hat).reshape(x.shape[0], J * L, H // step, W // step))
        for j1 in range(J):
            for j2 in range(j1 + 1, J):
                u2 = jnp.abs(jnp.fft.ifft2(u1_hat[:, j1, :, None] * psi[None, None, j2]))  # (n, L, L, M, N)
                out.append(lowpass(jnp.fft.fft2(u2)).reshape(x.shape[0], L * L, H // step, W // step))
        return jnp.concatenate(out, axis=1).transpose(0, 2, 3, 1)

    chunks = []
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size]
        pad = batch_size - len(x) if n > batch_size else 0  # one compiled shape
        y = one_batch(np.concatenate([x, np.zeros((pad, H, W), np.float32)]) if pad else x)
        chunks.append(np.asarray(y[: len(x)]))
    return np.concatenate(chunks)


def scattered(dataset, J: int = 2, L: int = 8, cache_dir: str | None = None):
    """``dataset`` with every image replaced by its scattering coefficients (``features="scattering"``).

    The coefficients of a dataset are computed once and kept in ``cache_dir`` (the file name holds a
    digest of the images, so changed data is never served stale); a cached file is as private as the
    images it was computed from.
    """
    import hashlib
    import os

    h = hashlib.sha256()
    for a in (dataset.x_train, dataset.x_test):
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"{dataset.name}-scattering-J{J}-L{L}-{h.hexdigest()[:16]}.npz")
        if os.path.exists(path):
            with np.load(path) as f:
                return dataset._replace(x_train=f["x_train"], x_test=f["x_test"])
    x_train = scattering(dataset.x_train, J, L)
    x_test = scattering(dataset.x_test, J, L)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, x_train=x_train, x_test=x_test)
        os.replace(tmp, path)  # a crash never leaves a half-written cache
    return dataset._replace(x_train=x_train, x_test=x_test)
