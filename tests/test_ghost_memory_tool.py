"""benchmarks/ghost_memory.py: the live-buffer estimate it reads from scheduled HLO, and its report."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _tool():
    sys.path.insert(0, _BENCH)  # it imports profile_ghost from its folder, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location("ghost_memory", os.path.join(_BENCH, "ghost_memory.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(_BENCH)


def test_live_at_peak_holds_the_buffers_alive_together():
    """Two 4 MiB intermediates both needed by the last op are live together at the peak; the 4 KiB input is not
    counted (parameters are not temporaries)."""

    def f(x):
        a = jnp.outer(x, x)  # (1024, 1024) f32: 4 MiB
        b = jnp.sin(a) * 2.0  # another 4 MiB, while a is still needed
        return jnp.sum(a * jnp.cos(b))

    hlo = jax.jit(f).lower(jnp.ones((1024,), jnp.float32)).compile().as_text()
    peak, live = _tool().live_at_peak(hlo)
    sizes = [size for size, *_ in live]
    assert peak == sum(sizes)
    assert sorted(sizes)[-2:] == [4 * 2**20, 4 * 2**20]
    assert 4096 not in sizes


def test_report_prints_both_steps(capsys):
    _tool().report("mlp", 8, top=3)
    out = capsys.readouterr().out
    assert "| non-private |" in out and "| ghost |" in out and "estimated peak" in out
