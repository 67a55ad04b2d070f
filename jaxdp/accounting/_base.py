"""The accountant protocol and the registry that picks accountants by name."""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "Accountant",
    "CyclicPoissonAccountant",
    "available_accountants",
    "check_delta",
    "make_accountant",
    "register_accountant",
]

SAMPLINGS = ("poisson",)

_REGISTRY: dict[str, type[Accountant]] = {}


_FIXES = {
    "noise_multiplier": "pass the noise multiplier sigma > 0 (e.g. 1.0); a run without noise has no epsilon to "
    "account for",
    "sampling_rate": "it is the probability that each example joins a step (expected batch size / dataset size, "
    "e.g. 256 / 60000)",
    "target_epsilon": "pass the privacy budget, e.g. target_epsilon=3.0",
    "epsilon": "pass epsilon >= 0, e.g. 1.0",
    "target_tpr": "pass e.g. target_tpr=0.05",
}


def _positive_finite(name: str, value: Any, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        fix = _FIXES.get(name, f"pass a finite {name} {bound}")
        raise ValueError(f"{name}={value!r} must be a finite number {bound}; {fix}.")
    return v


class TooCostly(ValueError):
    """An accountant cannot evaluate this many steps within its resource limit (not a bad argument)."""


def check_sampling_rate(value: Any) -> float:
    """q in (0, 1], or a ValueError that says what q is."""
    q = _positive_finite("sampling_rate", value)
    if q > 1:
        raise ValueError(f"sampling_rate={value!r} must lie in (0, 1]; {_FIXES['sampling_rate']}.")
    return q


def check_delta(delta: Any, *, dataset_size: int | None = None, sampling_rate: float | None = None) -> float:
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
    try:  # a number (Python, NumPy or a 0-d array), never a string or a bool
        d = math.nan if isinstance(delta, (bool, str, bytes)) else float(delta)
    except (TypeError, ValueError):
        d = math.nan
    if not 0.0 < d < 1.0:
        raise ValueError(
            f"delta={delta!r} must lie in (0, 1); use a value well below 1/N, N the dataset size (e.g. 1e-5)."
        )
    if dataset_size is not None:
        n = int(dataset_size)
        if d > 1.0 / n:
            raise ValueError(
                f"delta={delta!r} is larger than 1/N = 1/{n} (N = dataset size): a delta that large allows leaking "
                f"a few examples outright, so the (epsilon, delta) claim would mean little. Choose delta well below "
                f"1/N (e.g. 1e-5, or 1/N^1.1 = {n**-1.1:.2g})."
            )
    elif sampling_rate is not None and d > sampling_rate:
        raise ValueError(
            f"delta={delta!r} is larger than the sampling rate q = {sampling_rate:.6g}, so it is larger than 1/N for "
            f"every dataset this run could have (an expected batch q*N >= 1 means N >= 1/q = {1 / sampling_rate:.6g}): "
            "a delta that large allows leaking examples outright. Choose delta well below 1/N (e.g. 1e-5); where N "
            "is known (PrivacyPlan.epsilon, jaxdp train, jaxdp account --dataset-size) delta <= 1/N is checked exactly."
        )
    return d


class Accountant(abc.ABC):
    """Tracks the privacy spent by T steps of one Poisson-subsampled Gaussian mechanism.

    Every step uses sampling rate q and noise multiplier σ (the mechanism of a
    :class:`jaxdp.PrivacyPlan`), so the state is just the step count: saving and
    restoring it is exact.

    Subclasses implement :meth:`epsilon` and :meth:`delta` for a given number of
    steps and set ``is_upper_bound`` (``False`` for approximations such as the
    CLT-based ``gdp``, which training refuses to rely on).

    Args:
      sampling_rate: q in (0, 1].
      noise_multiplier: σ > 0.
      sampling: the sampler that produced the batches. Only ``"poisson"`` has an
        amplification analysis here; anything else is refused, so a run never
        claims more than its sampler gives.
    """

    name: ClassVar[str] = ""
    is_upper_bound: ClassVar[bool] = True

    def __init__(self, *, sampling_rate: float, noise_multiplier: float, sampling: str = "poisson"):
        self.sampling_rate = check_sampling_rate(sampling_rate)
        self.noise_multiplier = _positive_finite("noise_multiplier", noise_multiplier)
        if sampling not in SAMPLINGS:
            raise ValueError(
                f"sampling={sampling!r} cannot be accounted for: only Poisson sampling ('poisson') gets "
                "amplification by subsampling here. Shuffled fixed-size batches need a different analysis "
                "(dp-accounting's sampling-without-replacement event assumes independent draws per step, "
                "which shuffling is not); use Poisson sampling for private runs."
            )
        self.sampling = sampling
        self._steps = 0

    # -- composition -------------------------------------------------------
    @property
    def steps(self) -> int:
        """Steps composed so far."""
        return self._steps

    def compose(self, steps: int) -> Accountant:
        """Record ``steps`` more steps of the mechanism."""
        if isinstance(steps, np.integer):
            steps = int(steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps={steps!r} must be an int >= 0.")
        self._steps += steps
        return self

    def step(self) -> Accountant:
        """Record one step."""
        return self.compose(1)

    # -- queries ---------------------------------------------------------------
    @abc.abstractmethod
    def epsilon_for(self, delta: float, steps: int) -> float:
        """ε after ``steps`` steps at ``delta`` (does not change the state)."""

    @abc.abstractmethod
    def delta_for(self, epsilon: float, steps: int) -> float:
        """δ after ``steps`` steps at ``epsilon`` (does not change the state)."""

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before the first step)."""
        delta = check_delta(delta, sampling_rate=self.sampling_rate)
        return 0.0 if self._steps == 0 else float(self.epsilon_for(delta, self._steps))

    def delta(self, epsilon: float) -> float:
        """δ spent so far at ``epsilon`` (0 before the first step)."""
        epsilon = _positive_finite("epsilon", epsilon, allow_zero=True)
        return 0.0 if self._steps == 0 else float(self.delta_for(epsilon, self._steps))

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: the mechanism and the step count."""
        return {
            "name": self.name,
            "sampling_rate": self.sampling_rate,
            "noise_multiplier": self.noise_multiplier,
            "sampling": self.sampling,
            "steps": self._steps,
        }

    def load_state_dict(self, state: dict) -> Accountant:
        """Restore the step count; refuses a state of a different mechanism."""
        mine = self.state_dict()
        for key in ("name", "sampling_rate", "noise_multiplier", "sampling"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"accountant state has {key}={state.get(key)!r} but this accountant has {mine[key]!r}; "
                    "restore into an accountant built for the same mechanism."
                )
        steps = state.get("steps")
        if isinstance(steps, np.integer):
            steps = int(steps)  # e.g. after an orbax round trip
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"accountant state has steps={steps!r}; expected an int >= 0.")
        self._steps = steps
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sampling_rate={self.sampling_rate}, noise_multiplier={self.noise_multiplier}, "
            f"sampling={self.sampling!r}, steps={self._steps})"
        )


def register_accountant(name: str, cls: type[Accountant]) -> type[Accountant]:
    """Make ``cls`` available by ``name`` in configs, the CLI and calibration.

    Example:
      >>> class MyAccountant(jaxdp.accounting.Accountant):
      ...     def epsilon_for(self, delta, steps): ...
      ...     def delta_for(self, epsilon, steps): ...
      >>> jaxdp.accounting.register_accountant("mine", MyAccountant)
    """
    if not (isinstance(cls, type) and issubclass(cls, Accountant)):
        raise TypeError(f"{cls!r} is not a subclass of jaxdp.accounting.Accountant.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"accountant name {name!r} must be a non-empty string.")
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def accountant_class(name: str) -> type[Accountant]:
    """The registered class for ``name`` (ValueError naming the known ones otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(
            f"accountant={name!r} is not registered; choose one of {', '.join(available_accountants())} "
            "or register your own with jaxdp.accounting.register_accountant(name, cls)."
        )
    return _REGISTRY[name]


def require_upper_bound(name: str, allow_approximation: bool = False) -> None:
    """Refuse an approximate accountant (e.g. ``gdp``) where a guarantee is being set or claimed."""
    if not accountant_class(name).is_upper_bound and not allow_approximation:
        bounds = ", ".join(repr(n) for n in available_accountants() if accountant_class(n).is_upper_bound)
        raise ValueError(
            f"accountant={name!r} is an approximation, not an upper bound on epsilon, so it cannot set or claim a "
            f"run's guarantee; use one of the upper bounds {bounds}, e.g. 'pld': privacy.accountant='pld' in a "
            "config or override, --calibrate-with pld in jaxdp account (--accountant pld in jaxdp bench), "
            "accountant='pld' in Python. To see "
            f"{name}'s numbers beside a bound, report them: jaxdp account --accountants pld,{name}."
        )


def available_accountants() -> list[str]:
    """Registered accountant names."""
    return sorted(_REGISTRY)


def make_accountant(
    name: str,
    *,
    sampling_rate: float,
    noise_multiplier: float,
    sampling: str = "poisson",
    bands: int = 1,
    **options,
) -> Accountant:
    """Build a registered accountant by name (``options`` go to its constructor).

    ``sampling="cyclic_poisson"`` with ``bands=b`` accounts for amplified banded
    matrix factorization (:class:`CyclicPoissonAccountant`): ``sampling_rate`` is
    then the per-group rate and any registered accountant does the composition.
    """
    if isinstance(bands, np.integer):
        bands = int(bands)
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
        raise ValueError(f"bands={bands!r} must be a positive int (1 = DP-SGD).")
    if sampling == "cyclic_poisson":
        inner = accountant_class(name)(
            sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, sampling="poisson", **options
        )
        return CyclicPoissonAccountant(inner, bands=bands)
    if bands != 1:
        raise ValueError(
            f"bands={bands} with sampling={sampling!r}: b-banded correlated noise is only accounted for with "
            "b-min-separated participation; use sampling='cyclic_poisson' (PrivacyPlan(bands=b) does), or bands=1."
        )
    return accountant_class(name)(
        sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, sampling=sampling, **options
    )


class CyclicPoissonAccountant(Accountant):
    """Amplified BandMF: b-banded strategy (‖c‖₂ = 1) with cyclic Poisson sampling over ``bands`` groups.

    Theorem used (Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta, Xu,
    "(Amplified) Banded Matrix Factorization: A unified approach to private
    training", NeurIPS 2023, Thm. 4 with its cyclic Poisson sampling, Alg. 2):
    if ``C`` is lower-triangular and b-banded with column norms at most 1 and the
    dataset is split into b groups of which step t Poisson-samples group
    ``t mod b`` with probability q, then T steps of BandMF with noise multiplier
    σ satisfy every privacy guarantee that DP-SGD with Poisson sampling rate q
    and noise multiplier σ satisfies after ``ceil(T / b)`` steps. (Each example
    is in one group, so it can participate in at most ``ceil(T / b)`` steps.)

    So after ``steps`` steps this reports the wrapped accountant's value after
    ``ceil(steps / b)`` compositions of the Poisson-subsampled Gaussian; with
    ``b = 1`` it *is* the DP-SGD accountant.

    Args:
      inner: the accountant (any registered one, e.g. ``rdp``/``pld``) of one
        group's Poisson-subsampled Gaussian, with the per-group sampling rate.
      bands: b.
    """

    def __init__(self, inner: Accountant, *, bands: int):
        if not isinstance(inner, Accountant):
            raise TypeError(f"inner={inner!r} must be a jaxdp Accountant.")
        if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
            raise ValueError(f"bands={bands!r} must be a positive int.")
        self.inner = inner
        self.bands = bands
        self.name = inner.name
        self.is_upper_bound = inner.is_upper_bound
        self.sampling_rate = inner.sampling_rate
        self.noise_multiplier = inner.noise_multiplier
        self.sampling = "cyclic_poisson"
        self._steps = 0

    def rounds(self, steps: int) -> int:
        """Participations of the most exposed example in ``steps`` steps: ``ceil(steps / b)``."""
        return -(-int(steps) // self.bands)

    def epsilon_for(self, delta: float, steps: int) -> float:
        return 0.0 if steps == 0 else self.inner.epsilon_for(delta, self.rounds(steps))

    def delta_for(self, epsilon: float, steps: int) -> float:
        return 0.0 if steps == 0 else self.inner.delta_for(epsilon, self.rounds(steps))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bands": self.bands}

    def load_state_dict(self, state: dict) -> Accountant:
        if state.get("bands") != self.bands:
            raise ValueError(
                f"accountant state has bands={state.get('bands')!r} but this accountant has {self.bands}; "
                "restore into an accountant built for the same mechanism."
            )
        return super().load_state_dict(state)

    def __repr__(self) -> str:
        return f"CyclicPoissonAccountant({self.inner!r}, bands={self.bands}, steps={self._steps})"
