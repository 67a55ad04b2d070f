"""Empirical privacy auditing: canaries in one training run -> a lower bound on ε and an f-DP test.

An accountant gives an *upper* bound on ε for the mechanism it is told about. An
audit checks the code that really runs: it hides canaries in the training data,
trains once, scores how visible each canary is in what training released, and
turns the scores into a *lower* bound on ε that holds with a stated confidence.
If the lower bound exceeds the accountant's ε, the implementation leaks more than
it claims (noise or clipping broken, a wrong sampling rate, ...).

The statistic is one-run auditing (Steinke, Nasr & Jagielski 2023, "Privacy
Auditing with One (1) Training Run", NeurIPS; arXiv:2305.08846):

* m canaries, each included independently with probability 1/2 (S_i in {in, out});
* after training, the auditor guesses "in" for the k highest scores and "out"
  for the k lowest, and abstains on the rest (r = 2k guesses, a function of the
  released output only);
* if the mechanism is (ε, δ)-DP in each canary, the number W of correct guesses
  satisfies (their Theorem 3 and Algorithm 2 / appendix code)

      P[W >= v] <= P[Bin(r, p) >= v] + 2 m δ · max_{i=1..v} P[v - i <= Bin(r, p) < v] / i,
      p = e^ε / (1 + e^ε);

* the lower bound is the largest ε whose p-value is still <= β = 1 − confidence:
  with probability >= 1 − β, the mechanism is not (ε', δ)-DP for any ε' below it.

Several guess counts k are tried (a grid fixed before looking at the scores) and
the best bound is reported; each is tested at β / (grid size) so the maximum is
still valid at confidence 1 − β (Bonferroni).

What it can and cannot show: it is a lower bound. A correct mechanism gives a
lower bound below its ε. Even perfect guesses certify only about
ln(r / ln(G/β)) with r guesses and G grid points, and the δ term caps it further
(measured with the default grid, β = 0.05, δ = 1e-5: 2.8 for m = 100, 3.9 for
300, 5.1 for 1000, 6.0 for 3000, 6.4 for 10000), so claims above that cannot be
falsified by one run; for a correct DP-SGD run the bound is loose (far below the
accountant's ε). Passing an audit does not prove privacy; failing one shows the
mechanism is not (ε, δ)-DP for the claimed ε, with confidence 1 − β.

The (ε, δ) test sees one point of the privacy curve, so it misses mechanisms that
keep that point but are weaker elsewhere: σ/2 against a claim of ε = 3 (true ε ≈ 6.9)
passes it. The second test, one-run f-DP auditing (Mahloujifar, Melis & Chaudhuri
2024, "Auditing f-Differential Privacy in One Run", arXiv:2410.22235), tests the same
guesses against the claimed mechanism's whole trade-off curve f (from the PLD of the
plan's subsampled Gaussian: :class:`TradeoffCurve`): :func:`fdp_p_value` bounds
P[W >= v] for every mechanism that is f-DP in each canary (no independence between
canaries assumed; the argument is in its docstring), :func:`fdp_audit` applies it on
its own fixed grid of guess counts (Bonferroni), and :func:`noise_ratio_bound` reports the largest violation
it certifies as a fraction of the claimed noise (ρ < 1: "leaks at least as much as the
claimed mechanism with ρσ"). ``jaxdp audit`` runs both tests and fails when either does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from scipy import special, stats

from jaxdp import keys
from jaxdp.accounting import PldAccountant, check_delta
from jaxdp.config import ConfigError
from jaxdp.plan import PrivacyPlan, steps_per_epoch
from jaxdp.train import TrainState, make_private_step

__all__ = [
    "AUDIT_TESTS",
    "SABOTAGES",
    "AuditBound",
    "AuditResult",
    "FdpAuditResult",
    "TradeoffCurve",
    "audit_config",
    "audit_training_run",
    "epsilon_lower_bound",
    "fdp_audit",
    "fdp_p_value",
    "noise_ratio_bound",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]

#: Fractions of the canaries that are guessed (half "in" from the top, half "out"
#: from the bottom); fixed in advance, the bound is Bonferroni-corrected over them.
DEFAULT_GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.4, 0.8)
#: The f-DP test's grid, also fixed in advance: fewer points pay less Bonferroni. Chosen by
#: simulating the digits recipe's σ/2 canary scores (power about 0.75-0.8 with the grid
#: above, 0.92-0.96 with this one, 100-150 simulated runs); any fixed grid keeps the test valid.
DEFAULT_FDP_GUESS_FRACTIONS = (0.15, 0.3)

_EPS_MAX = 100.0  # logistic(100) = 1 - 4e-44: no run can certify more


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> tuple[int, int, int]:
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


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not (math.isfinite(d) and 0 <= d < 1):
        raise ValueError(f"delta={delta!r} must lie in [0, 1) (the delta of the (epsilon, delta) claim, e.g. 1e-5).")
    return d


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not (math.isfinite(c) and 0 < c < 1):
        raise ValueError(f"confidence={confidence!r} must lie in (0, 1), e.g. 0.95.")
    return c


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
      epsilon: ε >= 0 of the null hypothesis.
      delta: δ in [0, 1) of the null hypothesis.

    Returns:
      The p-value, in [0, 1].

    Example:
      >>> round(one_run_p_value(num_canaries=10, num_guesses=10, num_correct=10, epsilon=0.0, delta=0.0), 6)
      0.000977
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    eps = float(epsilon)
    if not (eps >= 0):  # also catches NaN
        raise ValueError(f"epsilon={epsilon!r} must be >= 0.")
    delta = _check_delta(delta)
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
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    beta = 1.0 - _check_confidence(confidence)
    delta = _check_delta(delta)

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
    lowest, count the correct guesses and compute
    :func:`one_run_epsilon_lower_bound` at confidence ``1 − β / len(guess_fractions)``;
    report the largest. By the union bound, the reported bound exceeds the true ε
    with probability at most β = 1 − ``confidence``.

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
    confidence = _check_confidence(confidence)
    delta = _check_delta(delta)
    m, tried = _guess_counts_and_correct(scores, included, guess_fractions)
    level = 1.0 - (1.0 - confidence) / len(tried)
    best = AuditBound(0.0, confidence, delta, m, 0, 0, tuple(r for r, _ in tried))
    for r, correct in tried:
        eps = one_run_epsilon_lower_bound(
            num_canaries=m, num_guesses=r, num_correct=correct, delta=delta, confidence=level
        )
        if eps > best.epsilon:
            best = dataclasses.replace(best, epsilon=eps, num_guesses=r, num_correct=correct)
    return best


# -- f-DP one-run audit: the claimed mechanism's whole trade-off curve -------------

#: Largest ε of a privacy-profile line used on the "most guesses wrong" side of the
#: blow-up inverse (its lines need e^ε (1 − r), which loses all precision for larger ε).
_EPS_LINE_MAX = 30.0
#: The search range of :func:`noise_ratio_bound` (σ' / σ) and its relative resolution.
_RATIO_RANGE = (1.0 / 8.0, 8.0)
_RATIO_RTOL = 0.02


class TradeoffCurve:
    """A lower bound f on a mechanism's trade-off curve, from (ε, δ(ε)) pairs of its privacy profile.

    A mechanism that is (ε_j, δ_j)-DP for every j (in both directions, add and
    remove) is f-DP for (Dong, Roth & Su 2022, Prop. 2.12)

        f(α) = max(0, max_j 1 − δ_j − e^{ε_j} α, max_j e^{−ε_j} (1 − δ_j − α)).

    Fewer pairs, or δ_j larger than the true δ(ε_j), give a smaller f: a weaker
    claim, which can only make the f-DP audit more conservative. So a finite ε
    grid and dp-accounting's pessimistic PLD discretisation keep the audit valid.

    The audit uses the *blow-up inverse* ``g⁻¹(r) = inf{h : 1 − f(h) >= r}``
    (how much probability the "wrong" world must give an event that the
    "right" world gives probability r):

        g⁻¹(r) = max(0, max_j e^{−ε_j} (r − δ_j), max_j 1 − δ_j − e^{ε_j} (1 − r)).

    It is evaluated with the lines that attain the maximum somewhere on a dense
    grid of r (a subset of the lines: again a weaker, still valid curve), and
    with ε_j <= 30 on the second family (double precision).

    Args:
      epsilons: ε_j >= 0, finite.
      deltas: δ_j in [0, 1], one per ε_j.
      name: how reports name the curve.

    Example:
      >>> curve = TradeoffCurve.gaussian(1.0)
      >>> round(float(curve(0.05)), 3)  # G_1(0.05) = Φ(Φ⁻¹(0.95) − 1) = 0.74
      0.74
    """

    def __init__(self, epsilons: Any, deltas: Any, *, name: str = "custom"):
        eps = np.atleast_1d(np.asarray(epsilons, dtype=np.float64))
        dlt = np.atleast_1d(np.asarray(deltas, dtype=np.float64))
        if eps.ndim != 1 or eps.shape != dlt.shape or eps.size == 0:
            raise ValueError(
                f"epsilons (shape {eps.shape}) and deltas (shape {dlt.shape}) must be non-empty 1-D arrays of the "
                "same length: one delta(epsilon) per epsilon of the privacy profile."
            )
        if not (np.all(np.isfinite(eps)) and np.all(eps >= 0)):
            raise ValueError("epsilons must be finite and >= 0 (the profile's epsilon grid).")
        if not (np.all(np.isfinite(dlt)) and np.all((dlt >= 0) & (dlt <= 1))):
            raise ValueError("deltas must lie in [0, 1] (delta(epsilon) of the privacy profile).")
        self.epsilons, self.deltas, self.name = eps, dlt, str(name)
        # Blow-up inverse lines: family a(r) = e^{-ε}(r - δ), family b(r) = 1 - δ - e^{ε}(1 - r).
        b_ok = eps <= _EPS_LINE_MAX
        a_slope, a_delta = np.exp(-eps), dlt
        b_scale, b_delta = np.exp(eps[b_ok]), dlt[b_ok]
        grid = np.unique(
            np.concatenate([np.geomspace(1e-15, 1, 1500), 1 - np.geomspace(1e-15, 1, 1500), np.linspace(0, 1, 1001)])
        )
        keep_a, keep_b = set(), set()
        for chunk in np.array_split(grid, max(1, grid.size // 256)):
            a = a_slope * (chunk[:, None] - a_delta)
            keep_a.update(np.unique(np.argmax(a, axis=1)).tolist())
            if b_scale.size:
                b = 1 - b_delta - b_scale * (1 - chunk[:, None])
                keep_b.update(np.unique(np.argmax(b, axis=1)).tolist())
        ia, ib = np.array(sorted(keep_a), dtype=int), np.array(sorted(keep_b), dtype=int)
        self._a_slope, self._a_delta = a_slope[ia], a_delta[ia]
        self._b_scale, self._b_delta = b_scale[ib], b_delta[ib]

    def __repr__(self) -> str:
        return f"TradeoffCurve({self.name}, {self.epsilons.size} profile points)"

    def __call__(self, alpha: Any) -> np.ndarray:
        """f(α): the least type II error of any test with type I error α."""
        a = np.asarray(alpha, dtype=np.float64)[..., None]
        e, d = self.epsilons, self.deltas
        first = np.max(1 - d - np.exp(e) * a, axis=-1)
        second = np.max(np.exp(-e) * (1 - d - a), axis=-1)
        return np.maximum(0.0, np.maximum(first, second))

    def blowup_inverse(self, r: float) -> float:
        """g⁻¹(r): the least h with 1 − f(h) >= r (see the class docstring)."""
        value = max(0.0, float(np.max(self._a_slope * (r - self._a_delta))))
        if self._b_scale.size:
            value = max(value, float(np.max(1 - self._b_delta - self._b_scale * (1 - r))))
        return value

    @classmethod
    def gaussian(cls, mu: float, *, num_epsilons: int = 2000) -> TradeoffCurve:
        """μ-GDP: f = G_μ(α) = Φ(Φ⁻¹(1 − α) − μ), through its exact profile on an ε grid.

        δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Dong, Roth & Su 2022, Cor. 2.13).
        """
        mu = float(mu)
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"mu={mu!r} must be a finite number > 0.")
        eps = np.linspace(0.0, mu * mu / 2 + 9.0 * mu, num_epsilons)
        log_second = eps + stats.norm.logcdf(-eps / mu - mu / 2)
        delta = stats.norm.cdf(-eps / mu + mu / 2) - np.exp(log_second)
        return cls(eps, np.clip(delta, 0.0, 1.0), name=f"Gaussian mu={mu:g}")

    @classmethod
    def epsilon_delta(cls, epsilon: float, delta: float = 0.0) -> TradeoffCurve:
        """The (ε, δ)-DP curve f_{ε,δ} (one profile point)."""
        return cls([float(epsilon)], [float(delta)], name=f"({epsilon:g}, {delta:g})-DP")

    @classmethod
    def from_plan(
        cls,
        plan: PrivacyPlan,
        *,
        noise_multiplier: float | None = None,
        value_discretization_interval: float = 1e-3,
        num_epsilons: int = 300,
    ) -> TradeoffCurve:
        """The trade-off curve of the mechanism ``plan`` claims, from dp-accounting's PLD.

        The plan's DP event (``plan.dp_event()``: ``num_steps`` Poisson-subsampled
        Gaussian steps with the plan's q and σ, or the BandMF rounds) as a privacy
        loss distribution with pessimistic discretisation; δ(ε) (the max over the
        add and remove directions) on ``num_epsilons`` points of [0, ε(δ = 1e-12)].
        The curve does not depend on the plan's accountant: it is the mechanism's
        own, which the accountant's ε only summarises.

        Args:
          plan: the claimed plan.
          noise_multiplier: σ' to use instead of the plan's σ (same q and steps):
            the family :func:`noise_ratio_bound` searches.
          value_discretization_interval: PLD grid step (every value stays an upper bound).
          num_epsilons: ε grid size.
        """
        sigma = plan.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0.")
        label = f"subsampled Gaussian q={plan.sampling_rate:.4g} sigma={sigma:.4g}"
        if sigma == 0 or plan.num_steps == 0:
            # No noise: f = 0 (nothing is promised; every mechanism is 0-DP in this sense).
            # No steps: nothing released, f(α) = 1 − α.
            return cls([0.0], [1.0 if sigma == 0 and plan.num_steps else 0.0], name=label)
        event = dataclasses.replace(plan, noise_multiplier=sigma).dp_event()
        rounds = getattr(event, "count", None)
        inner = getattr(event, "event", None)
        gaussian = getattr(inner, "event", None)
        if not (
            isinstance(event, dp_accounting.SelfComposedDpEvent)
            and isinstance(inner, dp_accounting.PoissonSampledDpEvent)
            and isinstance(gaussian, dp_accounting.GaussianDpEvent)
        ):
            raise ValueError(f"the f-DP audit knows the Poisson-subsampled Gaussian only, not the event {event!r}.")
        # The pld accountant's own PLD (pessimistic discretisation) of ``rounds`` compositions.
        pld = PldAccountant(
            sampling_rate=inner.sampling_probability,
            noise_multiplier=gaussian.noise_multiplier,
            value_discretization_interval=value_discretization_interval,
        )
        eps_max = pld.epsilon_for(1e-12, rounds)  # inf where dp-accounting finds none
        eps_max = 50.0 if not math.isfinite(eps_max) else min(max(eps_max, 1e-3), 50.0)
        eps = np.linspace(0.0, eps_max, num_epsilons)
        delta = np.asarray(pld.delta_curve(eps, rounds), dtype=np.float64)
        return cls(eps, np.clip(delta, 0.0, 1.0), name=label + f" steps={plan.num_steps}")


def _fdp_least_mass(curve: TradeoffCurve, m: int, r: int, v: int, p: float) -> float:
    """The least total probability an f-DP mechanism needs to make P[W >= v] >= p (> 1: impossible).

    See :func:`fdp_p_value` for the argument. Walks the levels i = v, ..., 1 with
    R = E[(W/m) 1{W >= i}] and H = E[((r − W)/m) 1{W >= i}] at their least values.
    """
    cap = r / m
    big_r, big_h = p * v / m, p * (r - v) / m
    for i in range(v, 0, -1):
        if big_r + big_h > cap:
            return math.inf
        h_new = curve.blowup_inverse(big_r)
        if h_new <= big_h:  # a fixed point: no level below needs any mass
            break
        big_r += (i - 1) / (r - i + 1) * (h_new - big_h)
        big_h = h_new
    return (big_r + big_h) / cap


_MASS_SLACK = 1e-9  # "impossible" needs a least mass above 1 + 1e-9 (rounding never rejects)


def _fdp_rejects(curve: TradeoffCurve, m: int, r: int, v: int, level: float) -> bool:
    return v > 0 and _fdp_least_mass(curve, m, r, v, level) > 1.0 + _MASS_SLACK


def fdp_p_value(*, num_canaries: int, num_guesses: int, num_correct: int, curve: TradeoffCurve) -> float:
    """Largest probability of ``num_correct`` or more correct guesses under f-DP (one run).

    The one-run f-DP analysis of Mahloujifar, Melis & Chaudhuri (2024, "Auditing
    f-Differential Privacy in One Run", arXiv:2410.22235), derived and computed
    here as follows. m canaries, S_j in {in, out} independent fair coins; the
    guesser sees only the output and makes r guesses (T_j ≠ abstain); W counts
    the correct ones. Let, for i = 0..r,

        R_i = E[(W/m) 1{W >= i}],  H_i = E[((r − W)/m) 1{W >= i}]

    (the probability that a uniformly random canary is guessed right, resp.
    wrong, and W >= i). Fix canary j and the other coins S_{-j}. The event
    {T_j = in and W_{-j} >= i − 1} is a function of the output; with S_j = in it
    is "j right and W >= i", with S_j = out it is "j wrong and W >= i − 1". f-DP
    in canary j bounds P_in(E) <= 1 − f(P_out(E)) (and the "out" guesses the
    same way with the roles swapped). Averaging over S_j, S_{-j} and j, with
    1 − f concave (Jensen):

        R_i <= 1 − f(H_{i−1})   for i = 1..r,   i.e.   H_{i−1} >= g⁻¹(R_i).

    Also R_{i−1} − R_i = (i−1) P[W = i−1]/m and H_{i−1} − H_i = (r−i+1) P[W = i−1]/m,
    and R_0 + H_0 = r/m (total probability 1). No independence between canaries
    is assumed.

    Worst case: a distribution of W with P[W >= v] = p that meets the constraints
    can be changed, keeping them, into one that (a) puts all of P[W >= v] at
    W = v (moving mass from w > v to v lowers R_i and raises H_{i−1} for i <= v,
    and zeroes R_i for i > v), then (b) at each level i − 1 = v − 1, ..., 1 in turn
    holds only the least mass its constraint needs (moving the excess one level
    down lowers R and raises H at all lower levels and keeps the constraint
    above satisfied). So the least total probability any f-DP mechanism needs
    is that of the greedy walk from R_v = p v/m, H_v = p (r − v)/m:

        H_{i−1} = max(H_i, g⁻¹(R_i)),  R_{i−1} = R_i + (i−1)/(r−i+1) · (H_{i−1} − H_i),

    and P[W >= v] >= p is impossible for every f-DP mechanism exactly when
    (m/r)(R_0 + H_0) > 1. The possible p form an interval [0, p*] (moving mass
    from W = v to v − 1 keeps the constraints), so the p-value p* is found by
    bisection; the returned value is the smallest p tested impossible (>= p*).

    Args:
      num_canaries: m.
      num_guesses: r <= m.
      num_correct: v <= r.
      curve: the f of the null hypothesis (:class:`TradeoffCurve`).

    Returns:
      The p-value in (0, 1].

    Example (pure ε-DP: close to the binomial tail, which randomised response attains):
      >>> curve = TradeoffCurve.epsilon_delta(1.0)
      >>> round(fdp_p_value(num_canaries=1000, num_guesses=100, num_correct=85, curve=curve), 4)
      0.0037
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    return _fdp_p_value(curve, m, r, v)


def _fdp_p_value(curve: TradeoffCurve, m: int, r: int, v: int, level: float | None = None) -> float:
    """Bisection for :func:`fdp_p_value`; ``level`` (if given) is a probe, so ``p <= level`` iff rejected there."""
    if v == 0 or not _fdp_rejects(curve, m, r, v, 1.0):
        return 1.0
    hi = 1.0
    if level is not None and _fdp_rejects(curve, m, r, v, level):
        hi = level
    lo = hi / 2
    while _fdp_rejects(curve, m, r, v, lo):
        hi, lo = lo, lo / 16
        if lo < 1e-300:
            return hi
    while hi > lo * (1 + 1e-3):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if _fdp_rejects(curve, m, r, v, mid) else (mid, hi)
    return hi


@dataclasses.dataclass(frozen=True)
class FdpAuditResult:
    """The f-DP test of canary scores against a claimed trade-off curve.

    Attributes:
      p_value: Bonferroni p-value over the guess counts (``len(guess_counts)``
        times the smallest per-count p-value, at most 1).
      passed: False when the claimed curve is rejected at ``confidence``
        (``p_value <= 1 − confidence``).
      confidence: 1 − β.
      curve: the null hypothesis's name.
      num_canaries: m.
      num_guesses, num_correct: the guess count with the smallest p-value, and its correct guesses.
      guess_counts: every guess count tried.
      noise_ratio: see :func:`noise_ratio_bound` (None when not computed or not
        certified anywhere in the range searched).
    """

    p_value: float
    passed: bool
    confidence: float
    curve: str
    num_canaries: int
    num_guesses: int
    num_correct: int
    guess_counts: tuple[int, ...]
    noise_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _guess_counts_and_correct(scores: Any, included: Any, guess_fractions: Sequence[float]) -> tuple[int, list]:
    """(m, [(r, v), ...]): for each fraction, r = 2k guesses (top k "in", bottom k "out") and v correct."""
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


def fdp_audit(
    scores: Any,
    included: Any,
    curve: TradeoffCurve,
    *,
    confidence: float = 0.95,
    guess_fractions: Sequence[float] = DEFAULT_FDP_GUESS_FRACTIONS,
) -> FdpAuditResult:
    """One-run f-DP test: can the scores come from a mechanism that is ``curve``-DP in each canary?

    The guesses of :func:`epsilon_lower_bound` (top k "in", bottom k "out", ties
    by index, k = round(f m / 2) for the fixed ``guess_fractions`` f); each guess count is
    tested with :func:`fdp_p_value` at β / G (G guess counts, Bonferroni), so a
    mechanism that is f-DP fails with probability at most β = 1 − ``confidence``.

    Example:
      >>> import numpy as np
      >>> inc = np.arange(400) % 2 == 0
      >>> fdp_audit(inc.astype(float), inc, TradeoffCurve.gaussian(1.0)).passed  # perfect separation
      False
    """
    confidence = _check_confidence(confidence)
    m, tried = _guess_counts_and_correct(scores, included, guess_fractions)
    level = (1.0 - confidence) / len(tried)
    p_values = [_fdp_p_value(curve, m, r, v, level) for r, v in tried]
    best = int(np.argmin(p_values))
    p_value = min(1.0, len(tried) * p_values[best])
    return FdpAuditResult(
        p_value=p_value,
        passed=not p_values[best] <= level,
        confidence=confidence,
        curve=curve.name,
        num_canaries=m,
        num_guesses=tried[best][0],
        num_correct=tried[best][1],
        guess_counts=tuple(r for r, _ in tried),
    )


def noise_ratio_bound(
    scores: Any,
    included: Any,
    plan: PrivacyPlan,
    *,
    confidence: float = 0.95,
    guess_fractions: Sequence[float] = DEFAULT_FDP_GUESS_FRACTIONS,
    value_discretization_interval: float = 2e-3,
) -> float | None:
    """The largest mechanism-level violation the scores certify, as a fraction of the claimed noise.

    The family of claims "the run is as private as ``plan``'s mechanism with
    noise multiplier σ' = ρ σ" (same q, steps and clipping; ρ = 1 is the claim) is
    ordered: a larger ρ is a stronger claim (adding noise is post-processing).
    This returns the smallest ρ in [1/8, 8] (to 2%) whose claim
    :func:`fdp_audit` rejects: with confidence 1 − β the mechanism that ran is
    less private than the claimed one would be with ρ·σ, for every ρ' >= ρ.

    * ρ <= 1: a certified violation; e.g. ρ = 0.7 reads "the run leaks at least
      as much as the claimed mechanism with 70% of its noise".
    * ρ > 1: the claim stands; ρ says how close the audit came (the run is not
      as private as ρ·σ would be, which an honest run may well show).
    * None: not even ρ = 8 is rejected (no leakage seen); 1/8: rejected across
      the whole range.

    m canaries put a floor under ρ as under the ε bound: with m = 1000, even
    perfect guesses certify only ρ ≈ 0.43 on the digits recipe's curve.

    The grid of guess counts and the Bonferroni level are those of :func:`fdp_audit`
    (the search over ρ reuses one set of guesses, so it needs no correction).
    ρ = 1 is decided on :meth:`TradeoffCurve.from_plan`'s default curve, exactly as
    :func:`fdp_audit` decides it, so ρ <= 1 exactly when that test fails; the other
    probes use a coarser PLD grid (``value_discretization_interval``; pessimistic,
    so each rejection stays valid).
    """
    confidence = _check_confidence(confidence)
    m, tried = _guess_counts_and_correct(scores, included, guess_fractions)
    level = (1.0 - confidence) / len(tried)
    if plan.noise_multiplier == 0:
        return None

    def rejected(ratio: float) -> bool:
        if ratio == 1.0:
            curve = TradeoffCurve.from_plan(plan)
        else:
            curve = TradeoffCurve.from_plan(
                plan,
                noise_multiplier=ratio * plan.noise_multiplier,
                value_discretization_interval=value_discretization_interval,
            )
        return any(_fdp_rejects(curve, m, r, v, level) for r, v in tried)

    if rejected(1.0):
        lo, hi = _RATIO_RANGE[0], 1.0
        if rejected(lo):
            return lo
    else:
        lo, hi = 1.0, _RATIO_RANGE[1]
        if not rejected(hi):
            return None
    while hi > lo * (1 + _RATIO_RTOL):  # rejected(hi), not rejected(lo)
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if rejected(mid) else (mid, hi)
    return hi


# -- the audit run ------------------------------------------------------------

#: Deliberately broken mechanisms, to show that an audit can fail. They change
#: what is *executed* while the claim (the accountant's ε) stays the plan's.
#: Never used by training; ``jaxdp audit --sabotage`` exposes them for demonstration.
SABOTAGES = ("noise_off", "clipping_off", "half_noise")

_NO_CLIP_FACTOR = 1e6

#: The tests an audit can run; ``jaxdp audit`` runs (and is decided by) both.
AUDIT_TESTS = ("epsilon", "fdp")


def _check_tests(tests: Sequence[str]) -> tuple[str, ...]:
    chosen = (tests,) if isinstance(tests, str) else tuple(tests)
    if not chosen or any(t not in AUDIT_TESTS for t in chosen):
        raise ValueError(f"tests={tests!r} must be a non-empty selection of {AUDIT_TESTS}.")
    return tuple(t for t in AUDIT_TESTS if t in chosen)


def _sabotaged(plan: PrivacyPlan, sabotage: str | None) -> PrivacyPlan:
    """The plan that is actually run: ``plan`` itself, or a broken copy of it."""
    if sabotage is None:
        return plan
    if sabotage == "noise_off":
        return dataclasses.replace(plan, noise_multiplier=0.0)
    if sabotage == "half_noise":  # σ/2: about twice the claimed μ, an ε far above the claim
        return dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier / 2)
    if sabotage == "clipping_off":
        # The clipping bound no longer binds, but the noise keeps its std σC:
        # exactly "forgot to clip" while the accounting still assumes C.
        return dataclasses.replace(
            plan,
            l2_clip_norm=plan.l2_clip_norm * _NO_CLIP_FACTOR,
            noise_multiplier=plan.noise_multiplier / _NO_CLIP_FACTOR,
        )
    raise ValueError(f"sabotage={sabotage!r} is not known; use None (audit the real mechanism) or one of {SABOTAGES}.")


class CanaryScoreState(NamedTuple):
    """Running sum of the privatised gradient on the canary coordinates."""

    canary_score_sums: jax.Array


def _record_canary_scores() -> optax.GradientTransformation:
    """Pass updates through; add their ``"canary"`` leaf to a running sum (post-processing)."""

    def init_fn(params):
        return CanaryScoreState(jnp.zeros(params["canary"].shape, jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        return updates, CanaryScoreState(state.canary_score_sums + updates["canary"].astype(jnp.float32))

    return optax.GradientTransformation(init_fn, update_fn)


def _with_gradient_canaries(loss_fn: Callable[..., jax.Array], canary_norm: float) -> Callable[..., jax.Array]:
    """``loss(params, x, y, canary)`` for one example: the model's loss, or a Dirac canary.

    ``params = {"model": ..., "canary": zeros(m)}``. A real example (``canary == -1``)
    has the model's loss, so its gradient is zero on the canary coordinates. Canary
    j has loss ``canary_norm * params["canary"][j]``: its gradient is
    ``canary_norm * e_j`` on its own coordinate and zero on the model. Called by
    ``clipped_grad`` on batches of one.
    """

    def loss(params, x, y, canary):
        real = loss_fn(params["model"], x, y)
        dirac = canary_norm * jnp.sum(params["canary"][jnp.maximum(canary, 0)])
        return jnp.where(jnp.all(canary >= 0), dirac, real)

    return loss


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """What :func:`audit_training_run` measured.

    Attributes:
      claimed_epsilon: the accountant's ε (at ``bound.delta``) for the audited plan:
        the upper bound the implementation promises.
      bound: the empirical lower bound on ε (:class:`AuditBound`), always computed.
      fdp: the f-DP test against the claimed mechanism's trade-off curve
        (:class:`FdpAuditResult`, with its ``noise_ratio``); None when not run.
      tests: the tests that decide ``passed``: ``"epsilon"`` and/or ``"fdp"``.
      accountant: the accountant's name.
      noise_multiplier, l2_clip_norm, sampling_rate, steps: the claimed mechanism.
      num_included: how many canaries the coin flips put in the training set.
      canary_gradient_norm: norm of each canary's gradient before clipping.
      sabotage: None, or the deliberate break that was run (tests/demos only).
      wall_time_s: training plus scoring time.
      scores, included: per-canary score and membership (not in ``to_dict``).
    """

    claimed_epsilon: float
    bound: AuditBound
    fdp: FdpAuditResult | None
    tests: tuple[str, ...]
    accountant: str
    noise_multiplier: float
    l2_clip_norm: float
    sampling_rate: float
    steps: int
    num_included: int
    canary_gradient_norm: float
    sabotage: str | None
    wall_time_s: float
    scores: np.ndarray = dataclasses.field(repr=False)
    included: np.ndarray = dataclasses.field(repr=False)

    @property
    def epsilon_passed(self) -> bool:
        """True when the empirical lower bound on ε does not exceed the accountant's ε."""
        return self.bound.epsilon <= self.claimed_epsilon

    @property
    def fdp_passed(self) -> bool:
        """True when the f-DP test does not reject the claimed mechanism (or was not run)."""
        return self.fdp is None or self.fdp.passed

    @property
    def passed(self) -> bool:
        """True when no deciding test (``tests``) certifies a violation."""
        return ("epsilon" not in self.tests or self.epsilon_passed) and ("fdp" not in self.tests or self.fdp_passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epsilon_accountant": self.claimed_epsilon,
            "epsilon_lower_bound": self.bound.epsilon,
            "confidence": self.bound.confidence,
            "delta": self.bound.delta,
            "passed": self.passed,
            "tests": list(self.tests),
            "epsilon_passed": self.epsilon_passed,
            "fdp_passed": None if self.fdp is None else self.fdp.passed,
            "fdp_p_value": None if self.fdp is None else self.fdp.p_value,
            "fdp_guesses": None if self.fdp is None else self.fdp.num_guesses,
            "fdp_correct_guesses": None if self.fdp is None else self.fdp.num_correct,
            "noise_ratio_bound": None if self.fdp is None else self.fdp.noise_ratio,
            "accountant": self.accountant,
            "method": "one-run (Steinke, Nasr & Jagielski 2023) and one-run f-DP (Mahloujifar, Melis & Chaudhuri "
            "2024) against the claimed mechanism's PLD, gradient canaries",
            "canaries": self.bound.num_canaries,
            "canaries_included": self.num_included,
            "guesses": self.bound.num_guesses,
            "correct_guesses": self.bound.num_correct,
            "guess_counts_tried": list(self.bound.guess_counts),
            "canary_gradient_norm": self.canary_gradient_norm,
            "noise_multiplier": self.noise_multiplier,
            "l2_clip_norm": self.l2_clip_norm,
            "sampling_rate": self.sampling_rate,
            "steps": self.steps,
            "sabotage": self.sabotage,
            "wall_time_s": self.wall_time_s,
        }


def audit_training_run(
    plan: PrivacyPlan,
    loss_fn: Callable[..., jax.Array],
    params: Any,
    x_train: Any,
    y_train: Any,
    *,
    optimizer: optax.GradientTransformation,
    num_canaries: int,
    delta: float,
    confidence: float = 0.95,
    canary_gradient_norm: float | None = None,
    guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
    fdp_guess_fractions: Sequence[float] = DEFAULT_FDP_GUESS_FRACTIONS,
    microbatch_size: int | None = None,
    seed: int | None = None,
    sabotage: str | None = None,
    tests: Sequence[str] = AUDIT_TESTS,
) -> AuditResult:
    """Train once with gradient canaries; bound ε from below and test the claimed mechanism's f-DP curve.

    The run is jaxdp's own DP-SGD (:func:`jaxdp.train.make_private_step` built
    from ``plan``: the plan's Poisson sampler, ``clipped_grad`` and
    ``privatize``) on the training set plus ``num_canaries`` *gradient canaries*
    (Dirac canaries, as in Steinke et al. 2023's white-box audits): extra rows of the dataset whose
    per-example gradient is ``canary_gradient_norm · e_j`` on a coordinate j of
    their own, in an extra parameter vector the model never reads (so real
    examples' gradients are exactly zero there). Each canary is in the training
    set with probability 1/2; an excluded canary's row always has mask 0, so it
    contributes exactly nothing. Canaries are sampled, clipped, summed and
    noised exactly like real examples. The score of canary j is the sum over all
    steps of the privatised gradient on coordinate j (white-box: what DP-SGD's
    accounting covers is the release of every noisy gradient). Under the plan,
    an included canary adds about ``C · q · T`` to its score; the noise has
    standard deviation ``σ · C · √T`` (both divided by the expected batch size).

    Args:
      plan: the privacy plan audited (its ε is the claim). Its ``dataset_size``
        must be ``len(x_train) + num_canaries`` (the canaries are rows of the
        dataset, the excluded ones masked out), so that q and the expected batch
        size do not depend on the coin flips.
      loss_fn: ``loss_fn(model_params, x, y)``, the ordinary batch loss.
      params: the model's parameters (any pytree).
      x_train, y_train: the real training data (NumPy arrays).
      optimizer: the optax optimizer after the privatizer (as in training).
      num_canaries: m; hundreds to a few thousand. m limits the largest bound
        any run can give (5.1 for m = 1000 at δ = 1e-5; see the module docstring).
      delta: δ of the claim.
      confidence: 1 − β of the lower bound.
      canary_gradient_norm: each canary's gradient norm before clipping; default
        100 C. Clipping makes any value >= C count as C, so the default only
        matters when clipping is broken.
      guess_fractions: see :func:`epsilon_lower_bound`.
      fdp_guess_fractions: the f-DP test's grid (:func:`fdp_audit`).
      microbatch_size: performance only.
      seed: secret of the coin flips, the Poisson draws and the noise key
        (:func:`jaxdp.keys.key_from_secret`); default: a fresh 128-bit OS secret
        (:func:`jaxdp.keys.new_secret`). A fixed seed is for tests only.
      sabotage: None (audit the real mechanism), ``"noise_off"`` (σ = 0),
        ``"clipping_off"`` (no clipping, noise std still σC) or ``"half_noise"``
        (σ/2). The claim stays the plan's: for showing that the audit catches
        broken mechanisms.
      tests: which tests decide ``result.passed``: ``"epsilon"`` (the lower
        bound on ε against the accountant's ε) and/or ``"fdp"`` (the canary
        scores against the claimed mechanism's trade-off curve,
        :func:`fdp_audit`, with :func:`noise_ratio_bound`). The ε bound is
        always computed; the f-DP test only when asked for.

    Returns:
      An :class:`AuditResult`; ``result.passed`` is False when a deciding test
      certifies a violation (a bug, each with probability at least ``confidence``).

    Limits: single device (no mesh); ``plan.per_layer`` clips the canary leaf to
    C/√K like any leaf, which weakens the canaries (the bound stays valid).
    """
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, (int, np.integer)) or num_canaries < 2:
        raise ValueError(f"num_canaries={num_canaries!r} must be an int >= 2 (hundreds give useful bounds, e.g. 1000).")
    m = int(num_canaries)
    x_train, y_train = np.asarray(x_train), np.asarray(y_train)
    n = len(x_train)
    if plan.dataset_size != n + m:
        raise ValueError(
            f"plan.dataset_size={plan.dataset_size} must be len(x_train) + num_canaries = {n} + {m} = {n + m}: "
            "the canaries are rows of the audited dataset (the excluded ones masked out). Build the plan with "
            f"dataset_size={n + m} and batch_size=round(q * {n + m})."
        )
    delta = check_delta(delta, dataset_size=plan.dataset_size)  # the one δ rule, as in training
    _check_confidence(confidence)
    tests = _check_tests(tests)
    clip = plan.l2_clip_norm
    if canary_gradient_norm is None:
        canary_gradient_norm = 100.0 * clip
    canary_gradient_norm = float(canary_gradient_norm)
    if not (math.isfinite(canary_gradient_norm) and canary_gradient_norm >= clip):
        raise ValueError(
            f"canary_gradient_norm={canary_gradient_norm!r} must be a finite number >= the clipping bound C={clip}: "
            f"a weaker canary only weakens the audit. Leave it None for 100 C."
        )
    executed = _sabotaged(plan, sabotage)
    seed = keys.new_secret() if seed is None else keys.check_secret(seed, "seed")
    t0 = time.perf_counter()

    included = np.random.default_rng([seed, 11]).random(m) < 0.5  # the secret coin flips
    x_all = np.concatenate([x_train, np.zeros((m,) + x_train.shape[1:], x_train.dtype)])
    y_all = np.concatenate([y_train, np.zeros((m,), y_train.dtype)])
    canary_of_row = np.concatenate([np.full(n, -1, np.int32), np.arange(m, dtype=np.int32)])
    row_present = np.concatenate([np.ones(n, np.float32), included.astype(np.float32)])

    audit_params = {"model": params, "canary": jnp.zeros((m,), jnp.float32)}
    loss = _with_gradient_canaries(loss_fn, canary_gradient_norm)
    tx, step, accumulate = make_private_step(
        executed,
        loss,
        optax.chain(_record_canary_scores(), optimizer),
        noise_key=keys.key_from_secret(seed),
        microbatch_size=microbatch_size,
    )
    state = TrainState(audit_params, tx.init(audit_params), jnp.zeros((), jnp.int32))
    sampler = executed.sampler(seed=seed + 1)
    for _, chunks in sampler.steps(0, executed.num_steps):
        acc = None
        for i, (idx, mask) in enumerate(chunks):
            batch = (x_all[idx], y_all[idx], mask * row_present[idx], canary_of_row[idx])
            if i < len(chunks) - 1:
                acc, _ = accumulate(state, acc, *batch)
            else:
                state, _ = step(state, acc, *batch)
    scores = np.asarray(optax.tree_utils.tree_get(state.opt_state, "canary_score_sums"), np.float64)
    bound = epsilon_lower_bound(scores, included, delta=delta, confidence=confidence, guess_fractions=guess_fractions)
    fdp = None
    if "fdp" in tests:  # the claimed plan's curve (its σ), never the executed one's
        grid = {"confidence": confidence, "guess_fractions": fdp_guess_fractions}
        fdp = fdp_audit(scores, included, TradeoffCurve.from_plan(plan), **grid)
        ratio = noise_ratio_bound(scores, included, plan, **grid)
        fdp = dataclasses.replace(fdp, noise_ratio=ratio)
    return AuditResult(
        claimed_epsilon=plan.epsilon(delta),
        bound=bound,
        fdp=fdp,
        tests=tests,
        accountant=plan.accountant,
        noise_multiplier=plan.noise_multiplier,
        l2_clip_norm=clip,
        sampling_rate=plan.sampling_rate,
        steps=plan.num_steps,
        num_included=int(included.sum()),
        canary_gradient_norm=canary_gradient_norm,
        sabotage=sabotage,
        wall_time_s=time.perf_counter() - t0,
        scores=scores,
        included=included,
    )


def audit_config(
    config: ml_collections.ConfigDict,
    *,
    num_canaries: int = 1000,
    confidence: float = 0.95,
    sabotage: str | None = None,
    tests: Sequence[str] = AUDIT_TESTS,
) -> tuple[AuditResult, PrivacyPlan, int]:
    """Audit the training recipe of a ``jaxdp train`` config (what ``jaxdp audit`` runs).

    The recipe's data, model, optimizer, clipping bound, sampling rate q, number
    of steps and (target) ε are kept; the dataset gains ``num_canaries``
    gradient canaries (each included with probability 1/2) and σ is set by the
    same rules as training (:func:`jaxdp.train.make_plan`) for the audited
    dataset of N + m rows with expected batch size round(q (N + m)), i.e. the
    recipe's q up to rounding. ``tests`` as in :func:`audit_training_run`.

    Returns:
      ``(result, plan, n_train)``: the :class:`AuditResult`, the audited plan and
      the number of real training examples.

    Raises:
      ConfigError: for bad config values, as ``jaxdp train`` would, and for
        options the audit does not support (``augment.multiplicity > 0``).
    """
    from jaxdp import data as data_lib
    from jaxdp.train import build_model, classification_loss, config_optimizer, make_plan, privacy_seed, validate_config

    if config.augment.multiplicity:
        raise ConfigError(
            f"augment.multiplicity={config.augment.multiplicity} is not supported by jaxdp audit yet; "
            "set augment.multiplicity=0 (the gradient canaries and the privacy analysis do not depend on it)."
        )
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 2:
        raise ConfigError(f"--canaries={num_canaries!r} must be an int >= 2 (e.g. 1000).")
    try:
        _check_confidence(confidence)
    except ValueError:
        raise ConfigError(f"--confidence={confidence!r} must lie in (0, 1), e.g. 0.95.") from None
    if sabotage is not None and sabotage not in SABOTAGES:
        raise ConfigError(f"--sabotage={sabotage!r} is not known; use one of {SABOTAGES} (or leave it out).")
    try:
        tests = _check_tests(tests)
    except ValueError:
        raise ConfigError(f"--test={tests!r} is not known; use both, epsilon or fdp.") from None
    try:
        dataset = data_lib.load(config.dataset, config.data_dir or None)
        n = len(dataset.x_train)
        validate_config(config, n)
        audited = ml_collections.ConfigDict(config.to_dict())
        total = n + num_canaries
        audited.batch_size = max(1, round(config.batch_size / n * total))  # the recipe's q, up to rounding
        plan = make_plan(audited, total, steps_per_epoch(n, config.batch_size))
        graphdef, params, rest = build_model(config, dataset)
    except ConfigError:
        raise
    except ValueError as e:  # a bad value caught by the plan, model or dataset
        raise ConfigError(str(e)) from e
    result = audit_training_run(
        plan,
        classification_loss(graphdef, rest),
        params,
        dataset.x_train,
        dataset.y_train,
        optimizer=config_optimizer(config),
        num_canaries=num_canaries,
        delta=config.privacy.delta,
        confidence=confidence,
        microbatch_size=config.microbatch_size or None,
        # A fresh 128-bit secret; privacy.noise_seed (tests) is used as given, with train's warning.
        seed=keys.new_secret() if config.privacy.noise_seed is None else privacy_seed(config.privacy.noise_seed),
        sabotage=sabotage,
        tests=tests,
    )
    return result, plan, n
