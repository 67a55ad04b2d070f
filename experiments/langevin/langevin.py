"""DP-SGLD: DP-SGD's Gaussian noise read as Langevin noise (Knolle et al. 2021).

Derivation (plain SGD, no momentum). DP-SGD with learning rate η, expected batch
B, clip norm C and noise multiplier σ updates

    θ ← θ − η · ( Σ_{i∈batch} clip(g_i) + ξ ) / B,      ξ ~ N(0, σ²C² I).

Write U(θ) = Σ_{i=1..N} ℓ_i(θ) + (Nλ/2)‖θ‖² (weight decay λ is the prior term).
The clipped mean (1/B)Σ clip(g_i) estimates ∇(1/N)Σℓ_i = ∇U/N (exactly so while
clipping is inactive), and weight decay adds ηλθ = (η/N)·∇(Nλ/2)‖θ‖². So the
update is θ ← θ − ε ∇U(θ) + (η/B) ξ with step size ε = η/N. SGLD at temperature τ
is θ ← θ − ε ∇U(θ) + N(0, 2ετ I), whose stationary law is ∝ exp(−U(θ)/τ).
Matching the noise variances, (η/B)² σ²C² = 2 (η/N) τ, gives

    τ = η N σ² C² / (2 B²),       η = 2 B² τ / (N σ² C²).

So for the σ that privacy requires, choosing η sets the temperature ("lr" mode);
or, with η fixed, noise can be topped up to σ_τ = B·sqrt(2τ/(η N)) / C ("noise"
mode) — never *below* the privacy σ: if σ_τ < σ the chain simply runs hotter
(τ_actual > τ) and we say so. The prior is N(0, τ/(Nλ) I).

Posterior samples are post-processing of the (already private) trajectory, so
collecting them costs no privacy; every step, burn-in included, is accounted.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxdp import clipped_grad, metrics
from jaxdp.train import TrainCallback

__all__ = [
    "PosteriorPredictive",
    "hessian_top_eigenvalue",
    "learning_rate_for_temperature",
    "burn_in_tail_drop",
    "loss_plateau_epoch",
    "noise_for_temperature",
    "temperature",
]


def temperature(
    *, learning_rate: float, dataset_size: int, batch_size: int, noise_multiplier: float, l2_clip_norm: float
) -> float:
    """τ = η N σ² C² / (2 B²) of a plain-SGD DP update."""
    return learning_rate * dataset_size * noise_multiplier**2 * l2_clip_norm**2 / (2 * batch_size**2)


def learning_rate_for_temperature(
    tau: float, *, dataset_size: int, batch_size: int, noise_multiplier: float, l2_clip_norm: float
) -> float:
    """η = 2 B² τ / (N σ² C²): the step size at which privacy noise σ is Langevin noise at τ."""
    if not (tau > 0 and noise_multiplier > 0):
        raise ValueError(f"temperature={tau!r} and noise_multiplier={noise_multiplier!r} must both be > 0.")
    return 2 * batch_size**2 * tau / (dataset_size * noise_multiplier**2 * l2_clip_norm**2)


def noise_for_temperature(
    tau: float,
    *,
    learning_rate: float,
    dataset_size: int,
    batch_size: int,
    l2_clip_norm: float,
    privacy_noise_multiplier: float,
) -> tuple[float, float]:
    """Noise multiplier for temperature ``tau`` at a fixed step size, never below the privacy σ.

    Returns:
      ``(sigma, tau_actual)``: ``sigma = max(privacy σ, σ_τ)`` and the temperature
      that ``sigma`` really gives (> ``tau`` when privacy needs more noise).
    """
    sigma_tau = batch_size * math.sqrt(2 * tau / (learning_rate * dataset_size)) / l2_clip_norm
    sigma = max(privacy_noise_multiplier, sigma_tau)
    actual = temperature(
        learning_rate=learning_rate,
        dataset_size=dataset_size,
        batch_size=batch_size,
        noise_multiplier=sigma,
        l2_clip_norm=l2_clip_norm,
    )
    return sigma, actual


def hessian_top_eigenvalue(
    loss_fn, params: Any, *args, iters: int = 100, rtol: float = 1e-3, seed: int = 0
) -> tuple[float, int, bool]:
    """The top eigenvalue λ_max of the Hessian of ``loss_fn(params, *args)`` in ``params``, by power iteration.

    Each iteration is one Hessian-vector product (forward-over-reverse: ``jvp`` of
    ``grad``), so the Hessian is never formed. Power iteration finds the eigenvalue of
    largest magnitude; near a minimum of a training loss that is the top (positive)
    one, the curvature that decides whether gradient descent with step η is stable
    (η·λ_max < 2) and whether Langevin dynamics with step η samples its target (η·λ_max
    well below 1). Stops when the residual ‖Hv − λv‖ is at most ``rtol``·|λ| (a small
    change of the estimate alone is not enough: with close top eigenvalues it stalls
    below λ_max). Pass the data as ``args`` (not closed over), so that XLA does not
    constant-fold it into the compiled product.

    Returns:
      ``(lambda_max, iterations, converged)``; ``converged`` is False when ``iters`` ran
      out first (the estimate is then a lower bound on |λ_max| in expectation, not a value).
    """
    flat, unravel = ravel_pytree(params)
    flat = flat.astype(jnp.float32)
    hvp = _hvp(loss_fn, unravel, jax.tree_util.tree_structure(params), flat.shape)

    # A public starting direction (no secret involved): any seed gives the same eigenvalue.
    v = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
    v = v / jnp.linalg.norm(v)
    lam = 0.0
    for i in range(1, iters + 1):
        hv = hvp(flat, v, *args)
        lam = float(jnp.vdot(v, hv))
        residual = float(jnp.linalg.norm(hv - lam * v))
        if residual <= rtol * abs(lam):
            return lam, i, True
        v = hv / jnp.linalg.norm(hv)
    return lam, iters, False


_HVPS: dict = {}


def _hvp(loss_fn, unravel, treedef, shape):
    """The jitted Hessian-vector product of ``loss_fn`` at parameters of this structure, compiled once.

    Keyed by the loss and the parameters' tree structure and flat size, so the same loss at
    parameters of another shape gets its own ``unravel`` (a run measures the same shapes twice).
    """
    key = (loss_fn, treedef, shape)
    if key not in _HVPS:
        _HVPS.clear()  # one loss at a time: a finished run's compiled product is not kept alive

        @jax.jit
        def hvp(w, v, *a):
            return jax.jvp(jax.grad(lambda u: loss_fn(unravel(u), *a)), (w,), (v,))[1]

        _HVPS[key] = hvp
    return _HVPS[key]


def loss_plateau_epoch(losses, *, window: int = 5, fraction: float = 0.95) -> int:
    """The first epoch (1-based) by which the training loss has made ``fraction`` of its total decrease.

    ``losses`` are the per-epoch training losses (``metrics.jsonl``'s ``loss``); they are
    smoothed by a trailing mean over ``window`` epochs first, so that one noisy epoch
    does not end the burn-in. "Total decrease" is from the first smoothed value to the
    smallest one.
    """
    x = np.asarray(losses, np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need the losses of >= 2 epochs, got {x.shape}.")
    smooth = _trailing_mean(x, window)
    target = smooth[0] - fraction * (smooth[0] - smooth.min())
    return int(np.argmax(smooth <= target)) + 1


def burn_in_tail_drop(losses, burn_in_epochs: int, window: int = 5, tail: float = 0.2) -> float:
    """The share of the burn-in's loss decrease made in its last ``tail`` (smoothed over ``window`` epochs).

    Near 0: the training loss had plateaued before the sampling began; well above 0.05: it was
    still falling, and the burn-in was too short.
    """
    smooth = _trailing_mean(np.asarray(losses[:burn_in_epochs], np.float64), window)
    start = int(round((1 - tail) * len(smooth))) - 1
    total = smooth[0] - smooth[-1]
    return float((smooth[start] - smooth[-1]) / total) if total > 0 else 0.0


def _trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean of each epoch's value and the ``window - 1`` before it (fewer at the start)."""
    return np.array([x[max(0, i - window + 1) : i + 1].mean() for i in range(len(x))])


def _running_mean(mean: np.ndarray | None, new: np.ndarray, count: int) -> np.ndarray:
    """The mean of ``count`` samples from that of the first ``count - 1`` (``None`` before the first)."""
    if mean is None:
        return new
    mean += (new - mean) / count
    return mean


class PosteriorPredictive(TrainCallback):
    """Collect thinned posterior samples after burn-in as running means of predictive probabilities.

    Memory-light: only the mean softmax over samples on the evaluation inputs is
    kept (on the host), plus, at the end, the final iterate's logits for comparison
    (and for temperature scaling). The running means are part of every training
    checkpoint (a resumed run continues them), and at the end the test one is also
    saved with orbax under ``workdir/posterior_predictive``.

    Args:
      burn_in: steps before the first sample (all of them are still accounted).
      thin: keep every ``thin``-th step after burn-in.
      split: which inputs to predict on ("test").
      holdout: optional ``(x, y)`` of a split held out of the training data: its
        running mean and the final logits on it are kept too (e.g. to fit a temperature).
      curvature: optional ``(x, y, weight_decay)``: at the end of burn-in and at the
        last step, the top Hessian eigenvalue of the training loss on these examples
        (mean cross-entropy + ``weight_decay``/2 ‖θ‖², the loss the optimizer's step
        descends) is measured (:func:`hessian_top_eigenvalue`). It reads training data
        without noise, so it is a diagnostic not covered by ε.
      num_bins: ECE bins for the ECE-vs-number-of-samples curve on the test split.
      curvature_at_burn_in: measure λ_max at the end of burn-in too (not only at the last step).
      l2_clip_norm: with ``curvature``, also measure at the last step the mean squared clipped
        per-example gradient norm E[min(‖g_i‖, C)²] on those examples (without the prior
        term): the size of the minibatch noise beside the privacy noise (see the README).
    """

    def __init__(
        self,
        *,
        burn_in: int,
        thin: int = 1,
        split: str = "test",
        holdout: tuple | None = None,
        curvature: tuple | None = None,
        num_bins: int = 15,
        curvature_at_burn_in: bool = True,
        l2_clip_norm: float | None = None,
    ):
        if burn_in < 0 or thin < 1:
            raise ValueError(f"burn_in={burn_in!r} must be >= 0 and thin={thin!r} >= 1.")
        self.burn_in, self.thin, self.split = burn_in, thin, split
        self.holdout, self.curvature, self.num_bins = holdout, curvature, num_bins
        self.curvature_at_burn_in = curvature_at_burn_in
        self.l2_clip_norm = l2_clip_norm
        self.clipped_sq_norm: float | None = None
        self.count = 0
        self.mean_probs: np.ndarray | None = None
        self.holdout_mean_probs: np.ndarray | None = None
        self.final_probs: np.ndarray | None = None
        self.final_logits: np.ndarray | None = None
        self.holdout_final_logits: np.ndarray | None = None
        self.lambda_max: dict = {}
        self.lambda_max_converged: dict = {}

    def on_start(self, *, predict_logits, dataset, plan) -> None:
        if self.burn_in >= plan.num_steps:
            raise ValueError(
                f"burn_in={self.burn_in} leaves no samples: the run has {plan.num_steps} steps; lower burn_in."
            )
        self._logits = jax.jit(predict_logits)
        self._x = getattr(dataset, f"x_{self.split}")
        self.labels = getattr(dataset, f"y_{self.split}")
        self._num_classes = dataset.num_classes
        self.steps = plan.num_steps
        self.max_samples = (plan.num_steps - self.burn_in - 1) // self.thin + 1
        self.ece_curve = np.full(self.max_samples, np.nan)
        if self.curvature is not None:
            xc, yc, wd = self.curvature
            self._curvature_data = (jnp.asarray(xc), jnp.asarray(yc))

            def cross_entropy(params, x, y):
                return optax.softmax_cross_entropy_with_integer_labels(predict_logits(params, x), y).mean()

            def loss(params, x, y):
                sq = sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params))
                return cross_entropy(params, x, y) + 0.5 * wd * sq

            self._curvature_loss = loss
            if self.l2_clip_norm:  # the per-example norms of jaxdp's own clipping (norms before the clip)
                norms = clipped_grad(cross_entropy, l2_clip_norm=self.l2_clip_norm, return_norms=True)
                self._example_norms = jax.jit(lambda p, x, y: norms(p, x, y)[1].norms)

    def _probs(self, params, x) -> np.ndarray:
        return metrics.softmax(np.asarray(self._logits(params, x)))

    def _measure_curvature(self, name: str, params) -> None:
        if self.curvature is not None:
            lam, iters, converged = hessian_top_eigenvalue(self._curvature_loss, params, *self._curvature_data)
            self.lambda_max[name] = lam
            self.lambda_max_converged[name] = converged

    def on_step(self, step: int, params: Any) -> None:
        if step == self.burn_in and self.curvature_at_burn_in:
            self._measure_curvature("burn_in", params)
        if step <= self.burn_in or (step - self.burn_in - 1) % self.thin:
            return
        self.count += 1
        self.mean_probs = _running_mean(self.mean_probs, self._probs(params, self._x), self.count)
        self.ece_curve[self.count - 1] = metrics.expected_calibration_error(self.mean_probs, self.labels, self.num_bins)
        if self.holdout is not None:
            hp = self._probs(params, self.holdout[0])
            self.holdout_mean_probs = _running_mean(self.holdout_mean_probs, hp, self.count)

    def state_template(self, params: Any) -> Any:
        classes = self._num_classes
        nh = 0 if self.holdout is None else len(self.holdout[1])
        return {
            "mean_probs": np.zeros((len(self._x), classes)),
            "holdout_mean_probs": np.zeros((nh, classes)),
            "ece_curve": np.zeros(self.max_samples),
            "count": np.zeros((), np.int64),
            # λ_max at the end of burn-in (NaN until measured), so a run resumed after it still reports it.
            "lambda_max_burn_in": np.zeros((), np.float64),
            "lambda_max_burn_in_converged": np.zeros((), np.int64),
        }

    def state_dict(self) -> Any:
        template = self.state_template(None)
        return {
            "mean_probs": template["mean_probs"] if self.mean_probs is None else self.mean_probs,
            "holdout_mean_probs": template["holdout_mean_probs"]
            if self.holdout_mean_probs is None
            else self.holdout_mean_probs,
            "ece_curve": self.ece_curve,
            "count": np.asarray(self.count, np.int64),
            "lambda_max_burn_in": np.asarray(self.lambda_max.get("burn_in", np.nan), np.float64),
            "lambda_max_burn_in_converged": np.asarray(int(self.lambda_max_converged.get("burn_in", False))),
        }

    def load_state_dict(self, state: Any) -> None:
        self.count = int(state["count"])
        self.mean_probs = np.asarray(state["mean_probs"], np.float64) if self.count else None
        hm = np.asarray(state["holdout_mean_probs"], np.float64)
        self.holdout_mean_probs = hm if self.count and self.holdout is not None else None
        self.ece_curve = np.asarray(state["ece_curve"], np.float64)
        lam = float(state["lambda_max_burn_in"])
        if np.isfinite(lam):
            self.lambda_max["burn_in"] = lam
            self.lambda_max_converged["burn_in"] = bool(int(state["lambda_max_burn_in_converged"]))

    def on_end(self, params: Any, workdir: str) -> dict:
        import orbax.checkpoint as ocp

        self.final_logits = np.asarray(self._logits(params, self._x), np.float64)
        self.final_probs = metrics.softmax(self.final_logits)
        if self.holdout is not None:
            self.holdout_final_logits = np.asarray(self._logits(params, self.holdout[0]), np.float64)
        self._measure_curvature("final", params)
        if self.curvature is not None and self.l2_clip_norm:
            x, y = self._curvature_data
            norms = np.concatenate(
                [np.asarray(self._example_norms(params, x[i : i + 256], y[i : i + 256])) for i in range(0, len(y), 256)]
            )
            self.clipped_sq_norm = float(np.mean(np.minimum(norms, self.l2_clip_norm) ** 2))
        path = os.path.abspath(os.path.join(workdir, "posterior_predictive"))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(
            path,
            {"mean_probs": self.mean_probs.astype(np.float32), "count": np.int32(self.count)},
            force=True,
        )
        checkpointer.wait_until_finished()
        return {
            "posterior_samples": self.count,
            "posterior_predictive_path": path,
            **{f"lambda_max_{k}": v for k, v in self.lambda_max.items()},
            **{f"lambda_max_{k}_converged": v for k, v in self.lambda_max_converged.items()},
            **({"clipped_sq_norm_final": self.clipped_sq_norm} if self.clipped_sq_norm is not None else {}),
            # Computed from training data without noise: diagnostics, not covered by epsilon.
            "not_covered_by_epsilon": [f"lambda_max_{k}" for k in self.lambda_max]
            + (["clipped_sq_norm_final"] if self.clipped_sq_norm is not None else []),
        }
