"""Run by test_distributed.py in a fresh process with 8 forced CPU devices.

Prints one JSON line of measured differences; the test asserts on them.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import nnx_loss  # noqa: E402

import jaxdp  # noqa: E402
from jaxdp import distributed  # noqa: E402
from jaxdp.models import CNN, MLP  # noqa: E402
from jaxdp.step import make_private_step, run_private_step  # noqa: E402


def max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def two_point_example_grad(value_and_grad, p):
    """A BAM-like per-example estimator: the example's gradient averaged with one at a point it chose."""
    (loss, aux), g = value_and_grad(p)
    _, g2 = value_and_grad(jax.tree_util.tree_map(lambda a, b: a + 0.05 * b, p, g))
    return (loss, aux), jax.tree_util.tree_map(lambda a, b: 0.5 * (a + b), g, g2)


def ascend_along_prev(params, prev):  # DP-SAT-like: moves once the previous privatised gradient is non-zero
    return jax.tree_util.tree_map(lambda p, d: p + 0.5 * d, params, prev)


HOOKS = {"example_grad": two_point_example_grad, "perturb": ascend_along_prev}


def run(model, x, y, mask, num_devices, microbatch_size=None, hooks=None, plan_kwargs=None, clipping_impl="vmap"):
    loss_fn, params = nnx_loss(model)
    plan = jaxdp.PrivacyPlan(
        dataset_size=1000, batch_size=24, l2_clip_norm=0.5, noise_multiplier=1.3, num_steps=2, **(plan_kwargs or {})
    )
    mesh = distributed.make_mesh(num_devices)
    step = make_private_step(
        plan,
        loss_fn,
        optax.sgd(0.1),
        noise_key=jax.random.key(42),
        microbatch_size=microbatch_size,
        mesh=mesh,
        clipping_impl=clipping_impl,
        **(hooks or {}),
    )
    state = step.init(params)
    batch = distributed.shard_batch(mesh, (x, y, mask))  # placed once; run_private_step takes it as it is
    for _ in range(2):
        state, metrics = run_private_step(step, state, [batch])
    shards = len(batch[0].addressable_shards)
    replicated = all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(state.params))
    # Per-example norms leave the step replicated, so every host of a multi-host run can read them.
    replicated = replicated and metrics["norms"].sharding.is_fully_replicated
    return state.params, shards, replicated, (loss_fn, params, plan)


def main(models):
    """Runs the comparisons for ``models`` (the rest of the checks with the first one), prints JSON."""
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    out = {}
    mask = (rng.random(32) < 0.8).astype(np.float32)
    cases = {
        "mlp": (MLP(12, 5, hidden=(16,), rngs=nnx.Rngs(0)), rng.normal(size=(32, 12)).astype(np.float32) * 3),
        "cnn": (
            CNN((8, 8, 1), 4, features=(4, 8), rngs=nnx.Rngs(1)),
            rng.normal(size=(32, 8, 8, 1)).astype(np.float32),
        ),
    }
    y = rng.integers(0, 4, size=32).astype(np.int32)
    for name, (model, x) in cases.items():
        if name not in models:
            continue
        p1, s1, _, (loss_fn, params0, plan) = run(model, x, y, mask, 1)
        p8, s8, rep8, _ = run(model, x, y, mask, 8)
        p8m, _, _, _ = run(model, x, y, mask, 8, microbatch_size=2)
        h1, _, _, _ = run(model, x, y, mask, 1, hooks=HOOKS)
        h8, _, h8_rep, _ = run(model, x, y, mask, 8, microbatch_size=2, hooks=HOOKS)
        banded = {"bands": 2, "sampling": "cyclic_poisson"}  # step 2's noise uses step 1's (history state)
        b1, _, _, _ = run(model, x, y, mask, 1, plan_kwargs=banded)
        b8, _, b8_rep, _ = run(model, x, y, mask, 8, plan_kwargs=banded)
        g8, _, g8_rep, _ = run(model, x, y, mask, 8, microbatch_size=2, clipping_impl="ghost")
        # Explicit one-step formula: noise drawn once from the key the privatizer holds.
        grad_fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm=0.5)
        g, _ = grad_fn(params0, x, y, example_mask=mask)
        _, noise_key = jax.random.split(jax.random.key(42))
        noisy = jaxdp.add_noise(noise_key, g, 1.3 * 0.5)
        expected1 = jax.tree_util.tree_map(lambda p, n: p - 0.1 * n / 24, params0, noisy)
        q1, _, _, _ = run_one_step(model, x, y, mask)
        out[name] = {
            "shards_1": s1,
            "shards_8": s8,
            "params_replicated_8": rep8,
            "diff_8_vs_1": max_diff(p8, p1),
            "diff_8_microbatched_vs_1": max_diff(p8m, p1),
            "hooks_diff_8_vs_1": max_diff(h8, h1),
            "hooks_change_the_result": max_diff(h1, p1),
            "hooks_replicated_8": h8_rep,
            "bandmf_diff_8_vs_1": max_diff(b8, b1),
            "bandmf_differs_from_dpsgd": max_diff(b1, p1),
            "bandmf_replicated_8": b8_rep,
            "ghost_diff_8_vs_vmap_1": max_diff(g8, p1),
            "ghost_replicated_8": g8_rep,
            "diff_8_one_step_vs_formula": max_diff(q1, expected1),
            "param_scale": max(float(np.max(np.abs(np.asarray(v)))) for v in jax.tree_util.tree_leaves(p1)),
        }

    if models[0] != "mlp":
        print(json.dumps(out))
        return

    # Unbatched arguments are replicated, not split: same result as one device.
    def weighted(p, xb, w):
        return jnp.mean((xb @ p) * w)

    gfn = jaxdp.clipped_grad(weighted, l2_clip_norm=1e6, batch_argnums=1)
    xs, w4 = rng.normal(size=(16, 4)).astype(np.float32), jnp.arange(1.0, 5.0)
    want, _ = gfn(jnp.ones(4), xs, w4, example_mask=jnp.ones(16))
    mesh8 = distributed.make_mesh(8)
    got, _ = jax.jit(distributed.data_parallel(gfn, mesh8))(
        jnp.ones(4), distributed.shard_batch(mesh8, xs), w4, example_mask=distributed.shard_batch(mesh8, np.ones(16))
    )
    # The multi-host placement path, exercised here on one host with a permuted device order.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    perm = Mesh(np.asarray(jax.devices()[::-1]), ("data",))
    placed = distributed.place_rows(xs, NamedSharding(perm, PartitionSpec("data")))
    out["place_rows_ok"] = bool(np.array_equal(np.asarray(placed), xs)) and len(placed.addressable_shards) == 8
    out["unbatched_arg_diff"] = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    try:
        distributed.shard_batch(distributed.make_mesh(8), np.zeros((9, 2)))
        out["uneven_batch_error"] = ""
    except ValueError as e:
        out["uneven_batch_error"] = str(e)
    print(json.dumps(out))


def run_one_step(model, x, y, mask):
    loss_fn, params = nnx_loss(model)
    plan = jaxdp.PrivacyPlan(dataset_size=1000, batch_size=24, l2_clip_norm=0.5, noise_multiplier=1.3, num_steps=1)
    mesh = distributed.make_mesh(8)
    step = make_private_step(plan, loss_fn, optax.sgd(0.1), noise_key=jax.random.key(42), mesh=mesh)
    state, _ = run_private_step(step, step.init(params), [(x, y, mask)])
    return state.params, None, None, None


if __name__ == "__main__":
    main(sys.argv[1:] or ["mlp", "cnn"])
