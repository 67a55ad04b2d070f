"""Classification and uncertainty metrics: accuracy, NLL, Brier score, ECE, reliability diagrams.

All take predicted class probabilities ``probs`` of shape ``(n, classes)`` and
integer labels ``labels`` of shape ``(n,)`` (NumPy or JAX arrays) and return
Python floats. They are host-side bookkeeping: cheap, exact, float64.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "ReliabilityBins",
    "accuracy",
    "brier_score",
    "expected_calibration_error",
    "nll",
    "reliability_bins",
    "reliability_diagram",
    "uncertainty_metrics",
]


def _check(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(
            f"probs has shape {p.shape} and labels {y.shape}; expected probs (n, classes) and labels (n,)."
        )
    if p.shape[0] == 0:
        raise ValueError("probs and labels are empty: there is nothing to measure.")
    if np.any(p < -1e-6) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(
            "probs must be probabilities (non-negative, rows summing to 1); apply softmax to logits first."
        )
    if not np.issubdtype(y.dtype, np.integer) or np.any(y < 0) or np.any(y >= p.shape[1]):
        raise ValueError(f"labels must be integers in 0..{p.shape[1] - 1}.")
    return p, y.astype(np.int64)


def accuracy(probs, labels) -> float:
    """Fraction of examples whose most probable class is the label."""
    p, y = _check(probs, labels)
    return float(np.mean(np.argmax(p, axis=1) == y))


def nll(probs, labels, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels (probabilities floored at ``eps``)."""
    p, y = _check(probs, labels)
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], eps))))


def brier_score(probs, labels) -> float:
    """Mean over examples of the squared distance between ``probs`` and the one-hot label (sum over classes)."""
    p, y = _check(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


class ReliabilityBins(NamedTuple):
    """Per-bin confidence, accuracy and count over equal-width confidence bins."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability_bins(probs, labels, num_bins: int = 15) -> ReliabilityBins:
    """Bin examples by confidence (max probability) into ``num_bins`` equal-width bins of [0, 1].

    Bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0
    goes to the first bin. Empty bins report confidence = accuracy = 0.
    """
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins={num_bins!r} must be a positive int (default 15).")
    p, y = _check(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
    count = np.bincount(idx, minlength=num_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, np.bincount(idx, conf, num_bins) / count, 0.0)
        mean_acc = np.where(count > 0, np.bincount(idx, correct, num_bins) / count, 0.0)
    return ReliabilityBins(edges, mean_conf, mean_acc, count.astype(np.int64))


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
    """ECE: Σ_b (n_b / n) · |accuracy_b − confidence_b| over equal-width confidence bins."""
    bins = reliability_bins(probs, labels, num_bins)
    n = bins.count.sum()
    return float(np.sum(bins.count / n * np.abs(bins.accuracy - bins.confidence)))


def uncertainty_metrics(probs, labels, num_bins: int = 15) -> dict:
    """``{"accuracy", "nll", "brier", "ece"}`` in one call."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier_score(probs, labels),
        "ece": expected_calibration_error(probs, labels, num_bins),
    }


def reliability_diagram(probs, labels, path: str, *, num_bins: int = 15, title: str = "") -> str:
    """Write a reliability diagram (accuracy vs confidence per bin, with the ECE) as a PNG.

    Needs matplotlib (installed with jaxdp). Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = reliability_bins(probs, labels, num_bins)
    ece = expected_calibration_error(probs, labels, num_bins)
    width = 1.0 / num_bins
    centers = bins.edges[:-1] + width / 2
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.bar(centers, bins.accuracy, width=width * 0.95, color="#4c72b0", edgecolor="black", label="accuracy")
    gap = bins.confidence - bins.accuracy
    shown = bins.count > 0
    ax.bar(
        centers[shown],
        gap[shown],
        bottom=bins.accuracy[shown],
        width=width * 0.95,
        color="#dd8452",
        alpha=0.5,
        edgecolor="#dd8452",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}  ECE={ece:.3f}".strip())
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
