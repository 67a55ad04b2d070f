"""The one-run f-DP test (Mahloujifar, Melis & Chaudhuri 2024, arXiv:2410.22235).

The (ε, δ) bound (:mod:`jaxdp.audit.bounds`) sees one point of the privacy
curve, so it misses mechanisms that keep that point but are weaker elsewhere:
σ/2 against a claim of ε = 3 (true ε ≈ 6.9) passes it. This test checks the same
guesses (:mod:`jaxdp.audit.guesses`) against the claimed mechanism's whole
trade-off curve f (from the PLD of the plan's subsampled Gaussian:
:class:`TradeoffCurve`): :func:`fdp_p_value` bounds P[W >= v] for every
mechanism that is f-DP in each canary (no independence between canaries
assumed; the argument is in its docstring), :func:`fdp_audit` applies it on its
own fixed grid of guess counts (Bonferroni), and :func:`noise_ratio_bound`
reports the largest violation it certifies as a fraction of the claimed noise
(ρ < 1: "leaks at least as much as the claimed mechanism with ρσ").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import dp_accounting
import numpy as np
from scipy import stats

from jaxdp import rules
from jaxdp.accounting import PldAccountant
from jaxdp.audit.guesses import check_confidence, check_counts, guess_counts_and_correct
from jaxdp.plan import PrivacyPlan

__all__ = [
    "DEFAULT_FDP_GUESS_FRACTIONS",
    "FdpAuditResult",
    "TradeoffCurve",
    "fdp_audit",
    "fdp_p_value",
    "fdp_rejects",
    "noise_ratio_bound",
]

#: The f-DP test's grid, fixed in advance: fewer points pay less Bonferroni. Chosen by
#: simulating the digits recipe's σ/2 canary scores (power about 0.75-0.8 with
#: :data:`jaxdp.audit.bounds.DEFAULT_GUESS_FRACTIONS`, 0.92-0.96 with this one,
#: 100-150 simulated runs); any fixed grid keeps the test valid.
DEFAULT_FDP_GUESS_FRACTIONS = (0.15, 0.3)

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
        mu = rules.positive_finite("mu", mu)
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
        sigma = plan.noise_multiplier if noise_multiplier is None else rules.check_noise_multiplier(noise_multiplier)
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


def fdp_rejects(*, num_canaries: int, num_guesses: int, num_correct: int, curve: TradeoffCurve, level: float) -> bool:
    """Whether ``num_correct`` of ``num_guesses`` right rejects ``curve`` at p-value ``level``.

    True exactly when no mechanism that is ``curve``-DP in each canary can make
    P[W >= num_correct] >= ``level`` (the least probability it would need,
    from the walk in :func:`fdp_p_value`, exceeds 1); so it is True iff
    :func:`fdp_p_value` <= ``level`` (up to the bisection's resolution). The
    tests use it to find a guess count's critical number of correct guesses,
    as :func:`fdp_audit` and :func:`noise_ratio_bound` decide.

    Example:
      >>> curve = TradeoffCurve.epsilon_delta(1.0)
      >>> fdp_rejects(num_canaries=1000, num_guesses=100, num_correct=85, curve=curve, level=0.01)
      True
    """
    m, r, v = check_counts(num_canaries, num_guesses, num_correct)
    return _fdp_rejects(curve, m, r, v, rules.positive_finite("level", level))


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
    m, r, v = check_counts(num_canaries, num_guesses, num_correct)
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
    confidence = check_confidence(confidence)
    m, tried = guess_counts_and_correct(scores, included, guess_fractions)
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
    confidence = check_confidence(confidence)
    m, tried = guess_counts_and_correct(scores, included, guess_fractions)
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
