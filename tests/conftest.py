"""Shared fixtures: small NNX models as (loss_fn, params) pairs and random data."""

import os
import tempfile

# Hermetic TFDS: the tests never see datasets prepared on this machine (~/tensorflow_datasets); a test that
# wants one prepares its own and passes data_dir. Set before anything imports tensorflow_datasets.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="jaxdp_tests_tfds_")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from jaxdp.models import CNN, MLP  # noqa: E402


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make ``--dist loadgroup`` group again: the modules marked ``xdist_group`` share module-scoped runs.

    pytest-xdist 3.8 tags a grouped test by setting ``item._nodeid`` to ``nodeid@group``; pytest 9.2 reads
    node ids from ``item._id`` instead, so the tag was lost and every module's tests were spread over both
    workers, each repeating the module's runs (the 8-device comparisons, the SIGKILL runs). Set the same
    tag where pytest 9.2 reads it; a no-op without ``--dist loadgroup`` or once xdist sets it itself.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # a pytest before 9.2 reads xdist's own tag
        return

    for item in items:
        names = {
            str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")
        }
        if names and "@" not in item.nodeid and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(names))}")


def nnx_loss(model):
    """Split an NNX model into (loss_fn(params, x, y), params)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn, params


@pytest.fixture
def mlp_problem():
    rng = np.random.default_rng(0)
    model = MLP(12, 5, hidden=(16, 8), rngs=nnx.Rngs(0))
    loss_fn, params = nnx_loss(model)
    x = jnp.asarray(rng.normal(size=(10, 12)) * 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, size=10), jnp.int32)
    return loss_fn, params, x, y


def make_cnn_problem(conv="dp"):
    """The small CNN (``conv``: "dp" = DPConv, "nnx" = nnx.Conv) on random data."""
    rng = np.random.default_rng(1)
    model = CNN((8, 8, 2), 4, features=(4, 6), conv=conv, rngs=nnx.Rngs(1))
    loss_fn, params = nnx_loss(model)
    x = jnp.asarray(rng.normal(size=(7, 8, 8, 2)) * 2, jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=7), jnp.int32)
    return loss_fn, params, x, y


@pytest.fixture
def cnn_problem():
    return make_cnn_problem("dp")


def tree_allclose(a, b, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def tree_equal(a, b):
    return all(
        np.array_equal(np.asarray(u), np.asarray(v))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )
