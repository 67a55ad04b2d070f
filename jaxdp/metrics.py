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
    "fit_temperature",
    "nll",
    "overconfidence",
    "reliability_bins",
    "reliability_diagram",
    "reliability_figure",
    "softmax",
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


def overconfidence(probs, labels) -> float:
    """Mean top-label confidence minus accuracy: > 0 over-confident, < 0 under-confident."""
    p, y = _check(probs, labels)
    return float(p.max(axis=1).mean() - np.mean(p.argmax(axis=1) == y))


def uncertainty_metrics(probs, labels, num_bins: int = 15) -> dict:
    """``{"accuracy", "nll", "brier", "ece", "overconfidence"}`` in one call."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier_score(probs, labels),
        "ece": expected_calibration_error(probs, labels, num_bins),
        "overconfidence": overconfidence(probs, labels),
    }


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` in float64, row-wise, stable for large logits."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits, labels, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of ``softmax(logits / T)``.

    Fit it on held-out data (a validation split of the training set), never on the test set. The NLL is
    convex in 1/T, so a bounded 1-D search over log T finds the optimum; a T at a bound means the
    bound is too tight (the error says so).
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[0] == 0:
        raise ValueError(f"logits has shape {z.shape} and labels {y.shape}; expected (n, classes) and (n,), n > 0.")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits has NaN or inf entries; temperature scaling needs finite logits.")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds={bounds!r} must satisfy 0 < low < high.")
    from scipy.optimize import minimize_scalar

    def loss(log_t):
        zt = z / np.exp(log_t)
        zt = zt - zt.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(zt).sum(axis=1)) - zt[np.arange(len(y)), y]))

    res = minimize_scalar(loss, bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-6})
    t = float(np.exp(res.x))
    if min(abs(res.x - np.log(lo)), abs(res.x - np.log(hi))) < 1e-3:
        raise ValueError(f"the fitted temperature {t:.4g} sits at a bound of {bounds!r}; widen bounds.")
    return t


def reliability_figure(probs, labels, *, num_bins: int = 15, title: str = ""):
    """The reliability diagram as a matplotlib ``Figure``: accuracy vs confidence per bin, with the ECE.

    Every non-empty bin is labelled with its number of examples and shaded by it (pale = few), so that a
    bin of one or two examples, whose accuracy is 0 or 1 by chance, does not look like a calibration
    failure; the title gives the ECE and the total n. Needs matplotlib (installed with jaxdp).

    Example:
      >>> fig = reliability_figure(probs, labels, num_bins=10)  # doctest: +SKIP
      >>> [t.get_text() for t in fig.axes[0].texts]  # the count of each non-empty bin  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = reliability_bins(probs, labels, num_bins)
    ece = expected_calibration_error(probs, labels, num_bins)
    width = 1.0 / num_bins
    centers = bins.edges[:-1] + width / 2
    shown = bins.count > 0
    # Shade by the bin's share of the largest bin: alpha from 0.2 (a lone example) to 1 (the fullest bin).
    shade = 0.2 + 0.8 * bins.count / bins.count.max()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    for i in np.flatnonzero(shown):
        ax.bar(
            centers[i],
            bins.accuracy[i],
            width=width * 0.95,
            color="#4c72b0",
            alpha=min(1.0, float(shade[i])),  # 0.2 + 0.8 * 1 can round to 1.0000000000000002
            edgecolor="black",
            label="accuracy (shade: examples in bin)" if i == np.flatnonzero(shown)[0] else None,
        )
    gap = bins.confidence - bins.accuracy
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
    for i in np.flatnonzero(shown):  # the count of every non-empty bin, just above its bars
        top = max(bins.accuracy[i], bins.confidence[i])
        ax.text(
            centers[i],
            min(top + 0.015, 0.98),
            f"{bins.count[i]:,}",
            ha="center",
            va="bottom" if top < 0.9 else "top",
            fontsize=6 if num_bins > 10 else 8,
            rotation=90 if num_bins > 10 else 0,
        )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (numbers: examples per bin)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}  ECE={ece:.3f}  n={int(bins.count.sum()):,}".strip())
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_diagram(probs, labels, path: str, *, num_bins: int = 15, title: str = "") -> str:
    """Write :func:`reliability_figure` (accuracy vs confidence per bin, each bin labelled with its
    number of examples, with the ECE) as a PNG. Returns ``path``."""
    import matplotlib.pyplot as plt

    fig = reliability_figure(probs, labels, num_bins=num_bins, title=title)
    fig.savefig(path)
    plt.close(fig)
    return path
