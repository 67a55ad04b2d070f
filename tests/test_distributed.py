"""Sharded (8 forced CPU devices) == unsharded, and the noise is added once."""

import json
import os
import subprocess
import sys

import pytest

# Its module-scoped runs are shared by its tests: one xdist worker for the whole module (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("distributed")

HERE = os.path.dirname(__file__)


_RESULTS: dict = {}


def _measure(model: str) -> dict:
    """The 8-device comparisons of ``model`` (one subprocess, run once per test process)."""
    if model not in _RESULTS:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "sharded_step_check.py"), model],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        _RESULTS[model] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _RESULTS[model]


@pytest.fixture
def measured():
    """The MLP's results (it also runs the model-free checks: unbatched arguments, row placement, uneven batch)."""
    return _measure("mlp")


# The sharded == unsharded contract runs on the MLP in `make test`; the CNN repeats it (slow: CI's second step).
MODELS = ["mlp", pytest.param("cnn", marks=pytest.mark.slow)]


@pytest.mark.parametrize("model", MODELS)
def test_eight_devices_equal_one(model):
    m = _measure(model)[model]
    assert m["shards_1"] == 1 and m["shards_8"] == 8  # the batch really was split 8 ways
    assert m["params_replicated_8"]
    tol = 1e-5 * max(1.0, m["param_scale"])
    assert m["diff_8_vs_1"] < tol, m
    assert m["diff_8_microbatched_vs_1"] < tol, m


@pytest.mark.parametrize("model", MODELS)
def test_gradient_hooks_give_the_same_result_on_eight_devices(model):
    """example_grad + perturb (BAM / DP-SAT style), 8 devices microbatched == 1 device."""
    m = _measure(model)[model]
    assert m["hooks_replicated_8"]
    assert m["hooks_change_the_result"] > 1e-4, m  # the hooks are really in the path
    assert m["hooks_diff_8_vs_1"] < 1e-5 * max(1.0, m["param_scale"]), m


@pytest.mark.parametrize("model", MODELS)
def test_banded_noise_gives_the_same_result_on_eight_devices(model):
    """BandMF (b = 2): the correlated noise state is replicated like the params; 8 devices == 1 device."""
    m = _measure(model)[model]
    assert m["bandmf_replicated_8"]
    assert m["bandmf_differs_from_dpsgd"] > 1e-4, m  # the banded noise is really in the path
    assert m["bandmf_diff_8_vs_1"] < 1e-5 * max(1.0, m["param_scale"]), m


@pytest.mark.parametrize("model", MODELS)
def test_ghost_clipping_on_eight_devices_equals_vmap_on_one(model):
    """clipping_impl='ghost', 8 devices, microbatched == the vmap path on 1 device (same noise key)."""
    m = _measure(model)[model]
    assert m["ghost_replicated_8"]
    assert m["ghost_diff_8_vs_vmap_1"] < 1e-5 * max(1.0, m["param_scale"]), m


@pytest.mark.parametrize("model", MODELS)
def test_noise_is_added_once_across_devices(model):
    """params - lr * (clipped_sum + N(0, (σC)^2) from the state's key) / B, exactly once."""
    m = _measure(model)[model]
    assert m["diff_8_one_step_vs_formula"] < 1e-5 * max(1.0, m["param_scale"]), m


def test_initialize_is_a_no_op_without_coordinator_and_checks_values():
    from jaxdp import distributed

    distributed.initialize("", 0, -1)  # single host: nothing to start
    with pytest.raises(ValueError, match="num_processes=2 and distributed.process_id=5"):
        distributed.initialize("10.0.0.1:1234", 2, 5)


def test_uneven_batch_is_refused(measured):
    assert measured["uneven_batch_error"].startswith("batch of 9 examples cannot be split evenly over 8 devices")


def test_unbatched_arguments_are_replicated_not_split(measured):
    assert measured["unbatched_arg_diff"] < 1e-4


def test_multi_host_row_placement_respects_any_device_order(measured):
    assert measured["place_rows_ok"]


def test_a_batch_already_sharded_over_the_mesh_is_passed_through():
    import jax
    import numpy as np

    from jaxdp import distributed

    mesh = distributed.make_mesh(1)
    x = np.arange(8.0).reshape(4, 2)
    placed = distributed.shard_batch(mesh, x)
    assert distributed.shard_batch(mesh, placed) is placed
    assert isinstance(placed, jax.Array) and np.array_equal(np.asarray(placed), x)
