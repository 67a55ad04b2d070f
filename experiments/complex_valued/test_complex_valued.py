"""k-space datasets (with and without phase), the recipes, the table's bookkeeping and verdict, a smoke run."""

import json
import os
import pathlib

import numpy as np
import pytest

from experiments.complex_valued import kspace as K
from experiments.complex_valued import run
from jaxdp import data
from jaxdp.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def _hermitian_error(k):
    """max |k(u) − conj k(−u)| / max |k| over NHWC k-space (0 for the FFT of a real image)."""
    mirrored = np.conj(np.roll(np.flip(k, (1, 2)), 1, (1, 2)))
    return np.abs(k - mirrored).max() / np.abs(k).max()


def test_kspace_datasets():
    k = data.load("digits_kspace")
    img = data.load("digits")
    reim = data.load("digits_kspace_reim")
    assert k.x_train.dtype == np.complex64 and k.x_train.shape == (1437, 8, 8, 1)
    assert reim.x_train.dtype == np.float32 and reim.x_train.shape == (1437, 8, 8, 2)
    # Orthonormal FFT: energy preserved, and the magnitude image is the image itself.
    np.testing.assert_allclose(np.sum(np.abs(k.x_train[0]) ** 2), np.sum(img.x_train[0] ** 2), rtol=1e-5)
    np.testing.assert_allclose(K.magnitude_image(k.x_train), img.x_train, atol=1e-5)
    np.testing.assert_array_equal(k.y_test, img.y_test)
    np.testing.assert_allclose(reim.x_train[..., 0], k.x_train[..., 0].real)
    assert _hermitian_error(k.x_train) < 1e-6  # the k-space of a real image holds nothing the image lacks


def test_phase_kspace_is_not_hermitian_and_its_magnitude_image_is_the_image():
    img = data.load("digits")
    k = data.load("digits_kspace_phase")
    mag = data.load("digits_phase_magnitude")
    cimg = data.load("digits_image_phase")
    reim = data.load("digits_image_phase_reim")
    assert _hermitian_error(k.x_train) > 0.5
    np.testing.assert_allclose(mag.x_train, img.x_train, atol=1e-5)
    np.testing.assert_allclose(mag.x_test, img.x_test, atol=1e-5)
    np.testing.assert_allclose(np.abs(cimg.x_train), img.x_train, atol=1e-5)
    np.testing.assert_allclose(reim.x_train[..., 1], cimg.x_train[..., 0].imag)
    phase = K.smooth_phase(len(img.x_train), 8, 8, K.PHASE_SEEDS[0])
    np.testing.assert_allclose(cimg.x_train, (img.x_train * np.exp(1j * phase)).astype(np.complex64), atol=1e-5)
    for d in (k, mag, cimg, reim):
        np.testing.assert_array_equal(d.y_train, img.y_train)
        np.testing.assert_array_equal(d.y_test, img.y_test)


def test_smooth_phase_is_smooth_seeded_and_label_free():
    a = K.smooth_phase(50, 12, 10, seed=3)
    np.testing.assert_array_equal(a, K.smooth_phase(50, 12, 10, seed=3))  # from the seed alone: no labels
    assert not np.allclose(a, K.smooth_phase(50, 12, 10, seed=4))
    assert not np.allclose(a[0], a[1])  # a map of its own per image
    # A quadratic polynomial: its second differences are constant over the image, per image and axis.
    for axis in (1, 2):
        d2 = np.diff(a[..., 0], n=2, axis=axis)
        np.testing.assert_allclose(d2, np.broadcast_to(d2[:, :1, :1], d2.shape), atol=1e-4)
    # Not a constant: the map varies across the image (a global phase alone would leave k-space Hermitian
    # up to a factor).
    assert np.median(np.ptp(a.reshape(50, -1), axis=1)) > 1.0


def test_user_kspace_arrays_load_as_complex(tmp_path):
    path = tmp_path / "mri.npz"
    x = K.kspace(np.random.default_rng(0).random((6, 8, 8, 1)).astype(np.float32))
    np.savez(path, x_train=x, y_train=np.arange(6) % 4, x_test=x[:2], y_test=np.array([0, 1]))
    ds = data.load(f"npz:{path}")
    assert ds.x_train.dtype == np.complex64 and ds.num_classes == 4


@pytest.mark.parametrize("table", run.TABLES)
def test_recipes_parse(table):
    config = load_config(run.config_path(table))
    assert config.cv.model == "complex" and config.model.name == "complex_cnn"
    assert config.model.kwargs.activation == "conjugate_mish" and config.model.kwargs.weight_standardization == "whiten"
    for m in config.cv.models:
        c = load_config(run.config_path(table, m))
        assert c.cv.model == m and c.dataset.startswith(config.base_dataset + "_")
        assert c.model.name == ("complex_cnn" if m in run.COMPLEX_MODELS else "gn_cnn")
        assert c.privacy.delta == 1e-5 and c.privacy.l2_clip_norm == 1.0
        # model_config (what the table runs) equals loading the variant directly
        assert run.config_id(run.model_config(config, m)) == run.config_id(c)
    assert load_config(run.config_path(table, "reim,smoke")).epochs < config.epochs
    assert len({run.config_id(run.model_config(config, m)) for m in config.cv.models}) == len(config.cv.models)


def _row(model, seed, acc, eps=3.0, spent=2.999, evaluated_on="test"):
    return {
        "model": model, "epsilon_target": eps, "seed": seed, "learning_rate": 0.02, "config_id": "x",
        "evaluated_on": evaluated_on, "epsilon_spent": spent, "accuracy": acc,
    }  # fmt: skip


def test_verdict():
    rng = np.random.default_rng(0)

    def rows(complex_acc, control_acc, seeds=5, spent=2.999):
        out = []
        for s in range(seeds):
            out.append(_row("complex", s, complex_acc + 0.01 * rng.normal(), spent=spent))
            out.append(_row("magnitude", s, control_acc + 0.01 * rng.normal()))
            out.append(_row("reim", s, 0.5 + 0.01 * rng.normal()))
        return out

    assert "**reproduced**" in run.verdict_text(rows(0.90, 0.905), 5)  # within the seed spread: matches
    assert "**reproduced**" in run.verdict_text(rows(0.95, 0.90), 5)
    text = run.verdict_text(rows(0.80, 0.90), 5)
    assert "**not reproduced**: beaten beyond the seed spread by real CNN, magnitude image." in text
    assert "complex ≥ it in 5 of 5 seeds" in text  # it beats the (Re, Im) control in every seed
    assert "not testable yet: 3 seed(s)" in run.verdict_text(rows(0.9, 0.9, seeds=3), 5)
    assert "not testable: ε spent differs" in run.verdict_text(rows(0.9, 0.9, spent=2.5), 5)
    # Validation rows never enter the verdict.
    val = [dict(r, evaluated_on="validation") for r in rows(0.5, 0.9)]
    assert run.verdict_text(val + rows(0.95, 0.9), 5).count("**reproduced**") == 1
    # A control of the table with no runs at an ε: not testable there (never "reproduced" against fewer).
    text = run.verdict_text(
        [r for r in rows(0.95, 0.9) if r["model"] != "magnitude"], 5, ["complex", "magnitude", "reim"]
    )
    assert "not testable: no runs of real CNN, magnitude image." in text and "**reproduced**" not in text
    # The complex CNN on the complex image gets a line of its own; it does not decide the verdict.
    image = [dict(r, model="complex_image") for r in rows(0.95, 0.9) if r["model"] == "complex"]
    text = run.verdict_text(rows(0.80, 0.90) + image, 5)
    assert "**not reproduced**" in text and "complex CNN, complex image" in text and "**matches every control**" in text


def test_run_cells_appends_each_row_and_a_rerun_skips_them(tmp_path, monkeypatch):
    """Nothing measured is lost: a row per finished run, a cut-off last line dropped and retrained, and a rerun
    trains only what is missing (the fake run_one stands for training)."""
    trained = []

    def fake_run_one(config, eps, seed, workdir, quiet=True):
        trained.append((config.cv.model, seed))
        return {**run.cell_identity(config, eps, seed), "evaluated_on": "test", "accuracy": 0.5,
                "epsilon_spent": eps, "examples_per_sec": 1.0, "wall_s": 0.0}  # fmt: skip

    monkeypatch.setattr(run, "run_one", fake_run_one)
    config = load_config(run.config_path("digits"))
    cells = [(m, 3.0, s, ()) for s in (0, 1) for m in ("complex", "magnitude")]
    path = str(tmp_path / "t.jsonl")
    run.run_cells(config, cells, path, str(tmp_path))
    assert len(trained) == 4 and len(run.load_rows(path)) == 4
    with open(path, "a") as f:  # a run killed while writing its row
        f.write('{"model": "complex", "seed"')
    lines = pathlib.Path(path).read_text().splitlines()
    # Lose the last complete row too: that run must be trained again.
    pathlib.Path(path).write_text("\n".join(lines[:3] + lines[4:]))
    trained.clear()
    run.run_cells(config, cells, path, str(tmp_path))
    assert trained == [("magnitude", 1)]
    rows = run.load_rows(path)
    assert len(rows) == 4 and all(isinstance(json.loads(x), dict) for x in pathlib.Path(path).read_text().splitlines())
    # Another step size is another run; another recipe (more epochs) is another config_id.
    trained.clear()
    run.run_cells(config, [("complex", 3.0, 0, ("cv.learning_rates.complex=0.05",))], path, str(tmp_path))
    run.run_cells(config, [("complex", 3.0, 0, ("epochs=41",))], path, str(tmp_path))
    assert trained == [("complex", 0), ("complex", 0)]
    assert len(run.current_rows(path, config)) == 5  # the 41-epoch row belongs to another recipe


def test_table_refuses_step_sizes_the_search_did_not_choose(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RESULTS", str(tmp_path))
    config = load_config(run.config_path("digits"))
    with pytest.raises(SystemExit, match="no search on record"):
        run.check_tuned("digits", config)
    tune = run.tune_config("digits")
    assert tune.validation_size == tune.cv.tune_validation_size > 0  # the search never reads the test set
    rows = []
    for m in config.cv.models:
        for lr, acc in ((0.01, 0.5), (0.02, 0.6 if m != "reim" else 0.4)):
            c = run.model_config(tune, m)
            c.optimizer.learning_rate = lr
            rows.append({**run.cell_identity(c, 3.0, 100), "evaluated_on": "validation", "accuracy": acc})
    with open(tmp_path / "digits_tune.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert run.chosen(run.current_rows(str(tmp_path / "digits_tune.jsonl"), tune))["reim"] == 0.01
    for m in config.cv.models:  # what the search chose, but for reim
        config.cv.learning_rates[m] = 0.02
    with pytest.raises(SystemExit, match=r"set cv.learning_rates.reim=0.01 in"):
        run.check_tuned("digits", config)
    config.cv.learning_rates.reim = 0.01
    run.check_tuned("digits", config)  # every step size is the search's: accepted
    run.check_tuned("digits", load_config(run.config_path("digits")), untuned=True)


@pytest.mark.slow  # ~1 min: trains two models of the table for 2 epochs (CI's slow step)
def test_table_cells_train_smoke(tmp_path):
    config = load_config(run.config_path("digits", "smoke"))
    cells = [("complex", 3.0, 0, ()), ("magnitude", 3.0, 0, ())]
    rows = run.run_cells(config, cells, str(tmp_path / "t.jsonl"), str(tmp_path))
    assert [r["model"] for r in rows] == ["complex", "magnitude"]
    for r in rows:
        assert r["epsilon_spent"] <= 3.0 and 0.0 < r["accuracy"] <= 1.0 and r["evaluated_on"] == "test"
    assert rows[0]["complex_parameters"] and not rows[1]["complex_parameters"]
    assert rows[0]["num_reals"] == 11130 and rows[1]["num_reals"] == 6186
    assert "complex CNN, k-space" in run.table_text(rows)


@pytest.mark.slow  # ~1 min: compiles every model's private and non-private step (CI's slow step)
def test_bench_and_profile_smoke():
    from experiments.complex_valued import bench

    rows = bench.measure("digits", batch=8, rounds=1)  # asserts the 'before' model computes the same logits
    names = [r["model"] for r in rows]
    assert {"complex", "complex (before)", "magnitude", "reim_wide"} <= set(names)
    assert all(r["private_ex_s"] > 0 and r["nonprivate_ex_s"] > 0 for r in rows)
    assert next(r for r in rows if r["model"] == "magnitude")["private_vs_magnitude"] == 1.0
    assert len(bench.profile("digits", batch=8, rounds=1)) == 5
