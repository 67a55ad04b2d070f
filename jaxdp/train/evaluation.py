"""Accuracy of public parameters on held-out data (post-processing: costs no privacy)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["evaluate"]


def evaluate(
    predict: Callable[[Any, np.ndarray], Any], params: Any, x: np.ndarray, y: np.ndarray, batch: int = 1024
) -> float:
    """Fraction of ``predict(params, x_batch) == y`` over ``x``, in batches of one shape.

    ``predict(params, x) -> labels`` is typically jitted; the last batch is padded
    to ``batch`` examples (when there are more than ``batch``) so it compiles once.
    """
    if len(x) == 0:
        raise ValueError("evaluate: x has no examples; pass a non-empty evaluation set.")
    if len(x) != len(y):
        raise ValueError(f"evaluate: x has {len(x)} examples but y has {len(y)} labels; pass matching arrays.")
    correct = 0
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        n = len(xb)
        if n < batch and len(x) > batch:  # keep one shape: pad the last batch
            xb = np.concatenate([xb, np.zeros((batch - n,) + xb.shape[1:], xb.dtype)])
        pred = np.asarray(predict(params, xb))[:n]
        correct += int(np.sum(pred == y[start : start + n]))
    return correct / len(x)
