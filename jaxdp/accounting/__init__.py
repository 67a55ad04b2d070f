"""Privacy accounting: pluggable accountants, calibration and attack-risk reports.

Accountants are picked by name (``rdp``, ``pld``, ``prv``, ``gdp``, or one you
register with :func:`register_accountant`). ``rdp`` and ``pld`` are Google's
dp-accounting; ``prv`` is Microsoft's prv-accountant (Opacus's default, reporting
the upper end of its error bound); ``gdp`` is the CLT approximation (reporting
only). :func:`check_delta` is the one rule for δ that every entry point applies
(it lives in :mod:`jaxdp.rules` with the other argument rules).
:func:`choose_bands` picks BandMF's band count at a target ε.

Example:
  >>> acc = make_accountant("pld", sampling_rate=256 / 60000, noise_multiplier=1.1)
  >>> acc.compose(14062).epsilon(1e-5)  # doctest: +SKIP
  2.3817
"""

from jaxdp.accounting._bandmf import choose_bands
from jaxdp.accounting._base import (
    Accountant,
    CyclicPoissonAccountant,
    available_accountants,
    make_accountant,
    register_accountant,
    require_upper_bound,
    unregister_accountant,
)
from jaxdp.accounting._calibrate import calibrate_noise_multiplier, max_epochs, max_steps
from jaxdp.accounting._dp_accounting import PldAccountant, RdpAccountant, dp_event
from jaxdp.accounting._gdp import GdpAccountant, gdp_delta, gdp_epsilon, gdp_mu
from jaxdp.accounting._prv import PrvAccountant
from jaxdp.accounting._risk import AttackRisk, attack_risk, calibrate_noise_multiplier_for_attack_risk, tpr_at_fpr
from jaxdp.rules import check_delta

__all__ = [
    "Accountant",
    "AttackRisk",
    "CyclicPoissonAccountant",
    "GdpAccountant",
    "PldAccountant",
    "PrvAccountant",
    "RdpAccountant",
    "attack_risk",
    "available_accountants",
    "calibrate_noise_multiplier",
    "calibrate_noise_multiplier_for_attack_risk",
    "check_delta",
    "choose_bands",
    "dp_event",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_mu",
    "make_accountant",
    "max_epochs",
    "max_steps",
    "register_accountant",
    "require_upper_bound",
    "tpr_at_fpr",
    "unregister_accountant",
]
