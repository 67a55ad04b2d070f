"""``prv``: privacy random variables with Microsoft's ``prv-accountant``, the accountant Opacus uses by default.

Gopi, Lee & Wutschitz (2021), "Numerical composition of differential privacy":
the privacy loss of one Poisson-subsampled Gaussian step is discretised on a
grid, composed by FFT, and ε is read off with an explicit error bound.
prv-accountant returns ``(lower, estimate, upper)`` with the true ε between
``lower`` and ``upper``; ``prv`` reports **upper** (the conservative end; Opacus's
``PRVAccountant.get_epsilon`` returns the same), so it is an upper bound like
``rdp`` and ``pld``. The error settings are Opacus's: ``eps_error = 0.01`` and
``delta_error = δ / 1000`` for ε(δ), so an Opacus user sees the number they know.

On the reference run (q = 256/60000, σ = 1.1, 14,062 steps, δ = 1e-5) it gives
2.3715 / 2.3816 / 2.3917 (lower / estimate / upper) against ``pld``'s 2.3817, and
takes about 2 s (``pld``: 0.4 s). Its grid grows with the number of steps and with
ε; runs too long or too weakly noised for it are refused with a pointer to ``pld``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxdp.accounting._base import Accountant, TooCostly, register_accountant
from jaxdp.rules import positive_finite

__all__ = ["PrvAccountant"]

DELTA_ERROR_DIVISOR = 1000  # delta_error = δ / 1000 for ε(δ), as in Opacus and prv-accountant's own Accountant
# Additive error on δ(ε) (the privacy profile behind attack-risk reports): that of ε at δ = 1e-5, so the usual
# report (ε at 1e-5, then the profile) composes once.
PROFILE_DELTA_ERROR = 1e-5 / DELTA_ERROR_DIVISOR


def _prv_accountant():
    try:
        import prv_accountant
        from prv_accountant.accountant import compute_safe_domain_size
    except ImportError as e:  # a dependency of jaxdp; only missing from a broken install
        raise ImportError(
            "accountant='prv' needs the prv-accountant package: pip install 'prv-accountant>=0.2.0' "
            "(make install brings it), or use accountant='pld'."
        ) from e
    return prv_accountant, compute_safe_domain_size


class PrvAccountant(Accountant):
    """Privacy random variables (``prv-accountant``); reports the upper end of its error bound.

    Args:
      eps_error: the ε error prv-accountant guarantees (0.01, Opacus's default);
        the reported ε is at most about 2·eps_error above the true ε.
      delta_error: the δ error; ``None`` (default) = δ / 1000 for ε(δ), as Opacus,
        and 1e-8 (additive) for δ(ε).
      max_grid_points: refuse (ValueError) instead of building a larger grid
        (each point is a float64, and composition needs a few arrays of that size).
    """

    def __init__(
        self,
        *,
        eps_error: float = 0.01,
        delta_error: float | None = None,
        max_grid_points: int = 2 * 10**7,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.eps_error = positive_finite("eps_error", eps_error)
        self.delta_error = None if delta_error is None else positive_finite("delta_error", delta_error)
        self.max_grid_points = int(max_grid_points)

    def _error(self, delta: float | None) -> float:
        if self.delta_error is not None:
            return self.delta_error
        return PROFILE_DELTA_ERROR if delta is None else delta / DELTA_ERROR_DIVISOR

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a handful of step counts per accountant)
    def _composed(self, steps: int, delta_error: float):
        """The ``steps``-fold composed discrete PRV (prv-accountant's ``DiscretePrivacyRandomVariable``)."""
        prv_accountant, safe_domain = _prv_accountant()
        mechanism = prv_accountant.PoissonSubsampledGaussianMechanism(
            sampling_probability=self.sampling_rate, noise_multiplier=self.noise_multiplier
        )
        # Grid size before building it: half-width L from prv-accountant's own rule, mesh from
        # Thm. 5.5 of Gopi et al. (what PRVAccountant uses), so a huge grid is refused, not allocated.
        half_width = safe_domain([mechanism], [steps], eps_error=self.eps_error, delta_error=delta_error)
        mesh = self.eps_error / math.sqrt(steps / 2 * math.log(12 / delta_error))
        points = 2 * half_width / mesh
        if points > self.max_grid_points:
            raise TooCostly(
                f"accountant='prv' would need a grid of about {points:.3g} points for {steps} steps at "
                f"sampling_rate={self.sampling_rate:.6g}, noise_multiplier={self.noise_multiplier:.6g} "
                f"(max_grid_points={self.max_grid_points}); use accountant='pld' for runs this long or this "
                "weakly noised, or pass a larger max_grid_points if the memory is there."
            )
        accountant = prv_accountant.PRVAccountant(
            prvs=[mechanism], max_self_compositions=[steps], eps_error=self.eps_error, delta_error=delta_error
        )
        return accountant.compute_composition(num_self_compositions=[steps])

    def epsilon_interval(self, delta: float, steps: int) -> tuple[float, float, float]:
        """prv-accountant's ``(lower, estimate, upper)`` for ε after ``steps`` steps at ``delta``."""
        error = self._error(delta)
        lower, estimate, upper = self._composed(steps, error).compute_epsilon(delta, error, self.eps_error)
        return float(lower), float(estimate), float(upper)

    def epsilon_for(self, delta: float, steps: int) -> float:
        if steps == 0:
            return 0.0
        return max(0.0, self.epsilon_interval(delta, steps)[2])

    def delta_for(self, epsilon: float, steps: int) -> float:
        return float(self.delta_curve([epsilon], steps)[0])

    def delta_curve(self, epsilons, steps: int) -> np.ndarray:
        """Upper bounds on δ(ε) for many ε at once (the privacy profile), from one composition.

        prv-accountant's upper bound (``PRVAccountant.compute_delta``) is δ̂(ε − eps_error) + delta_error,
        with δ̂(x) = Σ_{t ≥ x} p(t) (1 − e^(x − t)) on the composed grid (its ``compute_delta_estimate``,
        one pass over the grid per ε); here all ε share two tail sums.
        """
        epsilons = np.asarray(epsilons, float)
        if steps == 0:
            return np.zeros_like(epsilons)
        error = self._error(None)
        composed = self._composed(steps, error)
        t, p = composed.domain.ts(), composed.pmf
        tail_p = np.append(np.cumsum(p[::-1])[::-1], 0.0)  # Σ_{j >= i} p_j
        tail_pe = np.append(np.cumsum((p * np.exp(-t))[::-1])[::-1], 0.0)  # Σ_{j >= i} p_j e^(-t_j)
        x = epsilons - self.eps_error
        i = np.searchsorted(t, x, side="left")  # first grid point with t >= x
        finite = np.clip(tail_p[i] - np.exp(x) * tail_pe[i], 0.0, 1.0)
        at_infinity = -math.expm1(composed.log_pmc_inf)  # mass at +inf (0 for the subsampled Gaussian)
        return np.minimum(1.0, finite * (1 - at_infinity) + at_infinity + error)


register_accountant("prv", PrvAccountant)
