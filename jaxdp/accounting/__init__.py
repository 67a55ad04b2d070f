"""Privacy accounting through Google's dp-accounting.

This first piece only turns the plan's ``DpEvent`` into an epsilon with the RDP
accountant; the pluggable accountant registry and calibration build on it.
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting import rdp

__all__ = ["RDP_ORDERS", "rdp_epsilon"]

# Integer Renyi orders (plus a few large ones). dp-accounting's default list also
# has fractional orders below 2 whose series often fail to converge (and log a
# warning each time) for large sampling rates; they are excluded anyway.
RDP_ORDERS: tuple[float, ...] = tuple(range(2, 257)) + (320, 512, 1024)


def rdp_epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
    """Epsilon of ``event`` at ``delta`` with dp-accounting's RDP accountant.

    Raises:
      ValueError: if ``delta`` is not in (0, 1).
    """
    if not (0.0 < float(delta) < 1.0):
        raise ValueError(f"delta={delta!r} must lie in (0, 1); typical values are below 1/dataset_size.")
    accountant = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(event)
    eps = accountant.get_epsilon(delta)
    return math.inf if eps is None else float(eps)
