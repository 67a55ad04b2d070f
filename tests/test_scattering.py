"""ScatterNet features: the filter bank's properties, and the FFT pipeline against a slow spatial reference."""

import numpy as np
import pytest

from jaxdp.data import Dataset
from jaxdp.data import scattering as scat

pytestmark = pytest.mark.xdist_group("scattering")

M = N = 36  # a 28x28 image reflect-padded by 2**J = 4 on each side


def _circular_conv(x, f):
    """Slow reference: out[a, b] = sum_{u, v} x[u, v] f[(a - u) % M, (b - v) % N]."""
    out = np.zeros(x.shape, np.complex128)
    for u in range(x.shape[0]):
        for v in range(x.shape[1]):
            out += x[u, v] * np.roll(np.roll(f, u, axis=0), v, axis=1)
    return out


def _spatial_bank(J=2, L=8):
    psi_hat, phi_hat = scat.scattering_filters(M, N, J, L)
    return np.fft.ifft2(psi_hat.astype(np.complex128)), np.fft.ifft2(phi_hat.astype(np.complex128))


def test_wavelets_have_zero_mean_and_the_lowpass_unit_mean():
    psi_hat, phi_hat = scat.scattering_filters(M, N, 2, 8)
    assert np.abs(psi_hat[..., 0, 0]).max() < 1e-6
    assert abs(phi_hat[0, 0] - 1) < 1e-5


def test_a_quarter_turn_of_a_wavelet_is_the_wavelet_four_orientations_on():
    """theta_t = (3 - t) pi / 8: rotating psi_{j,t} by 90 degrees about the origin gives psi_{j,t-4} or
    psi_{j,t+4} (theta and theta + pi have the same modulus response on real images: conjugate filters)."""
    psi, _ = _spatial_bank()
    grid = np.arange(M)
    for j in range(2):
        for t in range(8):
            rotated = psi[j, t][(-grid[None, :]) % M, grid[:, None]]  # f(x, y) -> f(-y, x), periodic
            other = psi[j, (t + 4) % 8]
            err = min(np.abs(rotated - other).max(), np.abs(rotated - np.conj(other)).max())
            assert err < 1e-5 * np.abs(other).max(), (j, t, err)


def test_coefficients_equal_a_slow_spatial_reference():
    rng = np.random.default_rng(0)
    image = rng.random((28, 28)).astype(np.float32)
    got = scat.scattering(image[None], J=2, L=8)[0]  # (7, 7, 81)
    assert got.shape == (7, 7, scat.num_channels(2, 8)) == (7, 7, 81)
    psi, phi = _spatial_bank()
    x = np.pad(image.astype(np.float64), 4, mode="reflect")

    def low(u):
        return _circular_conv(u, phi).real[::4, ::4][1:-1, 1:-1]

    np.testing.assert_allclose(got[..., 0], low(x), rtol=1e-4, atol=1e-5)  # order 0
    j1, t1, t2 = 0, 3, 6
    u1 = np.abs(_circular_conv(x, psi[j1, t1]))
    np.testing.assert_allclose(got[..., 1 + j1 * 8 + t1], low(u1), rtol=1e-4, atol=1e-5)  # order 1
    u2 = np.abs(_circular_conv(u1, psi[1, t2]))
    np.testing.assert_allclose(got[..., 1 + 16 + t1 * 8 + t2], low(u2), rtol=1e-4, atol=1e-5)  # order 2, j1=0 j2=1


def test_batches_do_not_change_the_coefficients():
    images = np.random.default_rng(1).random((5, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(
        scat.scattering(images, batch_size=2), scat.scattering(images, batch_size=8), rtol=1e-5, atol=1e-6
    )


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="grey images"):
        scat.scattering(np.zeros((2, 28, 28, 3)))
    with pytest.raises(ValueError, match="divisible by 4"):
        scat.scattering(np.zeros((2, 30, 30)))


def test_scattered_datasets_are_cached_by_content(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    ds = Dataset(
        "toy",
        rng.random((6, 28, 28, 1), np.float32),
        np.arange(6) % 2,
        rng.random((3, 28, 28, 1), np.float32),
        np.arange(3) % 2,
        2,
    )
    first = scat.scattered(ds, cache_dir=str(tmp_path))
    assert first.x_train.shape == (6, 7, 7, 81) and len(list(tmp_path.iterdir())) == 1

    def fail(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(scat, "scattering", fail)
    again = scat.scattered(ds, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(again.x_train, first.x_train)
    changed = ds._replace(x_train=ds.x_train + 0.5)
    with pytest.raises(AssertionError, match="recomputed"):  # other images: another cache file
        scat.scattered(changed, cache_dir=str(tmp_path))
