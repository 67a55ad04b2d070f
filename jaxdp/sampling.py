"""Poisson sampling with static padded shapes and masks.

Every example joins each step independently with probability ``q``. The realised
batch has a random size, but jitted steps need a fixed shape, so a draw is laid
out as one or more *chunks* of ``physical_batch_size`` indices plus a 0/1 mask.
A draw larger than one chunk is **not truncated** (truncation would change the
privacy analysis): it spills into further chunks whose clipped sums are added
before the noise. The buffer is sized so that spilling is rare (see
:func:`default_physical_batch_size`), which only costs an extra chunk of compute.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from jaxdp import rules

__all__ = ["CyclicPoissonSampler", "PoissonSampler", "default_physical_batch_size", "steps_per_epoch"]


def steps_per_epoch(dataset_size: int | float, batch_size: int | float) -> int:
    """Steps in one epoch of Poisson sampling: round(N / B), at least 1.

    The one definition used by training, ``jaxdp account --epochs`` and
    :func:`jaxdp.accounting.max_epochs`, so an "epoch" means the same number of
    accounted steps everywhere.
    """
    return max(1, round(dataset_size / batch_size))


def default_physical_batch_size(expected_batch_size: int, sampling_rate: float, multiple_of: int = 1) -> int:
    """Expected size plus four binomial standard deviations, rounded up to ``multiple_of``.

    A draw exceeds it with probability about 3e-5 per step (normal tail at 4σ);
    such a draw is processed as two chunks, never truncated.
    """
    std = math.sqrt(expected_batch_size * (1.0 - sampling_rate))
    size = math.ceil(expected_batch_size + 4.0 * std)
    return max(multiple_of, -(-size // multiple_of) * multiple_of)


class PoissonSampler:
    """Independent Bernoulli(``sampling_rate``) inclusion of every example, every step.

    Draws are a deterministic function of ``(seed, step)``, so a resumed run sees
    exactly the batches an uninterrupted run would, and every host of a
    multi-host run draws the same global batch.

    Args:
      dataset_size: N, number of examples.
      sampling_rate: q in (0, 1].
      physical_batch_size: fixed chunk shape; default
        :func:`default_physical_batch_size`.
      seed: integer seed of the sampling randomness.
      multiple_of: round the default chunk size up to this (e.g. device count).
    """

    def __init__(
        self,
        *,
        dataset_size: int,
        sampling_rate: float,
        physical_batch_size: int | None = None,
        seed: int = 0,
        multiple_of: int = 1,
    ):
        if isinstance(dataset_size, np.integer):
            dataset_size = int(dataset_size)
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"dataset_size={dataset_size!r} must be a positive int (number of examples).")
        self.dataset_size = dataset_size
        self.sampling_rate = rules.check_sampling_rate(sampling_rate)
        expected = max(1, round(dataset_size * self.sampling_rate))
        if physical_batch_size is None:
            physical_batch_size = default_physical_batch_size(expected, self.sampling_rate, multiple_of)
        if (
            isinstance(physical_batch_size, bool)
            or not isinstance(physical_batch_size, int)
            or physical_batch_size < 1
            or physical_batch_size % multiple_of
        ):
            raise ValueError(
                f"physical_batch_size={physical_batch_size!r} must be a positive int divisible by "
                f"{multiple_of} (the number of devices the batch is split over)."
            )
        self.physical_batch_size = physical_batch_size
        self.seed = int(seed)

    def draw(self, step: int) -> np.ndarray:
        """Indices of the examples sampled at ``step`` (sorted, variable length)."""
        rng = np.random.default_rng([self.seed, int(step)])
        return np.flatnonzero(rng.random(self.dataset_size) < self.sampling_rate)

    def chunks(self, indices: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Lay a draw out as fixed-shape ``(indices, mask)`` chunks.

        Padding positions hold index 0 and mask 0. An empty draw still yields one
        all-masked chunk, so the step (and its noise) still happens.
        """
        p = self.physical_batch_size
        n_chunks = max(1, -(-len(indices) // p))
        padded = np.zeros(n_chunks * p, dtype=np.int64)
        mask = np.zeros(n_chunks * p, dtype=np.float32)
        padded[: len(indices)] = indices
        mask[: len(indices)] = 1.0
        return [(padded[i * p : (i + 1) * p], mask[i * p : (i + 1) * p]) for i in range(n_chunks)]

    def steps(self, start: int, stop: int) -> Iterator[tuple[int, list[tuple[np.ndarray, np.ndarray]]]]:
        """Yield ``(step, chunks)`` for ``step`` in ``[start, stop)``."""
        for step in range(start, stop):
            yield step, self.chunks(self.draw(step))


class CyclicPoissonSampler(PoissonSampler):
    """Cyclic Poisson sampling: b fixed groups, step t Poisson-samples only group ``t mod b``.

    The examples are split once into ``bands`` groups of (almost) equal size by a
    permutation drawn from ``seed``; at step t each member of group ``t mod b``
    joins independently with probability ``sampling_rate`` (the *per-group*
    rate, ``b · B / N`` for expected batch size B), and nobody else does. So an
    example can only appear in steps at least b apart (b-min-separation), which
    is what the amplified banded matrix-factorization analysis needs
    (Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization", cyclic
    Poisson sampling). With ``bands = 1`` it is ordinary Poisson sampling.

    Same interface, fixed padded shapes and masks as :class:`PoissonSampler`;
    draws are a deterministic function of ``(seed, step)``.

    Args:
      dataset_size: N.
      bands: b >= 1, the number of groups (= the strategy's bands).
      sampling_rate: q_group in (0, 1], the inclusion probability within the active group.
      physical_batch_size, seed, multiple_of: as :class:`PoissonSampler`.
    """

    def __init__(
        self,
        *,
        dataset_size: int,
        bands: int,
        sampling_rate: float,
        physical_batch_size: int | None = None,
        seed: int = 0,
        multiple_of: int = 1,
    ):
        bands = rules.check_bands(bands)
        if isinstance(dataset_size, (int, np.integer)) and not isinstance(dataset_size, bool) and bands > dataset_size:
            raise ValueError(
                f"bands={bands} exceeds dataset_size={dataset_size}: every group needs at least one example; "
                "use fewer bands."
            )
        self.bands = bands
        super().__init__(
            dataset_size=dataset_size,
            sampling_rate=sampling_rate,
            physical_batch_size=physical_batch_size,
            seed=seed,
            multiple_of=multiple_of,
        )
        order = np.random.default_rng([self.seed, 0x6D696E]).permutation(self.dataset_size)
        self.groups = [np.sort(g) for g in np.array_split(order, bands)]
        if physical_batch_size is None:  # sized for one group, not for the whole dataset
            expected = max(1, round(len(self.groups[0]) * self.sampling_rate))
            self.physical_batch_size = default_physical_batch_size(expected, self.sampling_rate, multiple_of)

    def group_of(self, step: int) -> int:
        """The group sampled at ``step``."""
        return int(step) % self.bands

    def draw(self, step: int) -> np.ndarray:
        """Indices sampled at ``step`` (sorted): Bernoulli(q) over group ``step mod b`` only."""
        members = self.groups[self.group_of(step)]
        rng = np.random.default_rng([self.seed, int(step)])
        return members[rng.random(len(members)) < self.sampling_rate]


class ShuffleSampler:
    """Fixed-size batches from a fresh permutation each epoch: every example once per epoch.

    For **non-private** runs (and users who account for it themselves): there is
    no amplification-by-subsampling analysis for shuffling here, so the privacy
    plan refuses it whenever noise is added. Same interface as
    :class:`PoissonSampler`: the last batch of an epoch is padded with mask 0.

    Args:
      dataset_size: N.
      batch_size: examples per step (<= N); an epoch has ceil(N / batch_size) steps.
      seed: integer seed of the permutations.
      multiple_of: round the physical batch up to this (device count).
    """

    def __init__(self, *, dataset_size: int, batch_size: int, seed: int = 0, multiple_of: int = 1):
        if not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"dataset_size={dataset_size!r} must be a positive int.")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= dataset_size:
            raise ValueError(f"batch_size={batch_size!r} must be an int in 1..{dataset_size} (the dataset size).")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, int(seed)
        self.steps_per_epoch = -(-dataset_size // batch_size)
        self.physical_batch_size = -(-batch_size // multiple_of) * multiple_of

    def draw(self, step: int) -> np.ndarray:
        """Indices of step ``step``: a slice of the permutation of its epoch."""
        epoch, index = divmod(int(step), self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)
        return np.sort(order[index * self.batch_size : (index + 1) * self.batch_size])

    def chunks(self, indices: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        p = self.physical_batch_size
        padded = np.zeros(p, dtype=np.int64)
        mask = np.zeros(p, dtype=np.float32)
        padded[: len(indices)] = indices
        mask[: len(indices)] = 1.0
        return [(padded, mask)]

    def steps(self, start: int, stop: int) -> Iterator[tuple[int, list[tuple[np.ndarray, np.ndarray]]]]:
        for step in range(start, stop):
            yield step, self.chunks(self.draw(step))
