"""The frozen privacy plan: sampler + clipping + noise + accounting event, in one object.

Everything that changes the privacy claim lives here and nowhere else; the
training loop and every experiment build their pieces from a plan, so the
sampler that draws batches, the clipping bound, the noise and the ``DpEvent``
that is accounted for cannot drift apart. Performance settings (microbatch size,
physical batch size, sharding, dtype) are arguments of the builder methods and
never change the plan.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import dp_accounting
import jax
import optax

from jaxdp.accounting import Accountant, make_accountant
from jaxdp.accounting._base import check_delta, require_upper_bound
from jaxdp.accounting._dp_accounting import dp_event as _dp_event
from jaxdp.clipping import ClippedGradFn, ExampleGradFn, _check_clip_norm, clipped_grad
from jaxdp.noise import privatize, privatize_banded
from jaxdp.sampling import CyclicPoissonSampler, PoissonSampler, ShuffleSampler, steps_per_epoch

__all__ = ["PrivacyPlan", "steps_per_epoch"]

_SAMPLINGS = ("poisson", "shuffle", "cyclic_poisson")


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """What a private run promises, fixed before the first step.

    Attributes:
      dataset_size: N, the number of training examples.
      batch_size: expected batch size B (Poisson: sampling rate q = B / N).
      l2_clip_norm: C, per-example clipping bound.
      noise_multiplier: σ; the noise on the gradient sum has stddev σC.
      num_steps: number of noisy steps the run will take.
      per_layer: clip each parameter leaf to C/sqrt(K) instead of the whole
        gradient to C (same total sensitivity C).
      sampling: the batch sampler: ``"poisson"`` (accounted for), ``"shuffle"``
        (fixed-size batches, every example once per epoch; non-private runs only)
        or ``"cyclic_poisson"`` (b groups, step t Poisson-samples group t mod b
        with rate b·B/N; required by ``bands > 1``).
      accountant: name of the registered accountant that reports ε (``"rdp"``,
        ``"pld"``, ``"gdp"`` or your own).
      bands: b. 1 = DP-SGD (independent noise); b > 1 = banded matrix
        factorization (BandMF): noise correlated over the last b steps by a
        b-banded Toeplitz strategy, with cyclic Poisson sampling so that each
        example's participations are at least b steps apart, accounted by the
        amplified BandMF theorem (:class:`jaxdp.accounting.CyclicPoissonAccountant`).
      noise_coefficients: the strategy ``(c_0, ..., c_{b-1})`` with ‖c‖₂ = 1;
        ``None`` = optimised for ``(num_steps, bands)`` by
        :func:`jaxdp.bandmf.optimal_coefficients` (cached).

    Example:
      >>> plan = PrivacyPlan(dataset_size=60000, batch_size=256, l2_clip_norm=1.0,
      ...                    noise_multiplier=1.1, num_steps=2340)
      >>> round(plan.epsilon(1e-5), 1) < 5
      True
    """

    dataset_size: int
    batch_size: int
    l2_clip_norm: float
    noise_multiplier: float
    num_steps: int
    per_layer: bool = False
    sampling: str = "poisson"
    accountant: str = "rdp"
    bands: int = 1
    noise_coefficients: tuple[float, ...] | None = None

    def __post_init__(self):
        def positive_int(name, value, default):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int; pass e.g. {name}={default}.")

        positive_int("dataset_size", self.dataset_size, 60000)
        positive_int("batch_size", self.batch_size, 256)
        if self.batch_size > self.dataset_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the dataset ({self.dataset_size} examples); "
                f"choose batch_size <= {self.dataset_size}."
            )
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 0:
            raise ValueError(f"num_steps={self.num_steps!r} must be an int >= 0 (the noisy steps the run takes).")
        object.__setattr__(self, "l2_clip_norm", _check_clip_norm(self.l2_clip_norm))
        try:
            sigma = float(self.noise_multiplier)
        except (TypeError, ValueError):
            sigma = math.nan
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(
                f"noise_multiplier={self.noise_multiplier!r} must be a finite number >= 0 "
                "(0 means no noise and no privacy); pass e.g. noise_multiplier=1.0."
            )
        object.__setattr__(self, "noise_multiplier", sigma)
        if self.sampling not in _SAMPLINGS:
            raise ValueError(
                f"sampling={self.sampling!r} is not supported by the privacy plan; use one of {_SAMPLINGS}."
            )
        if self.sampling == "shuffle" and self.noise_multiplier > 0:
            raise ValueError(
                f"sampling='shuffle' with noise_multiplier={self.noise_multiplier}: shuffled fixed-size batches "
                "have no amplification analysis here, so no epsilon could be claimed for them; use "
                "sampling='poisson' for private runs (shuffle is for non-private runs, noise_multiplier=0)."
            )
        require_upper_bound(self.accountant)  # unknown names and approximations are refused
        positive_int("bands", self.bands, 1)
        if self.bands > 1 and self.sampling != "cyclic_poisson":
            raise ValueError(
                f"bands={self.bands} with sampling={self.sampling!r}: b-banded correlated noise is only private "
                "as accounted when each example's participations are at least b steps apart; ordinary Poisson "
                "or shuffled batches break that. Use sampling='cyclic_poisson' (or bands=1 for DP-SGD)."
            )
        if self.sampling == "cyclic_poisson" and self.bands * self.batch_size > self.dataset_size:
            raise ValueError(
                f"bands={self.bands} x batch_size={self.batch_size} exceeds dataset_size={self.dataset_size}: "
                "cyclic Poisson samples the expected batch from one of b groups of N/b examples; use "
                f"bands <= {self.dataset_size // self.batch_size} or a smaller batch_size."
            )
        if self.noise_coefficients is not None:
            from jaxdp.bandmf import check_coefficients

            c = check_coefficients(self.noise_coefficients)
            if len(c) != self.bands:
                raise ValueError(
                    f"noise_coefficients has {len(c)} entries but bands={self.bands}; pass exactly b coefficients."
                )
            object.__setattr__(self, "noise_coefficients", tuple(float(v) for v in c))

    @property
    def sampling_rate(self) -> float:
        """q = B / N; for cyclic Poisson the per-group rate b·B / N (group size ≈ N / b)."""
        return self.bands * self.batch_size / self.dataset_size

    @property
    def mechanism(self) -> str:
        """``"dpsgd"`` (independent noise, bands = 1) or ``"bandmf"`` (b-banded correlated noise)."""
        return "dpsgd" if self.bands == 1 else "bandmf"

    def strategy(self):
        """The strategy coefficients ``c`` (NumPy, ‖c‖₂ = 1): given, or optimised for this plan's steps."""
        import numpy as np

        from jaxdp.bandmf import optimal_coefficients

        if self.noise_coefficients is not None:
            return np.asarray(self.noise_coefficients)
        if self.bands == 1:
            return np.ones(1)
        return optimal_coefficients(max(self.num_steps, self.bands), self.bands)

    @property
    def l2_sensitivity(self) -> float:
        """Sensitivity of the clipped sum (add/remove one example)."""
        return self.l2_clip_norm

    # -- builders ----------------------------------------------------------
    def clipped_grad(
        self,
        loss_fn: Callable[..., Any],
        *,
        batch_argnums: int | Sequence[int] | None = None,
        has_aux: bool = False,
        microbatch_size: int | None = None,
        return_norms: bool = False,
        example_grad: ExampleGradFn | None = None,
        clipping_impl: str = "vmap",
    ) -> ClippedGradFn:
        """The plan's clipped-gradient function (performance knobs, and a per-example estimator, as arguments).

        ``example_grad`` (see :func:`jaxdp.clipped_grad`) changes *what* is clipped
        but only ever sees one example, so the sensitivity, and so the plan, is unchanged.
        ``clipping_impl`` ("vmap" | "ghost" | "auto") changes how the per-example norms
        are found, never what is clipped.
        """
        return clipped_grad(
            loss_fn,
            l2_clip_norm=self.l2_clip_norm,
            batch_argnums=batch_argnums,
            has_aux=has_aux,
            microbatch_size=microbatch_size,
            return_norms=return_norms,
            per_layer=self.per_layer,
            example_grad=example_grad,
            clipping_impl=clipping_impl,
        )

    def privatizer(self, key: jax.Array | int) -> optax.GradientTransformation:
        """The plan's noise transform: noisy sum divided by the expected batch size.

        DP-SGD (``bands = 1``, default coefficients): :func:`jaxdp.privatize`;
        otherwise :func:`jaxdp.privatize_banded` with :meth:`strategy`.
        """
        if self.bands > 1 or self.noise_coefficients is not None:
            return privatize_banded(
                l2_clip_norm=self.l2_clip_norm,
                noise_multiplier=self.noise_multiplier,
                expected_batch_size=self.batch_size,
                key=key,
                coefficients=self.strategy(),
            )
        return privatize(
            l2_clip_norm=self.l2_clip_norm,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.batch_size,
            key=key,
        )

    def sampler(
        self, *, seed: int, physical_batch_size: int | None = None, multiple_of: int = 1
    ) -> PoissonSampler | ShuffleSampler:
        """The batch sampler the accounting assumes."""
        if self.sampling == "cyclic_poisson":
            return CyclicPoissonSampler(
                dataset_size=self.dataset_size,
                bands=self.bands,
                sampling_rate=self.sampling_rate,
                physical_batch_size=physical_batch_size,
                seed=seed,
                multiple_of=multiple_of,
            )
        if self.sampling == "shuffle":
            return ShuffleSampler(
                dataset_size=self.dataset_size, batch_size=self.batch_size, seed=seed, multiple_of=multiple_of
            )
        return PoissonSampler(
            dataset_size=self.dataset_size,
            sampling_rate=self.sampling_rate,
            physical_batch_size=physical_batch_size,
            seed=seed,
            multiple_of=multiple_of,
        )

    # -- accounting ----------------------------------------------------------
    def dp_event(self, steps: int | None = None) -> dp_accounting.DpEvent:
        """The dp-accounting description of ``steps`` (default: all) steps of this plan."""
        steps = self._steps(steps)
        if self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        return _dp_event(self.sampling_rate, self.noise_multiplier, steps, bands=self.bands)

    def make_accountant(self) -> Accountant:
        """A fresh accountant (the plan's ``accountant``) for this plan's mechanism."""
        if self.noise_multiplier == 0:
            raise ValueError("noise_multiplier=0: a run without noise has no privacy to account for (epsilon = inf).")
        return make_accountant(
            self.accountant,
            sampling_rate=self.sampling_rate,
            noise_multiplier=self.noise_multiplier,
            sampling=self.sampling,
            bands=self.bands,
        )

    def epsilon(self, delta: float, steps: int | None = None) -> float:
        """ε spent after ``steps`` (default: all) steps at ``delta``; inf without noise.

        Raises ValueError for δ outside (0, 1) or δ > 1/dataset_size (a guarantee that
        allows publishing an example outright).
        """
        delta = check_delta(delta, dataset_size=self.dataset_size)  # δ ∈ (0, 1) and δ <= 1/N
        steps = self._steps(steps)
        if self.noise_multiplier == 0:
            return math.inf
        if steps == 0:
            return 0.0
        return self.make_accountant().epsilon_for(delta, steps)

    def _steps(self, steps: int | None) -> int:
        steps = self.num_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps={steps!r} must be an int >= 0 (default: the plan's num_steps).")
        return steps
