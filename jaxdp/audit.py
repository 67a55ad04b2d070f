"""Empirical privacy auditing: canaries in one training run -> a lower bound on ε.

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
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from scipy import special, stats

from jaxdp.config import ConfigError
from jaxdp.plan import PrivacyPlan, steps_per_epoch
from jaxdp.train import TrainState, make_private_step

__all__ = [
    "SABOTAGES",
    "AuditBound",
    "AuditResult",
    "audit_config",
    "audit_training_run",
    "epsilon_lower_bound",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]

#: Fractions of the canaries that are guessed (half "in" from the top, half "out"
#: from the bottom); fixed in advance, the bound is Bonferroni-corrected over them.
DEFAULT_GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.4, 0.8)

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
      3.49
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
    confidence = _check_confidence(confidence)
    delta = _check_delta(delta)
    fractions = tuple(float(f) for f in guess_fractions)
    if not fractions or any(not (0 < f <= 1) for f in fractions):
        raise ValueError(f"guess_fractions={guess_fractions!r} must be a non-empty list of numbers in (0, 1].")
    if m < 2:
        raise ValueError(f"got {m} canaries; an audit needs at least 2 (hundreds to bound epsilon usefully).")
    counts = tuple(sorted({min(m // 2, max(1, round(f * m / 2))) for f in fractions}))
    # Descending by score; ties by index (a stable sort of -score): independent of membership.
    order = np.argsort(-s, kind="stable")
    level = 1.0 - (1.0 - confidence) / len(counts)
    best = AuditBound(0.0, confidence, delta, m, 0, 0, tuple(2 * k for k in counts))
    for k in counts:
        top, bottom = order[:k], order[m - k :]
        correct = int(inc[top].sum() + (~inc[bottom]).sum())
        eps = one_run_epsilon_lower_bound(
            num_canaries=m, num_guesses=2 * k, num_correct=correct, delta=delta, confidence=level
        )
        if eps > best.epsilon:
            best = dataclasses.replace(best, epsilon=eps, num_guesses=2 * k, num_correct=correct)
    return best


# -- the audit run ------------------------------------------------------------

#: Deliberately broken mechanisms, to show that an audit can fail. They change
#: what is *executed* while the claim (the accountant's ε) stays the plan's.
#: Never used by training; ``jaxdp audit --sabotage`` exposes them for demonstration.
SABOTAGES = ("noise_off", "clipping_off")

_NO_CLIP_FACTOR = 1e6


def _sabotaged(plan: PrivacyPlan, sabotage: str | None) -> PrivacyPlan:
    """The plan that is actually run: ``plan`` itself, or a broken copy of it."""
    if sabotage is None:
        return plan
    if sabotage == "noise_off":
        return dataclasses.replace(plan, noise_multiplier=0.0)
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
      bound: the empirical lower bound (:class:`AuditBound`).
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
    def passed(self) -> bool:
        """True when the empirical lower bound does not exceed the claim."""
        return self.bound.epsilon <= self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {
            "epsilon_accountant": self.claimed_epsilon,
            "epsilon_lower_bound": self.bound.epsilon,
            "confidence": self.bound.confidence,
            "delta": self.bound.delta,
            "passed": self.passed,
            "accountant": self.accountant,
            "method": "one-run (Steinke, Nasr & Jagielski 2023), gradient canaries",
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
    microbatch_size: int | None = None,
    seed: int | None = None,
    sabotage: str | None = None,
) -> AuditResult:
    """Train once with gradient canaries and bound ε from below (one-run audit).

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
      microbatch_size: performance only.
      seed: seed of the coin flips, the Poisson draws and the noise (default:
        fresh OS entropy).
      sabotage: None (audit the real mechanism), ``"noise_off"`` (σ = 0) or
        ``"clipping_off"`` (no clipping, noise std still σC). The claim stays
        the plan's ε: for showing that the audit catches broken mechanisms.

    Returns:
      An :class:`AuditResult`; ``result.passed`` is False when the lower bound
      exceeds the accountant's ε (a bug, with probability at least ``confidence``).

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
    delta = _check_delta(delta)
    _check_confidence(confidence)
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
    if seed is None:
        seed = secrets.randbits(62)
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
        noise_key=jax.random.key(seed),
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
    return AuditResult(
        claimed_epsilon=plan.epsilon(delta),
        bound=bound,
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
) -> tuple[AuditResult, PrivacyPlan, int]:
    """Audit the training recipe of a ``jaxdp train`` config (what ``jaxdp audit`` runs).

    The recipe's data, model, optimizer, clipping bound, sampling rate q, number
    of steps and (target) ε are kept; the dataset gains ``num_canaries``
    gradient canaries (each included with probability 1/2) and σ is set by the
    same rules as training (:func:`jaxdp.train.make_plan`) for the audited
    dataset of N + m rows with expected batch size round(q (N + m)), i.e. the
    recipe's q up to rounding.

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
        seed=privacy_seed(config.privacy.noise_seed),
        sabotage=sabotage,
    )
    return result, plan, n
