"""The accountant protocol and the registry that picks accountants by name.

Place in the data path: none. Accounting is host-side bookkeeping over the
mechanism a :class:`jaxdp.PrivacyPlan` fixes (Poisson sampling rate q, noise
multiplier σ, steps); it never touches gradients or noise. Its argument rules
(q, σ > 0, δ, bands) are those of :mod:`jaxdp.rules`.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np

from jaxdp import rules

__all__ = [
    "ACCOUNTED_SAMPLINGS",
    "Accountant",
    "CyclicPoissonAccountant",
    "TooCostly",
    "accountant_class",
    "available_accountants",
    "make_accountant",
    "register_accountant",
    "require_upper_bound",
]

#: The samplers an :class:`Accountant` accounts for directly (cyclic Poisson goes through
#: :func:`make_accountant`, which wraps a Poisson accountant in :class:`CyclicPoissonAccountant`).
ACCOUNTED_SAMPLINGS = ("poisson",)

_REGISTRY: dict[str, type[Accountant]] = {}


class TooCostly(ValueError):
    """An accountant cannot evaluate this many steps within its resource limit (not a bad argument)."""


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
        self.sampling_rate = rules.check_sampling_rate(sampling_rate)
        self.noise_multiplier = rules.check_noise_multiplier(noise_multiplier, allow_zero=False)
        rules.check_shuffle_noise(sampling, self.noise_multiplier)  # σ > 0 here: shuffled batches are refused
        if sampling not in ACCOUNTED_SAMPLINGS:
            raise ValueError(
                f"sampling={sampling!r} cannot be accounted for by an Accountant: it accounts for Poisson "
                "sampling ('poisson'), the sampler that gets amplification by subsampling here; for cyclic "
                "Poisson (BandMF) use make_accountant(..., sampling='cyclic_poisson', bands=b). Use Poisson "
                "sampling for private runs."
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
        delta = rules.check_delta(delta, sampling_rate=self.sampling_rate)
        return 0.0 if self._steps == 0 else float(self.epsilon_for(delta, self._steps))

    def delta(self, epsilon: float) -> float:
        """δ spent so far at ``epsilon`` (0 before the first step)."""
        epsilon = rules.positive_finite("epsilon", epsilon, allow_zero=True)
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


def unregister_accountant(name: str) -> None:
    """Remove ``name`` from the registry (a test's or a notebook's own accountant); unknown names are ignored.
    The built-in accountants cannot be removed."""
    if name in ("rdp", "pld", "prv", "gdp"):
        raise ValueError(f"accountant {name!r} is built in and cannot be unregistered.")
    _REGISTRY.pop(name, None)


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
    bands = rules.check_bands(bands)
    if sampling == "cyclic_poisson":
        inner = accountant_class(name)(
            sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, sampling="poisson", **options
        )
        return CyclicPoissonAccountant(inner, bands=bands)
    rules.check_bands_sampling(bands, sampling)
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
        rules.check_bands(bands)
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
