"""benchmarks/dot_layouts.py: every layout it times forms the same product, and it refuses one that does not."""

import importlib.util
import os

import jax.numpy as jnp
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "dot_layouts.py")


def _tool():
    spec = importlib.util.spec_from_file_location("dot_layouts", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_dense_layout_and_conv_order_is_timed_with_its_kernel():
    tool = _tool()
    dense = tool.dense_layouts(4, 3, 5, 6, repeats=1)
    assert set(dense) == {
        "positions in the middle",
        "transposed in the jit",
        "transposed behind a barrier (jaxdp)",
        "laid out (B, d, T) before (product alone)",
    }
    conv = tool.conv_orders(4, 5, 3, 2, repeats=1)
    assert len(conv) == 3
    for ms, kernel in [*dense.values(), *conv.values()]:
        assert ms > 0 and kernel in ("YNNPACK", "generic dot")


def test_a_variant_with_another_result_is_refused():
    tool = _tool()
    x = jnp.arange(24.0).reshape(2, 3, 4)
    fns = {"a": lambda x: jnp.sum(x, axis=1), "b": lambda x: jnp.sum(x, axis=1) * (1 + 1e-3)}
    with pytest.raises(AssertionError, match="b: not the same product"):
        tool._time(fns, (x,), 1)
