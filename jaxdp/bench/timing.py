"""The one timer of the benchmarks: interleaved blocks, median seconds per call.

Block r of every function runs before block r + 1 of any (A, B, C, A, B, C, ...),
so a slow spell of a shared machine hits all of them alike. A block is a fixed
number of calls, or as many as take about ``block_s`` (from one timed call).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import Any

import jax

__all__ = ["Timing", "time_interleaved", "time_per_call"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call of one function: median, fastest and slowest block; ``iters`` calls per block."""

    seconds: float
    min_s: float
    max_s: float
    iters: int


def _calls_per_block(fn: Callable[[], Any], block_s: float) -> int:
    t0 = perf_counter()
    jax.block_until_ready(fn())
    return max(1, math.ceil(block_s / max(perf_counter() - t0, 1e-9)))


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    iters: int | Mapping[str, int] | None = None,
    block_s: float = 0.5,
    warmup: bool = True,
) -> dict[str, Timing]:
    """Time each function in ``repeats`` interleaved blocks.

    Args:
      fns: name -> a call to time; it returns something :func:`jax.block_until_ready`
        can wait on (the last call of a block is waited for).
      repeats: blocks per function (at least 1).
      iters: calls per block, for all functions or per name; None: as many as take
        about ``block_s`` seconds, from one timed call of each (at least one).
      warmup: call each function once first (compilation), untimed.

    Returns:
      name -> :class:`Timing`, in the order of ``fns``.
    """
    if not fns:
        raise ValueError("time_interleaved: no functions to time.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be an int >= 1.")
    if warmup:
        for fn in fns.values():
            jax.block_until_ready(fn())
    if iters is None:
        n = {name: _calls_per_block(fn, block_s) for name, fn in fns.items()}
    else:
        n = dict(iters) if isinstance(iters, Mapping) else dict.fromkeys(fns, iters)
    for name in fns:
        if isinstance(n.get(name), bool) or not isinstance(n.get(name), int) or n[name] < 1:
            raise ValueError(f"iters for {name!r} is {n.get(name)!r}; need an int >= 1.")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = perf_counter()
            for _ in range(n[name]):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((perf_counter() - t0) / n[name])
    return {name: Timing(statistics.median(t), min(t), max(t), n[name]) for name, t in times.items()}


def time_per_call(
    fn: Callable[[], Any], repeats: int, iters: int | None = None, *, block_s: float = 0.5, warmup: bool = True
) -> float:
    """Median seconds per call of one function (:func:`time_interleaved` of one)."""
    return time_interleaved({"fn": fn}, repeats, iters=iters, block_s=block_s, warmup=warmup)["fn"].seconds
