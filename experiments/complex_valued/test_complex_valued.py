"""k-space datasets, the recipes, and a smoke run of the table command."""

import os

import numpy as np
import pytest

from experiments.complex_valued import run
from experiments.complex_valued.kspace import kspace
from jaxdp import data
from jaxdp.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def test_kspace_datasets():
    k = data.load("digits_kspace")
    img = data.load("digits")
    reim = data.load("digits_kspace_reim")
    assert k.x_train.dtype == np.complex64 and k.x_train.shape == (1437, 8, 8, 1)
    assert reim.x_train.dtype == np.float32 and reim.x_train.shape == (1437, 8, 8, 2)
    # Orthonormal FFT: energy preserved, and the magnitude image is the image itself.
    np.testing.assert_allclose(np.sum(np.abs(k.x_train[0]) ** 2), np.sum(img.x_train[0] ** 2), rtol=1e-5)
    back = np.abs(np.fft.ifft2(k.x_train, axes=(1, 2), norm="ortho"))
    np.testing.assert_allclose(back, img.x_train, atol=1e-5)
    np.testing.assert_array_equal(k.y_test, img.y_test)
    np.testing.assert_allclose(reim.x_train[..., 0], k.x_train[..., 0].real)


def test_user_kspace_arrays_load_as_complex(tmp_path):
    path = tmp_path / "mri.npz"
    x = kspace(np.random.default_rng(0).random((6, 8, 8, 1)).astype(np.float32))
    np.savez(path, x_train=x, y_train=np.arange(6) % 4, x_test=x[:2], y_test=np.array([0, 1]))
    ds = data.load(f"npz:{path}")
    assert ds.x_train.dtype == np.complex64 and ds.num_classes == 4


@pytest.mark.parametrize("name", ["digits_kspace.py:complex", "digits_kspace.py:reim,smoke", "mnist_kspace.py:complex"])
def test_recipes_parse(name):
    config = load_config(os.path.join(HERE, "configs", name))
    assert config.model.name in ("complex_cnn", "cnn")
    with pytest.raises(ValueError, match="variant"):
        load_config(os.path.join(HERE, "configs", "digits_kspace.py:bogus"))


@pytest.mark.slow  # ~40 s: trains every row of the table once (CI's slow step)
def test_table_command_smoke(tmp_path):
    rows = run.main(["--epsilons", "3", "--seeds", "0", "--smoke", "--out", str(tmp_path)])
    assert {r["model"] for r in rows} == {"complex", "magnitude", "reim"}
    for r in rows:
        assert r["epsilon_spent"] <= 3.0 and 0.0 < r["test_accuracy"] <= 1.0 and r["examples_per_sec"] > 0
    assert "complex CNN on k-space" in (tmp_path / "table.md").read_text()
