"""The guesses both one-run tests make from canary scores, and the checks of their inputs.

Both tests (:mod:`jaxdp.audit.bounds`, :mod:`jaxdp.audit.fdp`) turn m scores
into guesses the same way: for a fraction f of the canaries fixed before the
scores are seen, guess "in" for the k = round(f m / 2) highest scores and "out"
for the k lowest, abstain on the rest (r = 2k guesses). Ties are broken by
canary index, never by membership, so the guesses are a function of the
released output only, as both theorems require. :func:`guess_counts_and_correct`
makes them and counts the correct ones; the ``check_*`` functions are the input
rules shared by the statistics (one function, one message each; δ > 0 and ε go
through :mod:`jaxdp.rules`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxdp import rules

__all__ = ["check_confidence", "check_counts", "check_statistic_delta", "guess_counts_and_correct"]


def check_counts(num_canaries: Any, num_guesses: Any, num_correct: Any) -> tuple[int, int, int]:
    """``(m, r, v)`` as ints, each >= 0 with ``v <= r <= m``; a ValueError naming the argument otherwise."""
    for name, value in (("num_canaries", num_canaries), ("num_guesses", num_guesses), ("num_correct", num_correct)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}={value!r} must be an int >= 0.")
    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    if not v <= r <= m:
        raise ValueError(
            f"need num_correct <= num_guesses <= num_canaries, got num_correct={v}, num_guesses={r}, "
            f"num_canaries={m}: you cannot guess more canaries than there are, nor be right more often than you guess."
        )
    return m, r, v


def check_confidence(confidence: Any, name: str = "confidence") -> float:
    """1 − β: a number in (0, 1); ``name`` is what the caller knows it by (``"--confidence"`` for the CLI)."""
    try:
        c = float(confidence)
    except (TypeError, ValueError):
        c = float("nan")
    if not 0 < c < 1:  # also refuses NaN
        raise ValueError(f"{name}={confidence!r} must lie in (0, 1), e.g. 0.95.")
    return c


def check_statistic_delta(delta: Any) -> float:
    """δ of the null hypothesis a statistic tests: exactly 0 (pure ε-DP), or :func:`jaxdp.rules.check_delta`.

    δ = 0 is a legitimate hypothesis for the statistics (their δ-free case);
    any other δ obeys jaxdp's one δ rule. There is no dataset here (m canaries
    are not N), so only δ ∈ (0, 1) is checked; :func:`jaxdp.audit.audit_training_run`
    checks the run's δ against its dataset size.
    """
    if isinstance(delta, (int, float, np.integer, np.floating)) and not isinstance(delta, bool) and delta == 0:
        return 0.0
    return rules.check_delta(delta)


def guess_counts_and_correct(
    scores: Any, included: Any, guess_fractions: Sequence[float]
) -> tuple[int, list[tuple[int, int]]]:
    """``(m, [(r, v), ...])``: per guess count r = 2k (top k "in", bottom k "out"), the correct guesses v.

    One entry per distinct k = min(m // 2, max(1, round(f m / 2))) over the
    fractions f, ascending. Ties in ``scores`` are broken by index (a stable
    sort), never by ``included``.

    Args:
      scores: ``(m,)`` finite membership scores; higher means "more likely included".
      included: ``(m,)`` bools, the secret coin flips.
      guess_fractions: fractions of m to guess, each in (0, 1].

    Example:
      >>> import numpy as np
      >>> guess_counts_and_correct(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 0, 1, 0]), (0.5, 1.0))
      (4, [(2, 2), (4, 2)])
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included)
    if s.ndim != 1 or inc.shape != s.shape:
        raise ValueError(
            f"scores (shape {s.shape}) and included (shape {inc.shape}) must be 1-D and of the same length m: "
            "one score and one membership bit per canary."
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf; every canary needs a finite score.")
    inc = inc.astype(bool)
    m = len(s)
    fractions = tuple(float(f) for f in guess_fractions)
    if not fractions or any(not (0 < f <= 1) for f in fractions):
        raise ValueError(f"guess_fractions={guess_fractions!r} must be a non-empty list of numbers in (0, 1].")
    if m < 2:
        raise ValueError(f"got {m} canaries; an audit needs at least 2 (hundreds to bound epsilon usefully).")
    counts = sorted({min(m // 2, max(1, round(f * m / 2))) for f in fractions})
    # Descending by score; ties by index (a stable sort of -score): independent of membership.
    order = np.argsort(-s, kind="stable")
    return m, [(2 * k, int(inc[order[:k]].sum() + (~inc[order[m - k :]]).sum())) for k in counts]
