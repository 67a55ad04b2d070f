"""jaxdp.host.keep_freed_memory: a freed large block's pages are reused, not faulted in afresh."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

# Holds a 64 MiB block and prints how many bytes malloc has in blocks of their own mmap (glibc's
# mallinfo2().hblkhd): the whole block under glibc's defaults (above its mmap threshold); only what
# imports mapped before the call when freed memory is kept (the block comes from the heap, whose
# pages stay with the process when freed).
_PROBE = textwrap.dedent(
    """
    import ctypes, sys, threading
    import numpy as np
    from jaxdp.host import keep_freed_memory, malloc_setting

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = Info
    kept = keep_freed_memory() if sys.argv[1] == "keep" else False
    held = [np.ones(2**24, np.float32)]
    main_thread = mallinfo2().hblkhd
    worker = threading.Thread(target=lambda: held.append(np.ones(2**24, np.float32)))  # as XLA's threads allocate
    worker.start(); worker.join()
    print(kept, main_thread, mallinfo2().hblkhd - main_thread, malloc_setting())
    """
)


def _probe(mode: str, env=None) -> tuple[bool, int, int, str]:
    """(kept, bytes mapped after the main thread's block, bytes the worker's block added, malloc_setting())."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split(maxsplit=3)
    return out[0] == "True", int(out[1]), int(out[2]), out[3].strip()


_libc, _version = platform.libc_ver()
linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or _libc != "glibc"
    or tuple(int(p) for p in _version.split(".")[:2]) < (2, 33),
    reason="glibc's malloc only (mallinfo2: glibc 2.33 or later)",
)


@linux_glibc
def test_large_blocks_come_from_the_heap_not_their_own_mmap():
    kept, mapped, worker_mapped, setting = _probe("keep")
    assert kept and setting.startswith("malloc keeps freed memory")
    assert mapped < 2**24  # what imports mapped before (~1 MB); not the 64 MiB block
    assert worker_mapped == 0  # another thread's block too: from the one heap, not an arena's mmap fallback
    default_kept, default_mapped, default_worker, default_setting = _probe("defaults")
    assert not default_kept and default_setting == "malloc defaults"
    # Each 64 MiB block in its own mapping, unmapped (and faulted in again) when freed.
    assert default_mapped >= 2**26 and default_worker >= 2**26


@linux_glibc
def test_opt_out_leaves_malloc_alone():
    env = dict(os.environ, JAXDP_KEEP_FREED_MEMORY="0")
    kept, mapped, worker_mapped, setting = _probe("keep", env)
    assert not kept and setting == "malloc defaults"
    assert mapped >= 2**26 and worker_mapped >= 2**26
