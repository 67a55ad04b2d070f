"""BAM and DP-SAT: the estimator's limit, per-example isolation, the clipping bound, privatised-only ascent."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from flax import nnx

import jaxdp
from experiments.bam import run
from experiments.bam.bam import bam_example_grad, method_hooks, sat_perturb
from jaxdp import distributed
from jaxdp.config import apply_overrides, load_config
from jaxdp.models import CNN, MLP
from jaxdp.step import make_private_step, run_private_step
from jaxdp.train import train

HERE = os.path.dirname(os.path.abspath(__file__))
SMOKE = os.path.join(HERE, "configs", "digits.py") + ":smoke"


def nnx_problem(model, x_shape, classes, n, seed):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p, rest)(x), y).mean()

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, *x_shape)) * 2, jnp.float32)
    y = jnp.asarray(rng.integers(0, classes, n), jnp.int32)
    return loss_fn, params, x, y


def mlp_problem(seed=0, n=8):
    return nnx_problem(MLP(12, 5, hidden=(16,), rngs=nnx.Rngs(seed)), (12,), 5, n, seed)


def smooth_problem():
    """A tanh network (smooth, so finite differences converge cleanly) on one example."""
    rng = np.random.default_rng(3)
    params = {
        "w1": jnp.asarray(rng.normal(size=(6, 8)) * 0.7, jnp.float32),
        "b1": jnp.asarray(rng.normal(size=8) * 0.1, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(8, 3)) * 0.7, jnp.float32),
    }

    def loss_fn(p, x, y):
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    x = jnp.asarray(rng.normal(size=(1, 6)), jnp.float32)
    y = jnp.asarray([2], jnp.int32)
    return loss_fn, params, x, y


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree_util.tree_leaves(tree)])


_JITTED = {}


def bam_grads(loss_fn, params, x, y, radius, lam):
    """Per-example BAM gradients (unclipped), jitted once per (loss, r, lam) so reference loops stay fast."""
    key = (loss_fn, radius, lam)
    if key not in _JITTED:
        fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, example_grad=bam_example_grad(radius=radius, lam=lam))
        _JITTED[key] = jax.jit(fn.per_example_grads)
    return _JITTED[key](params, x, y)[0]


@pytest.mark.slow  # ~12 s (make test stays under 10 minutes)
def test_finite_difference_approaches_the_exact_penalised_gradient():
    """As r -> 0, g^BAM -> grad(l + lam ||grad l||) (double backprop), the error shrinking ~linearly in r.

    Measured (relative to the penalty term): 4.9%, 1.5%, 0.52%, 0.16% at r = 0.1, 0.03, 0.01, 0.003.
    """
    loss_fn, params, x, y = smooth_problem()
    lam = 0.3

    def penalised(p):
        g = jax.grad(loss_fn)(p, x, y)
        return loss_fn(p, x, y) + lam * optax.tree.norm(g)

    exact = flat(jax.grad(penalised)(params))
    plain = flat(jax.grad(loss_fn)(params, x, y))
    penalty = np.linalg.norm(exact - plain)  # lam * H g / ||g||: what the finite difference must get right
    assert penalty > 0.1 * np.linalg.norm(plain)
    errors = []
    for radius in (0.1, 0.03, 0.01, 0.003):
        got = flat(jax.tree_util.tree_map(lambda g: g[0], bam_grads(loss_fn, params, x, y, radius, lam)))
        errors.append(np.linalg.norm(got - exact) / penalty)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.01, errors  # stated tolerance: 1% of the penalty term at r = 0.003 (float32)
    assert errors[0] / errors[2] > 5, errors  # ~linear convergence: 10x smaller r, > 5x smaller error
    # lam = 0 is the plain gradient.
    zero = flat(jax.tree_util.tree_map(lambda g: g[0], bam_grads(loss_fn, params, x, y, 0.05, 0.0)))
    np.testing.assert_allclose(zero, plain, rtol=1e-5, atol=1e-6)


def test_one_examples_bam_gradient_ignores_every_other_example():
    loss_fn, params, x, y = mlp_problem(n=6)
    base = bam_grads(loss_fn, params, x, y, 0.05, 0.05)
    rng = np.random.default_rng(9)
    x2 = x.at[1:].set(jnp.asarray(rng.normal(size=(5, 12)) * 5, jnp.float32))
    y2 = y.at[1:].set((y[1:] + 1) % 5)
    changed = bam_grads(loss_fn, params, x2, y2, 0.05, 0.05)
    alone = bam_grads(loss_fn, params, x[:1], y[:1], 0.05, 0.05)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (base, changed, alone)), strict=True):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a[0], c[0], rtol=1e-6, atol=1e-7)
    # Negative control: an ascent along the *batch* gradient (plain SAM) fails this very check.
    batch_grad = jax.grad(loss_fn)

    def sam_batch(p, xs, ys):
        g = batch_grad(p, xs, ys)
        return jax.grad(loss_fn)(
            jax.tree_util.tree_map(lambda a, b: a + 0.05 * b / optax.tree.norm(g), p, g), xs[:1], ys[:1]
        )

    diff = flat(sam_batch(params, x, y)) - flat(sam_batch(params, x2, y2))
    assert np.max(np.abs(diff)) > 1e-3


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("microbatch_size", [None, 3])
def test_bam_clipped_sum_equals_a_loop_and_each_term_is_within_the_bound(model, microbatch_size):
    if model == "mlp":
        loss_fn, params, x, y = mlp_problem(seed=4, n=7)
    else:
        loss_fn, params, x, y = nnx_problem(CNN((8, 8, 2), 4, features=(4, 6), rngs=nnx.Rngs(2)), (8, 8, 2), 4, 7, 2)
    clip = 0.5
    mask = jnp.asarray([1, 1, 1, 0, 1, 1, 1], jnp.float32)
    example_grad = bam_example_grad(radius=0.05, lam=0.03)
    fn = jaxdp.clipped_grad(
        loss_fn, l2_clip_norm=clip, example_grad=example_grad, microbatch_size=microbatch_size, return_norms=True
    )
    got, aux = jax.jit(fn)(params, x, y, example_mask=mask)
    total, norms = 0.0, []
    for i in range(x.shape[0]):  # the slow reference: one example at a time, in float64
        g = flat(
            jax.tree_util.tree_map(lambda v: v[0], bam_grads(loss_fn, params, x[i : i + 1], y[i : i + 1], 0.05, 0.03))
        )
        norms.append(np.linalg.norm(g))
        clipped = g * min(1.0, clip / max(norms[-1], 1e-30))
        assert np.linalg.norm(clipped) <= clip * (1 + 1e-6)
        total = total + clipped * float(mask[i])
    np.testing.assert_allclose(flat(got), total, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(aux.norms), norms, rtol=2e-4)
    assert int(aux.num_clipped) > 0  # clipping is active, so the bound is exercised


def test_dpsat_ascends_along_the_previous_privatised_gradient_only():
    loss_fn, params, x, y = mlp_problem(seed=5, n=16)
    mask = jnp.ones(16, jnp.float32)
    plan = jaxdp.PrivacyPlan(dataset_size=100, batch_size=16, l2_clip_norm=1.0, noise_multiplier=2.0, num_steps=3)
    mesh = distributed.make_mesh(1)
    key = jax.random.key(7)
    radius = 0.1
    step = make_private_step(
        plan, loss_fn, optax.sgd(0.5), noise_key=key, mesh=mesh, perturb=sat_perturb(radius=radius)
    )
    tx = step.tx
    plain_step = make_private_step(plan, loss_fn, optax.sgd(0.5), noise_key=key, mesh=mesh)
    state1, _ = run_private_step(step, step.init(params), [(x, y, mask)])

    # Step 1 has no previous gradient: it is exactly DP-SGD's step.
    plain1, _ = run_private_step(plain_step, plain_step.init(params), [(x, y, mask)])
    np.testing.assert_array_equal(flat(state1.params), flat(plain1.params))

    # What is kept is the privatised gradient (clipped sum + noise) / B: recompute it independently.
    grad_fn = jax.jit(plan.clipped_grad(loss_fn))
    clean_sum, _ = grad_fn(params, x, y, example_mask=mask)
    privatizer = plan.privatizer(key)
    want, _ = privatizer.update(clean_sum, privatizer.init(params), params)
    kept = state1.opt_state[0][1].last_update
    np.testing.assert_allclose(flat(kept), flat(want), rtol=1e-5, atol=1e-6)
    clean_mean = flat(clean_sum) / plan.batch_size
    assert np.linalg.norm(flat(kept) - clean_mean) > 0.5 * np.linalg.norm(clean_mean)  # the noise is in it

    # Step 2's per-example gradients are taken at params1 + r * kept / ||kept||, and applied to params1.
    x2, y2 = x[::-1], y[::-1]
    state2, _ = run_private_step(step, state1, [(x2, y2, mask)])
    d = flat(kept)
    point = jax.tree_util.tree_map(lambda p, k: p + radius * k / np.linalg.norm(d), state1.params, kept)
    g2, _ = grad_fn(point, x2, y2, example_mask=mask)
    updates, _ = tx.update(g2, state1.opt_state, state1.params)
    np.testing.assert_allclose(
        flat(state2.params), flat(optax.apply_updates(state1.params, updates)), rtol=1e-5, atol=1e-6
    )
    g_unperturbed, _ = grad_fn(state1.params, x2, y2, example_mask=mask)
    assert np.max(np.abs(flat(g2) - flat(g_unperturbed))) > 1e-4  # the ascent really moved the evaluation point


def test_ascent_point_for_zero_and_non_finite_directions_is_the_params():
    from experiments.bam.bam import _ascend

    params = {"a": jnp.ones(3), "b": jnp.full((2,), 2.0, jnp.bfloat16)}
    for direction in ({"a": jnp.zeros(3), "b": jnp.zeros(2)}, {"a": jnp.array([jnp.inf, 0, 0]), "b": jnp.zeros(2)}):
        moved = _ascend(params, direction, 0.1)
        np.testing.assert_array_equal(flat(moved), flat(params))
    moved = _ascend(params, {"a": jnp.array([3.0, 0, 0]), "b": jnp.array([0.0, 4.0])}, 0.1)
    np.testing.assert_allclose(flat(moved), [1.06, 1, 1, 2, 2.08], rtol=1e-6)  # r * d / ||d||, ||d|| = 5
    assert moved["b"].dtype == jnp.float32  # not rounded back to bfloat16 (ulp 0.0156 at 2.0 > the step)


def test_bad_hyperparameters_and_complex_params_are_refused():
    for bad in (0.0, -0.1, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="radius="):
            bam_example_grad(radius=bad, lam=0.01)
        with pytest.raises(ValueError, match="radius="):
            sat_perturb(radius=bad)
    with pytest.raises(ValueError, match="lam=-1"):
        bam_example_grad(radius=0.1, lam=-1)
    config = load_config(SMOKE)
    config.bam.method = "sam"
    with pytest.raises(ValueError, match="bam.method='sam'"):
        method_hooks(config.bam)
    fn = jaxdp.clipped_grad(
        lambda w, x: jnp.mean(jnp.abs(x @ w) ** 2), l2_clip_norm=1.0, example_grad=bam_example_grad(radius=0.1, lam=0.1)
    )
    with pytest.raises(TypeError, match="complex leaves"):
        fn(jnp.ones(3, jnp.complex64), jnp.ones((2, 3), jnp.complex64))


@pytest.mark.slow  # ~25 s: trains every row of the table once (CI's slow step)
def test_table_smoke_run(tmp_path):
    results = run.main(["--config", SMOKE, "--epsilons", "3", "--seeds", "0", "--out", str(tmp_path)])
    assert [r["method"] for r in results] == ["dpsgd", "dpsat", "bam"]
    for r in results:
        assert r["epsilon_spent"] <= 3.0 + 1e-9
        assert 0.3 < r["test_accuracy"] <= 1.0  # 2 epochs: well above chance (0.1), noise on
        assert r["final_grad_norm_mean"] > r["final_clip_bias_bound"] > 0
        assert r["grad_norm_mean"] > r["clip_bias_bound"] > 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("| 3 (") == 3 and "BAM" in table and "DP-SAT" in table


def test_cifar_recipe_is_the_authors_setting():
    config = load_config(os.path.join(HERE, "configs", "cifar10_wrn16_4.py"))
    assert (config.privacy.target_epsilon, config.privacy.delta, config.privacy.l2_clip_norm) == (8.0, 1e-5, 1.0)
    assert config.batch_size == 4096 and config.augment.multiplicity == 16 and config.model.name == "wrn"
    assert (config.bam.method, config.bam.radius, config.bam.lam) == ("bam", 0.1, 0.031)
    assert set(method_hooks(config.bam)) == {"example_grad"}


@pytest.mark.slow  # ~1-2 min on 2 CPU cores: compiling WRN's per-example gradient twice over (BAM)
def test_cifar_recipe_runs_bam_on_tfds_mock_data(tmp_path):
    smoke = apply_overrides(
        load_config(os.path.join(HERE, "configs", "cifar10_wrn16_4.py") + ":smoke"),
        [
            "batch_size=8",
            "physical_batch_size=8",
            "model.kwargs.width=1",
            f"workdir={tmp_path}",
            f"data_dir={tmp_path / 'tfds'}",
            "privacy.noise_seed=0",
        ],
    )
    with tfds.testing.mock_data(num_examples=32):
        summary = train(smoke, progress=False, **method_hooks(smoke.bam))
    assert summary["steps"] > 0 and 0 < summary["epsilon"] <= 8.0
