"""Choosing BandMF's band count b: calibration (here) times strategy error (:mod:`jaxdp.noise.bandmf`).

Place in the data path: before it, with calibration. It runs on the host when a
run is planned and answers which ``bands`` to put in the plan; the noise package
only supplies the strategies and their error, and never imports this (noise is
device math, accounting is bookkeeping).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxdp import rules
from jaxdp.accounting._calibrate import calibrate_noise_multiplier, check_steps
from jaxdp.noise.bandmf import optimal_coefficients, prefix_sum_error

__all__ = ["choose_bands"]


def choose_bands(
    target_epsilon: float,
    delta: float,
    *,
    dataset_size: int,
    batch_size: int,
    num_steps: int,
    candidates: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    accountant: str = "rdp",
) -> tuple[int, dict[int, float]]:
    """The band count b (1 = DP-SGD) with the smallest predicted error at a target ε, and every candidate's.

    For each b the noise multiplier σ_b is calibrated to the target with the
    amplified-BandMF accounting (cyclic Poisson over b groups, rate bB/N,
    ceil(T/b) rounds); the predicted error is ``σ_b² · prefix_sum_error(c_b, T)``
    with the optimised strategy ``c_b`` (:func:`jaxdp.noise.bandmf.optimal_coefficients`),
    reported relative to DP-SGD's (b = 1). Amplification weakens as b grows (each
    group is sampled at b times the rate), so at small ε and small data the answer
    is often b = 1, as in Choquette-Choo et al. (2023), who pick b per setting the
    same way.

    Returns:
      ``(best_b, {b: error relative to DP-SGD})`` over the candidates that fit
      (``b * batch_size <= dataset_size`` and ``b <= num_steps``).

    Raises:
      ValueError: for a candidate that is not a positive int, ``num_steps`` not
        a positive int, or a target calibration refuses.
    """
    if isinstance(num_steps, np.integer):
        num_steps = int(num_steps)
    t = check_steps(num_steps, "num_steps")
    bands = {1, *(rules.check_bands(b) for b in candidates)}
    rel: dict[int, float] = {}
    base = None
    for b in sorted(bands):
        if b * batch_size > dataset_size or b > t:
            continue
        sigma = calibrate_noise_multiplier(
            target_epsilon,
            delta,
            b * batch_size / dataset_size,
            t,
            accountant=accountant,
            sampling="cyclic_poisson",
            bands=b,
        )
        err = sigma**2 * prefix_sum_error(optimal_coefficients(t, b), t)
        base = err if b == 1 else base
        rel[b] = err / base
    best = min(rel, key=rel.get)
    return best, rel
