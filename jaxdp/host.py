"""Settings of the host process that change how fast a step runs, never what it computes.

:func:`keep_freed_memory`: XLA's CPU runtime allocates each step's temporaries afresh, and glibc's
malloc serves every allocation above its mmap threshold (32 MiB at most) with a fresh ``mmap``,
returned to the kernel with ``munmap`` when freed. The kernel then zero-fills those pages one
fault at a time on the next step's first touch. Measured on 2 CPU cores (``benchmarks/profile_ghost.py``,
the DP MNIST CNN at batch 256):

* the ghost-clipped gradient took 8,809 page faults and 16 ms of kernel time per call;
* it ran in 23 ms with glibc's defaults and in 14 ms with freed memory kept;
* the non-private gradient, with temporaries under the threshold, took none: 10 ms either way;
* WRN-16-4 at batch 32: XLA's executing thread mapped 670 MB of temporaries afresh each ghost step
  (164k faults); 550 ms a ghost step and 410 ms a non-private one before, 480 and 370 ms after.

The slowdown also depended on what ran before in the process (glibc raises its threshold after
freeing a large block), so private / non-private ratios measured in one process moved by 40%.

``jaxdp train``, ``jaxdp bench`` and ``jaxdp audit`` call it at start; code that imports jaxdp's
primitives can call it once itself. ``JAXDP_KEEP_FREED_MEMORY=0`` leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    No allocation is served by its own ``mmap`` (``M_MMAP_MAX = 0``), the heap's top is never
    trimmed (``M_TRIM_THRESHOLD`` at its largest), and every thread allocates from the one main
    heap (``M_ARENA_MAX = 1``: a thread's own arena still maps a block too large for it afresh, as
    XLA's executing thread did with WRN-16-4's 670 MB of temporaries each step). A step's
    temporaries then reuse the pages of the previous step's. The costs: the process's resident
    memory stays at its peak instead of shrinking between steps (memory already mapped is not
    affected), and threads share one allocator lock. Call it before jax starts its threads (before
    the first computation); a thread that has allocated already keeps its own arena.

    Returns:
      True where it is in effect (Linux with glibc, called now or before); False where it is not:
      another platform or C library, or ``JAXDP_KEEP_FREED_MEMORY=0`` in the environment. Calling it
      again does nothing more.
    """
    if "kept" in _state:
        return _state["kept"]
    kept = False
    if os.environ.get("JAXDP_KEEP_FREED_MEMORY", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # musl and others: no mallopt
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # mallopt returns 1 on success, 0 on error.
            settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
            kept = all(mallopt(param, value) == 1 for param, value in settings)
    _state["kept"] = kept
    return kept


def malloc_setting() -> str:
    """One phrase for reports: whether :func:`keep_freed_memory` is in effect in this process."""
    if _state.get("kept"):
        return "malloc keeps freed memory (jaxdp.host.keep_freed_memory)"
    return "malloc defaults"
