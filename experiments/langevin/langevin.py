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
import numpy as np

from jaxdp.train import TrainCallback

__all__ = ["PosteriorPredictive", "learning_rate_for_temperature", "noise_for_temperature", "temperature"]


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


class PosteriorPredictive(TrainCallback):
    """Collect thinned posterior samples after burn-in as a running mean of predictive probabilities.

    Memory-light: only the mean softmax over samples on the evaluation inputs is
    kept (on the host), plus the final-iterate probabilities for comparison. The
    running mean is part of every training checkpoint (a resumed run continues
    it), and at the end it is also saved with orbax under
    ``workdir/posterior_predictive``.

    Args:
      burn_in: steps before the first sample (all of them are still accounted).
      thin: keep every ``thin``-th step after burn-in.
      split: which inputs to predict on ("test").
    """

    def __init__(self, *, burn_in: int, thin: int = 1, split: str = "test"):
        if burn_in < 0 or thin < 1:
            raise ValueError(f"burn_in={burn_in!r} must be >= 0 and thin={thin!r} >= 1.")
        self.burn_in, self.thin, self.split = burn_in, thin, split
        self.count = 0
        self.mean_probs: np.ndarray | None = None
        self.final_probs: np.ndarray | None = None

    def on_start(self, *, predict_logits, dataset, plan) -> None:
        if self.burn_in >= plan.num_steps:
            raise ValueError(
                f"burn_in={self.burn_in} leaves no samples: the run has {plan.num_steps} steps; lower burn_in."
            )
        self._predict = jax.jit(lambda p, x: jax.nn.softmax(predict_logits(p, x), axis=-1))
        self._x = getattr(dataset, f"x_{self.split}")
        self.labels = getattr(dataset, f"y_{self.split}")
        self._num_classes = dataset.num_classes
        self.steps = plan.num_steps

    def on_step(self, step: int, params: Any) -> None:
        if step <= self.burn_in or (step - self.burn_in - 1) % self.thin:
            return
        probs = np.asarray(self._predict(params, self._x), np.float64)
        self.count += 1
        if self.mean_probs is None:
            self.mean_probs = probs
        else:
            self.mean_probs += (probs - self.mean_probs) / self.count

    def state_template(self, params: Any) -> Any:
        classes = self._num_classes
        return {"mean_probs": np.zeros((len(self._x), classes)), "count": np.zeros((), np.int64)}

    def state_dict(self) -> Any:
        template = self.state_template(None)
        mean = template["mean_probs"] if self.mean_probs is None else self.mean_probs
        return {"mean_probs": mean, "count": np.asarray(self.count, np.int64)}

    def load_state_dict(self, state: Any) -> None:
        self.count = int(state["count"])
        self.mean_probs = np.asarray(state["mean_probs"], np.float64) if self.count else None

    def on_end(self, params: Any, workdir: str) -> dict:
        import orbax.checkpoint as ocp

        self.final_probs = np.asarray(self._predict(params, self._x), np.float64)
        path = os.path.abspath(os.path.join(workdir, "posterior_predictive"))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(
            path,
            {"mean_probs": self.mean_probs.astype(np.float32), "count": np.int32(self.count)},
            force=True,
        )
        checkpointer.wait_until_finished()
        return {"posterior_samples": self.count, "posterior_predictive_path": path}
