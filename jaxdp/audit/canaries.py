"""The gradient-canary training run: one DP-SGD run with canaries, scored by both tests.

:func:`audit_training_run` trains once with m gradient (Dirac) canaries, each in
the dataset with probability 1/2, through the same step runner as ``jaxdp train``
(:func:`jaxdp.make_private_step`, :meth:`jaxdp.PrivateStep.init`,
:func:`jaxdp.run_private_step`); it scores each canary by the privatised
gradient on its own coordinate and hands the scores to the ε lower bound
(:mod:`jaxdp.audit.bounds`) and the f-DP test (:mod:`jaxdp.audit.fdp`).
:func:`audit_config` does the same for a ``jaxdp train`` config (what
``jaxdp audit`` runs). :data:`SABOTAGES` are deliberately broken mechanisms, to
show that the audit can fail.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdp import keys, rules
from jaxdp.audit.bounds import DEFAULT_GUESS_FRACTIONS, AuditBound, epsilon_lower_bound
from jaxdp.audit.fdp import DEFAULT_FDP_GUESS_FRACTIONS, FdpAuditResult, TradeoffCurve, fdp_audit, noise_ratio_bound
from jaxdp.audit.guesses import check_confidence
from jaxdp.config import ConfigError
from jaxdp.plan import PrivacyPlan, steps_per_epoch
from jaxdp.step import make_private_step, run_private_step

__all__ = [
    "AUDIT_TESTS",
    "SABOTAGES",
    "AuditResult",
    "CanaryScoreState",
    "audit_config",
    "audit_training_run",
]

#: Deliberately broken mechanisms, to show that an audit can fail. They change
#: what is *executed* while the claim (the accountant's ε) stays the plan's.
#: Never used by training; ``jaxdp audit --sabotage`` exposes them for demonstration.
SABOTAGES = ("noise_off", "clipping_off", "half_noise")

_NO_CLIP_FACTOR = 1e6

#: The tests an audit can run; ``jaxdp audit`` runs (and is decided by) both.
AUDIT_TESTS = ("epsilon", "fdp")


def _check_tests(tests: Sequence[str], name: str = "tests") -> tuple[str, ...]:
    """The deciding tests, in :data:`AUDIT_TESTS` order; ``name`` is what the caller knows them by."""
    chosen = (tests,) if isinstance(tests, str) else tuple(tests)
    if not chosen or any(t not in AUDIT_TESTS for t in chosen):
        raise ValueError(f"{name}={tests!r} must be a non-empty selection of {AUDIT_TESTS}.")
    return tuple(t for t in AUDIT_TESTS if t in chosen)


def _check_num_canaries(num_canaries: Any, name: str = "num_canaries") -> int:
    """m: an int >= 2."""
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, (int, np.integer)) or num_canaries < 2:
        raise ValueError(f"{name}={num_canaries!r} must be an int >= 2 (hundreds give useful bounds, e.g. 1000).")
    return int(num_canaries)


def _check_sabotage(sabotage: Any, name: str = "sabotage") -> str | None:
    """None (audit the real mechanism) or one of :data:`SABOTAGES`."""
    if sabotage is not None and sabotage not in SABOTAGES:
        raise ValueError(
            f"{name}={sabotage!r} is not known; leave it out (None: audit the real mechanism) or use one of "
            f"{SABOTAGES}."
        )
    return sabotage


def _sabotaged(plan: PrivacyPlan, sabotage: str | None) -> PrivacyPlan:
    """The plan that is actually run: ``plan`` itself, or a broken copy of it."""
    if _check_sabotage(sabotage) is None:
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
    raise AssertionError(sabotage)  # unreachable: _check_sabotage knows SABOTAGES


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
      bound: the empirical lower bound on ε (:class:`jaxdp.audit.bounds.AuditBound`), always computed.
      fdp: the f-DP test against the claimed mechanism's trade-off curve
        (:class:`jaxdp.audit.fdp.FdpAuditResult`, with its ``noise_ratio``); None when not run.
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

    The run is jaxdp's own DP-SGD (:func:`jaxdp.make_private_step` built from
    ``plan`` and run draw by draw with :func:`jaxdp.run_private_step`, as
    ``jaxdp train`` runs it: the plan's Poisson sampler, ``clipped_grad`` and
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
        any run can give (5.1 for m = 1000 at δ = 1e-5; see :mod:`jaxdp.audit`).
      delta: δ of the claim.
      confidence: 1 − β of the lower bound.
      canary_gradient_norm: each canary's gradient norm before clipping; default
        100 C. Clipping makes any value >= C count as C, so the default only
        matters when clipping is broken.
      guess_fractions: see :func:`jaxdp.audit.bounds.epsilon_lower_bound`.
      fdp_guess_fractions: the f-DP test's grid (:func:`jaxdp.audit.fdp.fdp_audit`).
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
        :func:`jaxdp.audit.fdp.fdp_audit`, with :func:`jaxdp.audit.fdp.noise_ratio_bound`). The ε bound is
        always computed; the f-DP test only when asked for.

    Returns:
      An :class:`AuditResult`; ``result.passed`` is False when a deciding test
      certifies a violation (a bug, each with probability at least ``confidence``).

    Limits: single device (no mesh); ``plan.per_layer`` clips the canary leaf to
    C/√K like any leaf, which weakens the canaries (the bound stays valid).
    """
    m = _check_num_canaries(num_canaries)
    x_train, y_train = np.asarray(x_train), np.asarray(y_train)
    n = len(x_train)
    if plan.dataset_size != n + m:
        raise ValueError(
            f"plan.dataset_size={plan.dataset_size} must be len(x_train) + num_canaries = {n} + {m} = {n + m}: "
            "the canaries are rows of the audited dataset (the excluded ones masked out). Build the plan with "
            f"dataset_size={n + m} and batch_size=round(q * {n + m})."
        )
    delta = rules.check_delta(delta, dataset_size=plan.dataset_size)  # the one δ rule, as in training
    check_confidence(confidence)
    tests = _check_tests(tests)
    _check_sabotage(sabotage)
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
    step = make_private_step(
        executed,
        loss,
        optax.chain(_record_canary_scores(), optimizer),
        noise_key=keys.key_from_secret(seed),
        microbatch_size=microbatch_size,
    )
    state = step.init(audit_params)
    sampler = executed.sampler(seed=seed + 1)
    for _, chunks in sampler.steps(0, executed.num_steps):
        # An excluded canary's row is masked out; the canary index goes to the loss after y.
        draw = [(x_all[idx], y_all[idx], mask * row_present[idx], canary_of_row[idx]) for idx, mask in chunks]
        state, _ = run_private_step(step, state, draw)
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
    try:  # the same rules as audit_training_run, named by their command-line flags
        _check_num_canaries(num_canaries, "--canaries")
        check_confidence(confidence, "--confidence")
        _check_sabotage(sabotage, "--sabotage")
        tests = _check_tests(tests, "--test")
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
        classification_loss(graphdef, rest, config.model.get("dtype")),
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
