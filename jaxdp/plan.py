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
import time
from collections.abc import Callable, Sequence
from typing import Any

import dp_accounting
import jax
import optax

from jaxdp import rules
from jaxdp.accounting import (
    Accountant,
    calibrate_noise_multiplier,
    dp_event,
    make_accountant,
    max_steps,
    require_upper_bound,
)
from jaxdp.clipping import ClippedGradFn, ExampleGradFn, clipped_grad
from jaxdp.noise import privatize, privatize_banded
from jaxdp.sampling import CyclicPoissonSampler, PoissonSampler, ShuffleSampler, steps_per_epoch

__all__ = ["PrivacyPlan", "steps_per_epoch"]


def _check_positive_int(name: str, value: Any, default: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int; pass e.g. {name}={default}.")


def _check_batch_fits(batch_size: int, dataset_size: int) -> None:
    if batch_size > dataset_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the dataset ({dataset_size} examples); "
            f"choose batch_size <= {dataset_size}."
        )


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
        :func:`jaxdp.noise.bandmf.optimal_coefficients` (cached).

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
        _check_positive_int("dataset_size", self.dataset_size, 60000)
        _check_positive_int("batch_size", self.batch_size, 256)
        _check_batch_fits(self.batch_size, self.dataset_size)
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 0:
            raise ValueError(f"num_steps={self.num_steps!r} must be an int >= 0 (the noisy steps the run takes).")
        # The privacy rules (jaxdp.rules): one function and one message each, shared by every entry point.
        object.__setattr__(self, "l2_clip_norm", rules.check_clip_norm(self.l2_clip_norm))
        object.__setattr__(self, "noise_multiplier", rules.check_noise_multiplier(self.noise_multiplier))
        rules.check_sampling(self.sampling)
        rules.check_shuffle_noise(self.sampling, self.noise_multiplier)
        require_upper_bound(self.accountant)  # unknown names and approximations are refused
        object.__setattr__(self, "bands", rules.check_bands(self.bands))
        rules.check_bands_sampling(self.bands, self.sampling)
        if self.sampling == "cyclic_poisson":
            rules.check_bands_fit(self.bands, self.batch_size, self.dataset_size)
        if self.noise_coefficients is not None:
            from jaxdp.noise.bandmf import check_coefficients

            c = check_coefficients(self.noise_coefficients)
            if len(c) != self.bands:
                raise ValueError(
                    f"noise_coefficients has {len(c)} entries but bands={self.bands}; pass exactly b coefficients."
                )
            object.__setattr__(self, "noise_coefficients", tuple(float(v) for v in c))

    @classmethod
    def from_target(
        cls,
        *,
        dataset_size: int,
        batch_size: int,
        l2_clip_norm: float,
        planned_steps: int,
        delta: float,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        per_layer: bool = False,
        sampling: str = "poisson",
        accountant: str = "rdp",
        bands: int = 1,
        prefix: str = "",
        verbose: bool = False,
    ) -> PrivacyPlan:
        """The plan for a privacy target: σ calibrated to ``target_epsilon``, or given and budget-capped.

        * ``noise_multiplier`` None, ``target_epsilon`` set: σ is the smallest that
          spends at most the target at ``delta`` over all ``planned_steps``.
        * both set: σ as given; if the target would be exceeded, the plan keeps only
          the steps that fit (``num_steps < planned_steps``: the run stops there).
        * ``target_epsilon`` None: σ as given (0 = no noise, no privacy).

        ``bands > 1`` with ``sampling="poisson"`` means cyclic Poisson over b groups
        (BandMF). ``prefix`` is put before the privacy argument names in messages
        (``"privacy."`` for a config); ``verbose`` prints the calibration and the cap.
        Raises ValueError naming the value and the fix.
        """
        p = prefix
        _check_positive_int("dataset_size", dataset_size, 60000)
        _check_positive_int("batch_size", batch_size, 256)
        _check_positive_int("planned_steps", planned_steps, 1000)
        _check_batch_fits(batch_size, dataset_size)
        rules.check_clip_norm(l2_clip_norm, f"{p}l2_clip_norm")
        if noise_multiplier is not None:
            noise_multiplier = rules.check_noise_multiplier(noise_multiplier, f"{p}noise_multiplier")
        target = rules.check_target_epsilon(target_epsilon, f"{p}target_epsilon")
        delta = rules.check_delta(delta, dataset_size=dataset_size, name=f"{p}delta")
        bands = rules.check_bands(bands, f"{p}bands")
        if bands > 1 and sampling == "poisson":
            sampling = "cyclic_poisson"
        rules.check_sampling(sampling)
        rules.check_bands_sampling(bands, sampling, prefix=p)
        rules.check_bands_fit(bands, batch_size, dataset_size, prefix=p)
        try:  # unknown names and approximations (gdp) cannot back a run's guarantee
            require_upper_bound(accountant)
        except ValueError as e:
            raise ValueError(f"{p}{e}") from None
        rules.check_shuffle_noise(sampling, noise_multiplier, target, prefix=p)
        q = bands * batch_size / dataset_size
        sigma, steps = noise_multiplier, planned_steps
        if sigma is None:
            if target is None:
                raise ValueError(
                    f"{p}target_epsilon and {p}noise_multiplier are both None; set a target epsilon "
                    "(sigma is then calibrated) or a noise multiplier."
                )
            t0 = time.perf_counter()
            sigma = calibrate_noise_multiplier(
                target, delta, q, planned_steps, accountant=accountant, sampling=sampling, bands=bands
            )
            if verbose:
                print(
                    f"jaxdp: calibrated sigma={sigma:.4f}: the smallest noise with epsilon <= {target} at "
                    f"delta={delta:g} over {planned_steps} steps (q={q:.4f}, {accountant}; took "
                    f"{time.perf_counter() - t0:.2f} s)",
                    flush=True,
                )
        elif target is not None:
            if sigma == 0:
                raise ValueError(
                    f"{p}noise_multiplier=0 adds no noise, so {p}target_epsilon={target} cannot be met; "
                    f"set {p}noise_multiplier=None to calibrate it, or {p}target_epsilon=None for a "
                    "non-private run."
                )
            steps = max_steps(
                target, delta, q, sigma, accountant=accountant, limit=planned_steps, sampling=sampling, bands=bands
            )
            if steps == 0:
                raise ValueError(
                    f"{p}noise_multiplier={sigma} spends more than {p}target_epsilon={target} in a single "
                    "step; raise the noise multiplier or the target."
                )
            if steps < planned_steps and verbose:
                print(
                    f"jaxdp: budget: sigma={sigma} reaches epsilon={target} after {steps} of the {planned_steps} "
                    "planned steps; the run will stop there.",
                    flush=True,
                )
        return cls(
            dataset_size=dataset_size,
            batch_size=batch_size,
            l2_clip_norm=float(l2_clip_norm),
            noise_multiplier=float(sigma),
            num_steps=steps,
            per_layer=bool(per_layer),
            sampling=sampling,
            accountant=accountant,
            bands=bands,
        )

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

        from jaxdp.noise.bandmf import optimal_coefficients

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
        return dp_event(self.sampling_rate, self.noise_multiplier, steps, bands=self.bands)

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
        delta = rules.check_delta(delta, dataset_size=self.dataset_size)  # δ ∈ (0, 1) and δ <= 1/N
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
