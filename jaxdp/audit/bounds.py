"""The one-run lower bound on ε (Steinke, Nasr & Jagielski 2023, arXiv:2305.08846).

m canaries, each included independently with probability 1/2; the auditor makes
r guesses from the released output (:mod:`jaxdp.audit.guesses`). If the
mechanism is (ε, δ)-DP in each canary, the number W of correct guesses satisfies
(their Theorem 3 and Algorithm 2 / appendix code)

    P[W >= v] <= P[Bin(r, p) >= v] + 2 m δ · max_{i=1..v} P[v - i <= Bin(r, p) < v] / i,
    p = e^ε / (1 + e^ε);

:func:`one_run_p_value` computes the right-hand side,
:func:`one_run_epsilon_lower_bound` the largest ε it rejects, and
:func:`epsilon_lower_bound` applies it to scores on a fixed grid of guess counts
(Bonferroni). See :mod:`jaxdp.audit` for what the bound can and cannot show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special, stats

from jaxdp import rules
from jaxdp.audit.guesses import check_confidence, check_counts, check_statistic_delta, guess_counts_and_correct

__all__ = [
    "DEFAULT_GUESS_FRACTIONS",
    "AuditBound",
    "epsilon_lower_bound",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]

#: Fractions of the canaries that are guessed (half "in" from the top, half "out"
#: from the bottom); fixed in advance, the bound is Bonferroni-corrected over them.
DEFAULT_GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.4, 0.8)

_EPS_MAX = 100.0  # logistic(100) = 1 - 4e-44: no run can certify more


def one_run_p_value(*, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """Largest probability of ``num_correct`` or more correct guesses under (ε, δ)-DP.

    The one-run bound of Steinke, Nasr & Jagielski (2023): with m canaries each
    included with probability 1/2 and r guesses (abstaining on the rest), an
    (ε, δ)-DP mechanism allows

        P[W >= v] <= P[Bin(r, p) >= v] + 2 m δ · max_{1<=i<=v} P[v - i <= Bin(r, p) < v] / i,

    with p = e^ε / (1 + e^ε). With δ = 0 it is the binomial tail (guessing is no
    better than randomised response with ε).

    Args:
      num_canaries: m, canaries randomised (including those not guessed).
      num_guesses: r <= m, guesses made.
      num_correct: v <= r, guesses that were right.
      epsilon: ε >= 0 (finite) of the null hypothesis.
      delta: δ of the null hypothesis: 0, or in (0, 1) (:func:`jaxdp.rules.check_delta`).

    Returns:
      The p-value, in [0, 1].

    Example:
      >>> round(one_run_p_value(num_canaries=10, num_guesses=10, num_correct=10, epsilon=0.0, delta=0.0), 6)
      0.000977
    """
    m, r, v = check_counts(num_canaries, num_guesses, num_correct)
    eps = rules.positive_finite("epsilon", epsilon, allow_zero=True)
    delta = check_statistic_delta(delta)
    if v == 0:
        return 1.0
    p = float(special.expit(eps))
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Bin(r, p) >= v]
    if delta == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    # P[v - i <= Bin < v] = cdf(v - 1) - cdf(v - 1 - i)
    window = stats.binom.cdf(v - 1, r, p) - stats.binom.cdf(v - 1 - i, r, p)
    alpha = float(np.max(window / i))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(
    *, num_canaries: int, num_guesses: int, num_correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest ε that ``num_correct`` of ``num_guesses`` rejects at ``confidence``.

    Returns ε_lb >= 0 with :func:`one_run_p_value` (ε_lb) <= 1 − confidence, found
    by bisection to 1e-6 (the returned point always satisfies the inequality; a
    mechanism that is not (ε_lb, δ)-DP is not (ε', δ)-DP for any ε' < ε_lb
    either). 0 when even ε = 0 is not rejected.

    Example (all guesses right, δ = 0: the bound solves p^r = β):
      >>> round(one_run_epsilon_lower_bound(num_canaries=100, num_guesses=100, num_correct=100, delta=0.0), 3)
      3.493
    """
    m, r, v = check_counts(num_canaries, num_guesses, num_correct)
    beta = 1.0 - check_confidence(confidence)
    delta = check_statistic_delta(delta)

    def rejected(eps: float) -> bool:
        return one_run_p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps, delta=delta) <= beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > _EPS_MAX:
            return lo
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


@dataclasses.dataclass(frozen=True)
class AuditBound:
    """The empirical lower bound and how it was obtained.

    Attributes:
      epsilon: the lower bound on ε (at ``delta``) holding with ``confidence``.
      confidence: 1 − β.
      delta: δ of the claim that was tested.
      num_canaries: m.
      num_guesses: r of the guess count that gave the bound (0: no bound > 0).
      num_correct: how many of those guesses were right.
      guess_counts: every guess count tried (the Bonferroni grid).
    """

    epsilon: float
    confidence: float
    delta: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    guess_counts: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def epsilon_lower_bound(
    scores: Any,
    included: Any,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> AuditBound:
    """One-run lower bound on ε from membership scores of randomly included canaries.

    For each fraction f in ``guess_fractions`` (fixed before seeing the scores),
    guess "in" for the ``k = round(f m / 2)`` highest scores and "out" for the k
    lowest (:func:`jaxdp.audit.guesses.guess_counts_and_correct`), count the
    correct guesses and compute :func:`one_run_epsilon_lower_bound` at confidence
    ``1 − β / len(guess_fractions)``; report the largest. By the union bound, the
    reported bound exceeds the true ε with probability at most β = 1 − ``confidence``.

    Ties are broken by canary index (never by membership), so the guesses depend
    on the released output only, as the theorem requires.

    Args:
      scores: ``(m,)`` membership scores; higher means "more likely included".
      included: ``(m,)`` bools, the secret coin flips (each must have been
        drawn with probability 1/2, independently of everything else).
      delta: δ of the claim under test (the run's δ).
      confidence: 1 − β, e.g. 0.95.
      guess_fractions: fractions of m to guess, each in (0, 1].

    Returns:
      An :class:`AuditBound`.

    Example:
      >>> import numpy as np
      >>> inc = np.arange(200) % 2 == 0
      >>> epsilon_lower_bound(inc.astype(float), inc, delta=0.0).epsilon > 3  # perfect separation
      True
    """
    confidence = check_confidence(confidence)
    delta = check_statistic_delta(delta)
    m, tried = guess_counts_and_correct(scores, included, guess_fractions)
    level = 1.0 - (1.0 - confidence) / len(tried)
    best = AuditBound(0.0, confidence, delta, m, 0, 0, tuple(r for r, _ in tried))
    for r, correct in tried:
        eps = one_run_epsilon_lower_bound(
            num_canaries=m, num_guesses=r, num_correct=correct, delta=delta, confidence=level
        )
        if eps > best.epsilon:
            best = dataclasses.replace(best, epsilon=eps, num_guesses=r, num_correct=correct)
    return best
