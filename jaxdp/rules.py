"""jaxdp's privacy rules: each one function, one message, and every entry point calls it.

:class:`jaxdp.PrivacyPlan` applies all of them together (a plan that exists is
valid); the primitives (:func:`jaxdp.clipped_grad`, :func:`jaxdp.privatize`,
the accountants, ``jaxdp account``, ``jaxdp audit``) and the config check of
``jaxdp train`` call the ones that concern them. ``name`` is the key the caller
knows the value by (``"privacy.l2_clip_norm"`` for a config), so the one message
names what to change.

This module imports nothing from jaxdp, so anything may import it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = [
    "SAMPLINGS",
    "check_bands",
    "check_bands_fit",
    "check_bands_sampling",
    "check_clip_norm",
    "check_delta",
    "check_noise_multiplier",
    "check_sampling",
    "check_sampling_rate",
    "check_shuffle_noise",
    "check_target_epsilon",
    "positive_finite",
]

#: The samplers a plan can be built on (only the Poisson ones are accounted for).
SAMPLINGS = ("poisson", "shuffle", "cyclic_poisson")

_FIXES = {
    "sampling_rate": "pass q = expected batch size / dataset size, e.g. 256/60000",
    "epsilon": "pass epsilon >= 0, e.g. 1.0",
    "target_tpr": "pass e.g. target_tpr=0.05",
}


def _number(value: Any) -> float:
    """``float(value)`` for a real number (Python, NumPy, 0-d array); NaN for anything else (str, bool, None)."""
    if isinstance(value, (bool, str, bytes)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def positive_finite(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (``>= 0`` with ``allow_zero``), or a ValueError naming ``name``."""
    v = _number(value)
    if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        short = name.rpartition(".")[2]
        fix = _FIXES.get(short, f"pass a finite {short} {bound}")
        raise ValueError(f"{name}={value!r} must be a finite number {bound}; {fix}.")
    return v


def check_clip_norm(value: Any, name: str = "l2_clip_norm") -> float:
    """The clipping bound C: a finite number > 0 (it is the sensitivity of the clipped sum)."""
    v = _number(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(
            f"{name}={value!r} is not a finite positive number. The clipping bound C sets the sensitivity of the "
            f"gradient sum, so it must satisfy 0 < C < inf; pass e.g. {name}=1.0."
        )
    return v


def check_noise_multiplier(value: Any, name: str = "noise_multiplier", *, allow_zero: bool = True) -> float:
    """σ: a finite number >= 0 (0 = no noise, no privacy); > 0 where there is privacy to account for
    (``allow_zero=False``: accountants, ``jaxdp account``)."""
    v = _number(value)
    if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
        what = (
            ">= 0 (0 means no noise and no privacy)"
            if allow_zero
            else "> 0 (a run without noise has no epsilon to account for)"
        )
        raise ValueError(f"{name}={value!r} must be a finite number {what}; pass e.g. {name}=1.0.")
    return v


def check_target_epsilon(value: Any, name: str = "target_epsilon", *, allow_none: bool = True) -> float | None:
    """A privacy budget ε: a finite number > 0, or None (no target) where that is allowed."""
    if value is None and allow_none:
        return None
    v = _number(value)
    if not (math.isfinite(v) and v > 0):
        none = "None (no target) or " if allow_none else ""
        raise ValueError(f"{name}={value!r} is invalid: the target must be {none}a finite number > 0 (e.g. 3.0).")
    return v


def check_sampling_rate(value: Any, name: str = "sampling_rate") -> float:
    """q in (0, 1]."""
    q = positive_finite(name, value)
    if q > 1:
        raise ValueError(f"{name}={value!r} must lie in (0, 1]; {_FIXES['sampling_rate']}.")
    return q


def check_delta(
    delta: Any, *, dataset_size: int | None = None, sampling_rate: float | None = None, name: str = "delta"
) -> float:
    """jaxdp's one rule for δ; training, plans, accountants, calibration, audits and ``jaxdp account`` all call it.

    * δ must be a number in (0, 1).
    * With ``dataset_size`` N known: δ > 1/N is refused. A mechanism that
      publishes one random example in the clear is (0, 1/N)-DP, so such a δ
      promises nothing.
    * Without N but with the sampling rate q: δ > q is refused. Every jaxdp run
      has an expected batch q·N >= 1, so N >= 1/q and δ > q is above 1/N for
      every dataset the run could have (training would refuse it). δ in
      (1/N, q] cannot be caught without N: pass it where you can.

    Returns δ as a float; raises ValueError naming δ, the bound and the fix.
    """
    d = _number(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(
            f"{name}={delta!r} must lie in (0, 1); use a value well below 1/N, N the dataset size (e.g. 1e-5)."
        )
    if dataset_size is not None:
        n = int(dataset_size)
        if d > 1.0 / n:
            raise ValueError(
                f"{name}={delta!r} is larger than 1/N = 1/{n} (N = dataset size): a delta that large allows leaking "
                f"a few examples outright, so the (epsilon, delta) claim would mean little. Choose delta well below "
                f"1/N (e.g. 1e-5, or 1/N^1.1 = {n**-1.1:.2g})."
            )
    elif sampling_rate is not None and d > sampling_rate:
        raise ValueError(
            f"{name}={delta!r} is larger than the sampling rate q = {sampling_rate:.6g}, so it is larger than 1/N "
            f"for every dataset this run could have (an expected batch q*N >= 1 means N >= 1/q = "
            f"{1 / sampling_rate:.6g}): a delta that large allows leaking examples outright. Choose delta well below "
            "1/N (e.g. 1e-5); where N is known (PrivacyPlan.epsilon, jaxdp train, jaxdp account --dataset-size) "
            "delta <= 1/N is checked exactly."
        )
    return d


def check_sampling(sampling: Any, name: str = "sampling") -> str:
    """One of :data:`SAMPLINGS`."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"{name}={sampling!r} is not supported by the privacy plan; use one of {SAMPLINGS}.")
    return sampling


def check_shuffle_noise(
    sampling: str, noise_multiplier: float | None, target_epsilon: float | None = None, prefix: str = ""
) -> None:
    """Shuffled fixed-size batches have no amplification analysis here: they are for non-private runs only
    (``noise_multiplier`` 0 and no ``target_epsilon``)."""
    if sampling == "shuffle" and (noise_multiplier != 0 or target_epsilon is not None):
        p = prefix
        target = "" if target_epsilon is None else f" and {p}target_epsilon={target_epsilon}"
        raise ValueError(
            f"sampling='shuffle' with {p}noise_multiplier={noise_multiplier}{target}: shuffled fixed-size batches "
            "have no amplification analysis here, so no epsilon could be claimed for them; use sampling='poisson' "
            f"for private runs (shuffle is for non-private runs: {p}noise_multiplier=0 and {p}target_epsilon=None)."
        )


def check_bands(bands: Any, name: str = "bands") -> int:
    """b: a positive int (1 = DP-SGD, b > 1 = b-banded correlated noise, BandMF)."""
    if isinstance(bands, bool) or not isinstance(bands, numbers.Integral) or bands < 1:
        raise ValueError(f"{name}={bands!r} must be a positive int (1 = DP-SGD, b > 1 = b-banded correlated noise).")
    return int(bands)


def check_bands_sampling(bands: int, sampling: str, prefix: str = "") -> None:
    """b > 1 is private as accounted only when each example's participations are at least b steps apart."""
    if bands > 1 and sampling != "cyclic_poisson":
        raise ValueError(
            f"{prefix}bands={bands} with sampling={sampling!r}: b-banded correlated noise is only private as accounted "
            "when each example's participations are at least b steps apart; ordinary Poisson or shuffled batches "
            "break that. Use sampling='cyclic_poisson' (jaxdp train: privacy.bands with sampling='poisson' runs as "
            "cyclic Poisson), or bands=1 for DP-SGD."
        )


def check_bands_fit(bands: int, batch_size: int, dataset_size: int, prefix: str = "") -> None:
    """Cyclic Poisson samples the expected batch from one of b groups of N/b examples: b·B <= N."""
    if bands * batch_size > dataset_size:
        raise ValueError(
            f"{prefix}bands={bands} x batch_size={batch_size} exceeds dataset_size={dataset_size}: cyclic Poisson samples "
            f"the expected batch from one of b groups of N/b examples; use {prefix}bands <= {dataset_size // batch_size} "
            "or a smaller batch_size."
        )
