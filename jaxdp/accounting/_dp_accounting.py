"""``rdp`` and ``pld``: Google's dp-accounting, never hand-written formulas."""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import dp_accounting
from dp_accounting import rdp
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from jaxdp.accounting._base import Accountant, register_accountant

__all__ = ["PldAccountant", "RdpAccountant", "dp_event"]


def dp_event(sampling_rate: float, noise_multiplier: float, steps: int, *, bands: int = 1) -> dp_accounting.DpEvent:
    """``steps`` steps of DP-SGD (``bands=1``) or of amplified b-banded MF with cyclic Poisson sampling.

    DP-SGD: ``steps`` compositions of the Poisson-subsampled Gaussian. BandMF
    (b bands, strategy column norm 1, ``sampling_rate`` = the per-group rate):
    ``ceil(steps / b)`` compositions of the same event (see
    :class:`jaxdp.accounting.CyclicPoissonAccountant` for the theorem).
    """
    one = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(one, -(-steps // bands))


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting logs a warning per fractional RDP order it skips; those orders are just excluded."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class RdpAccountant(Accountant):
    """Rényi DP (dp-accounting's ``RdpAccountant``, its default orders), converted to (ε, δ)."""

    @functools.lru_cache(maxsize=8)  # noqa: B019 (a handful of step counts per accountant)
    def _composed(self, steps: int) -> rdp.RdpAccountant:
        accountant = rdp.RdpAccountant()
        with _quiet_absl():
            accountant.compose(dp_event(self.sampling_rate, self.noise_multiplier, steps))
        return accountant

    def epsilon_for(self, delta: float, steps: int) -> float:
        if steps == 0:
            return 0.0
        with _quiet_absl():
            return float(self._composed(steps).get_epsilon(delta))

    def delta_for(self, epsilon: float, steps: int) -> float:
        if steps == 0:
            return 0.0
        with _quiet_absl():
            return float(self._composed(steps).get_delta(epsilon))


class PldAccountant(Accountant):
    """Privacy loss distributions (dp-accounting), pessimistic discretisation: a tight upper bound.

    Args:
      value_discretization_interval: PLD grid step; smaller is tighter and slower
        (1e-4 default; every value stays an upper bound).
    """

    def __init__(self, *, value_discretization_interval: float = 1e-4, **kwargs):
        super().__init__(**kwargs)
        self.value_discretization_interval = float(value_discretization_interval)

    @functools.lru_cache(maxsize=8)  # noqa: B019 (a handful of step counts per accountant)
    def _pld(self, steps: int):
        one = pld_lib.from_gaussian_mechanism(
            self.noise_multiplier,
            sampling_prob=self.sampling_rate,
            value_discretization_interval=self.value_discretization_interval,
        )
        return one.self_compose(steps)

    def epsilon_for(self, delta: float, steps: int) -> float:
        if steps == 0:
            return 0.0
        eps = self._pld(steps).get_epsilon_for_delta(delta)
        return math.inf if eps is None else max(0.0, float(eps))

    def delta_for(self, epsilon: float, steps: int) -> float:
        if steps == 0:
            return 0.0
        return float(self._pld(steps).get_delta_for_epsilon(epsilon))

    def delta_curve(self, epsilons, steps: int):
        """δ(ε) for many ε at once (the privacy profile)."""
        return self._pld(steps).get_delta_for_epsilon(list(epsilons))


register_accountant("rdp", RdpAccountant)
register_accountant("pld", PldAccountant)
