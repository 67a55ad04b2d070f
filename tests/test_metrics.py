"""Uncertainty metrics against hand-computed values."""

import math

import numpy as np
import pytest

from jaxdp import metrics


def test_ece_hand_computed_case():
    # 4 examples, 2 classes, 5 bins of width 0.2.
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45], [0.15, 0.85]])
    labels = np.array([0, 0, 0, 1])
    # confidences 0.9 (bin 4, correct), 0.7 (bin 3, wrong), 0.55 (bin 2, correct), 0.85 (bin 4, correct)
    # bin 2: |1 - 0.55| = 0.45, n=1; bin 3: |0 - 0.7| = 0.7, n=1; bin 4: |1 - 0.875| = 0.125, n=2
    expected = (0.45 + 0.7 + 2 * 0.125) / 4
    assert metrics.expected_calibration_error(probs, labels, num_bins=5) == pytest.approx(expected, abs=1e-12)
    bins = metrics.reliability_bins(probs, labels, num_bins=5)
    np.testing.assert_array_equal(bins.count, [0, 0, 1, 1, 2])


def test_perfectly_calibrated_predictions_have_ece_near_zero():
    rng = np.random.default_rng(0)
    n = 200_000
    conf = rng.uniform(0.5, 1.0, n)
    # The predicted class is right with probability exactly equal to the confidence.
    labels = (rng.uniform(size=n) >= conf).astype(np.int64)  # class 0 predicted; correct w.p. conf
    probs = np.stack([conf, 1 - conf], axis=1)
    assert metrics.expected_calibration_error(probs, labels) < 0.01
    # An overconfident model on the same labels is clearly miscalibrated.
    sharp = np.stack([np.minimum(conf + 0.2, 1.0), 1 - np.minimum(conf + 0.2, 1.0)], axis=1)
    assert metrics.expected_calibration_error(sharp, labels) > 0.1


def test_nll_brier_accuracy_closed_form():
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    labels = np.array([0, 2])
    assert metrics.accuracy(probs, labels) == 0.5
    assert metrics.nll(probs, labels) == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2)
    brier = ((0.5**2 + 0.25**2 + 0.25**2) + (0.1**2 + 0.8**2 + 0.9**2)) / 2
    assert metrics.brier_score(probs, labels) == pytest.approx(brier)
    assert set(metrics.uncertainty_metrics(probs, labels)) == {"accuracy", "nll", "brier", "ece", "overconfidence"}
    # Mean confidence (0.5 + 0.8) / 2 minus accuracy 0.5.
    assert metrics.overconfidence(probs, labels) == pytest.approx(0.15)


def test_temperature_scaling_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=4.0, size=(20_000, 5))
    for true_t in (0.5, 2.5):
        # Labels drawn from softmax(logits / T): the NLL-optimal temperature is T (up to sampling error).
        p = metrics.softmax(logits, true_t)
        labels = (rng.uniform(size=(len(p), 1)) > np.cumsum(p, axis=1)).sum(axis=1)
        fitted = metrics.fit_temperature(logits, labels)
        assert fitted == pytest.approx(true_t, rel=0.05)
        # And fitting lowers the NLL and the ECE against the raw (T = 1) logits.
        raw, scaled = metrics.softmax(logits), metrics.softmax(logits, fitted)
        assert metrics.nll(scaled, labels) < metrics.nll(raw, labels)
        assert metrics.expected_calibration_error(scaled, labels) < metrics.expected_calibration_error(raw, labels)
    with pytest.raises(ValueError, match="sits at a bound"):
        metrics.fit_temperature(logits, labels, bounds=(0.05, 1.0))
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    # softmax is stable for huge logits.
    np.testing.assert_allclose(metrics.softmax(np.array([[1000.0, 0.0]])), [[1.0, 0.0]])


def test_reliability_diagram_png(tmp_path):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    path = metrics.reliability_diagram(probs, rng.integers(0, 10, 500), str(tmp_path / "rel.png"), title="test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.ones((3, 2)), np.zeros(3, int), "probabilities"),
        (np.full((3, 2), 0.5), np.zeros(4, int), "shape"),
        (np.full((3, 2), 0.5), np.array([0, 1, 2]), "labels must be integers in 0..1"),
    ],
)
def test_bad_input(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.expected_calibration_error(probs, labels)


def test_reliability_diagram_labels_and_shades_each_bin_by_its_count(tmp_path):
    """A bin of one example (accuracy 0 or 1 by chance) looked as alarming as a full one: every non-empty bar
    now carries its count, is shaded by it, and the title gives the total n."""
    import matplotlib.pyplot as plt

    # 99 confident correct examples in bin (0.9, 1.0], one unsure wrong example in bin (0.5, 0.6].
    probs = np.array([[0.95, 0.05]] * 99 + [[0.55, 0.45]])
    labels = np.array([0] * 99 + [1])
    fig = metrics.reliability_figure(probs, labels, num_bins=10, title="t")
    (ax,) = fig.axes
    bins = metrics.reliability_bins(probs, labels, num_bins=10)
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{n:,}" for n in bins.count if n > 0) == ["1", "99"]
    assert "n=100" in ax.get_title() and "ECE=" in ax.get_title()
    by_x = {round(t.get_position()[0], 3): t.get_text() for t in ax.texts}
    assert by_x == {0.55: "1", 0.95: "99"}
    # The accuracy bar of the lone example is paler than the full bin's (its accuracy is 0, so its bar is flat).
    alphas = {round(p.get_x() + p.get_width() / 2, 3): p.get_alpha() for p in ax.patches if p.get_facecolor()[2] > 0.6}
    assert alphas[0.55] < alphas[0.95] == 1.0
    plt.close(fig)
    path = metrics.reliability_diagram(probs, labels, str(tmp_path / "rel.png"), num_bins=10)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
