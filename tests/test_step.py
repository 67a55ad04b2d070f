"""jaxdp.step: one private step over a whole Poisson draw, its state, and the loops users write around it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import nnx_loss, tree_allclose, tree_equal
from flax import nnx

import jaxdp
from jaxdp import distributed
from jaxdp.models import MLP


def _problem(seed=0, n=200):
    loss_fn, params = nnx_loss(MLP(12, 5, hidden=(8,), rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    y = rng.integers(0, 5, n).astype(np.int32)
    return loss_fn, params, x, y


def _plan(**kw):
    args = dict(dataset_size=200, batch_size=20, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=5)
    return jaxdp.PrivacyPlan(**{**args, **kw})


def test_step_reports_the_per_example_norms_it_clipped():
    loss_fn, params = nnx_loss(MLP(12, 5, hidden=(8,), rngs=nnx.Rngs(1)))
    plan = jaxdp.PrivacyPlan(dataset_size=100, batch_size=10, l2_clip_norm=0.5, noise_multiplier=1.0, num_steps=1)
    step = jaxdp.make_private_step(plan, loss_fn, optax.sgd(0.1), noise_key=jax.random.key(0))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 12)).astype(np.float32)
    y = rng.integers(0, 5, 8).astype(np.int32)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1], np.float32)
    _, metrics = jaxdp.run_private_step(step, step.init(params), [(x, y, mask)])
    _, aux = plan.clipped_grad(loss_fn, return_norms=True)(params, x, y)
    np.testing.assert_allclose(metrics["norms"], np.where(mask > 0, aux.norms, np.nan), rtol=1e-5)
    assert float(metrics["examples"]) == mask.sum()


def _ascend_along_prev(params, prev):  # a DP-SAT-like perturb: moves only once prev is non-zero
    return jax.tree_util.tree_map(lambda p, d: p + 0.3 * d, params, prev)


@pytest.mark.parametrize("perturb", [None, _ascend_along_prev])
def test_step_does_not_recompile_and_spilled_draws_are_exact(perturb):
    """One compiled step for every draw; a draw split over two chunks equals one big chunk (perturbed too)."""
    loss_fn, params, x, y = _problem()
    plan = _plan()
    mesh = distributed.make_mesh(1)
    step = jaxdp.make_private_step(
        plan, loss_fn, optax.sgd(0.1), noise_key=jax.random.key(0), mesh=mesh, perturb=perturb
    )
    sampler = plan.sampler(seed=0, physical_batch_size=16)
    state = step.init(params)
    for s in range(5):
        (idx, mask), *_ = sampler.chunks(sampler.draw(s))[-1:]
        state, _ = jaxdp.run_private_step(step, state, [(x[idx], y[idx], mask)])
    assert step.step_fn._cache_size() == 1

    # From a state with a previous (non-zero) privatised gradient, so a perturbation really moves.
    idx = np.arange(24)
    ones = np.ones(12, np.float32)
    one, m1 = jaxdp.run_private_step(step, state, [(x[idx], y[idx], np.ones(24, np.float32))])
    two, m2 = jaxdp.run_private_step(step, state, [(x[idx[:12]], y[idx[:12]], ones), (x[idx[12:]], y[idx[12:]], ones)])
    tree_allclose(one.params, two.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1["norms"], m2["norms"], rtol=1e-5)  # the chunks' norms, in order
    assert float(m2["examples"]) == 24 and int(two.step) == int(state.step) + 1  # one noisy step, not two
    if perturb is not None:  # the earlier chunk must be taken at the perturbed point as well
        acc, _ = step.accumulate_fn(state, None, x[idx[:12]], y[idx[:12]], ones)
        at_params, _ = plan.clipped_grad(loss_fn)(state.params, x[idx[:12]], y[idx[:12]])
        moved = [np.max(np.abs(u - v)) for u, v in zip(*map(jax.tree_util.tree_leaves, (acc, at_params)), strict=True)]
        assert max(moved) > 1e-4


def test_run_private_step_is_clip_sum_noise_once_then_the_optimizer():
    """Against a slow reference: a loop over examples clips each gradient, sums, adds N(0, (σC)^2) from the
    privatizer's own key once, divides by B and takes the SGD step."""
    loss_fn, params, x, y = _problem(3)
    plan = _plan(l2_clip_norm=0.7, noise_multiplier=1.3)
    step = jaxdp.make_private_step(plan, loss_fn, optax.sgd(0.5), noise_key=jaxdp.key_from_secret(1234))
    state = step.init(params)
    mask = (np.arange(30) % 4 != 0).astype(np.float32)
    chunks = [(x[i : i + 10], y[i : i + 10], mask[i : i + 10]) for i in (0, 10, 20)]
    new, metrics = jaxdp.run_private_step(step, state, chunks)

    total = jax.tree_util.tree_map(jnp.zeros_like, params)
    for i in np.flatnonzero(mask):
        g = jax.grad(loss_fn)(params, x[i : i + 1], y[i : i + 1])
        factor = jnp.minimum(1.0, 0.7 / jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(g))))
        total = jax.tree_util.tree_map(lambda t, v, f=factor: t + v * f, total, g)
    reference = jaxdp.privatize(
        l2_clip_norm=0.7, noise_multiplier=1.3, expected_batch_size=20, key=jaxdp.key_from_secret(1234)
    )
    noisy, _ = reference.update(total, reference.init(params))
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, noisy)
    tree_allclose(new.params, expected, rtol=1e-5, atol=1e-6)
    assert float(metrics["examples"]) == mask.sum() and metrics["norms"].shape == (30,)
    assert np.all(np.isnan(np.asarray(metrics["norms"])[mask == 0]))


def test_the_accountant_is_stepped_once_per_draw_whatever_its_chunks():
    loss_fn, params, x, y = _problem()
    plan = _plan()
    step = jaxdp.make_private_step(plan, loss_fn, optax.sgd(0.1), noise_key=jaxdp.key_from_secret(5))
    accountant = plan.make_accountant()
    state = step.init(params)
    ones = np.ones(10, np.float32)
    for n_chunks in (1, 3, 2):
        chunks = [(x[10 * i : 10 * i + 10], y[10 * i : 10 * i + 10], ones) for i in range(n_chunks)]
        state, _ = jaxdp.run_private_step(step, state, chunks, accountant=accountant)
    assert accountant.steps == 3 == int(state.step)
    assert accountant.epsilon(1e-5) == pytest.approx(plan.epsilon(1e-5, steps=3))


def test_masked_examples_contribute_exactly_zero_to_a_step():
    """Rows with mask 0 (padding, absent canaries) change nothing, whatever their data (NaN included)."""
    loss_fn, params, x, y = _problem(4)
    step = jaxdp.make_private_step(_plan(), loss_fn, optax.sgd(0.1), noise_key=jaxdp.key_from_secret(9))
    state = step.init(params)
    mask = np.array([1] * 6 + [0] * 4, np.float32)
    poisoned = x[:10].copy()
    poisoned[6:] = np.nan
    a, _ = jaxdp.run_private_step(step, state, [(x[:10], y[:10], mask)])
    b, _ = jaxdp.run_private_step(step, state, [(poisoned, y[:10], mask)])
    c, _ = jaxdp.run_private_step(step, state, [(x[:6], y[:6], np.ones(6, np.float32))])
    assert tree_equal(a.params, b.params)
    tree_allclose(a.params, c.params, rtol=1e-6, atol=1e-7)


def test_bad_chunks_are_refused_with_the_fix():
    loss_fn, params, x, y = _problem()
    step = jaxdp.make_private_step(_plan(), loss_fn, optax.sgd(0.1), noise_key=jaxdp.key_from_secret(1))
    state = step.init(params)
    with pytest.raises(ValueError, match="no chunks"):
        jaxdp.run_private_step(step, state, [])
    with pytest.raises(TypeError, match=r"\(x, y, mask, \*extra\)"):
        jaxdp.run_private_step(step, state, [(x[:4], y[:4])])


def test_init_state_replicates_over_a_mesh_and_starts_at_step_zero():
    loss_fn, params, _, _ = _problem()
    mesh = distributed.make_mesh(1)
    step = jaxdp.make_private_step(_plan(), loss_fn, optax.adam(1e-3), noise_key=jaxdp.key_from_secret(2), mesh=mesh)
    state = step.init(params)
    assert int(state.step) == 0 and tree_equal(state.params, params)
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(step.tx.init(params))
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(state.params))
    assert tree_equal(jaxdp.init_state(params, step.tx).params, params)


def test_an_nnx_optimizer_loop_equals_run_private_step():
    """A Flax NNX loop: step.clipped_sum + nnx.Optimizer(model, step.tx) gives exactly what run_private_step gives
    (the privatizer at the head of tx adds the noise once)."""
    model = MLP(12, 5, hidden=(8,), rngs=nnx.Rngs(7))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p, rest)(x), y).mean()

    _, _, x, y = _problem(7)
    plan = _plan()
    mask = np.ones(10, np.float32)
    chunks = [(x[:10], y[:10], mask), (x[10:20], y[10:20], mask)]

    step = jaxdp.make_private_step(plan, loss_fn, optax.sgd(0.2), noise_key=jaxdp.key_from_secret(77))
    reference, _ = jaxdp.run_private_step(step, step.init(params), chunks)

    optimizer = nnx.Optimizer(model, step.tx, wrt=nnx.Param)
    g, metrics = step.clipped_sum(nnx.state(model, nnx.Param), chunks)
    optimizer.update(model, g)
    tree_allclose(nnx.state(model, nnx.Param), reference.params, rtol=1e-6, atol=1e-7)
    assert float(metrics["examples"]) == 20

    perturbed = jaxdp.make_private_step(
        plan, loss_fn, optax.sgd(0.2), noise_key=jaxdp.key_from_secret(77), perturb=_ascend_along_prev
    )
    with pytest.raises(ValueError, match="perturb="):
        perturbed.clipped_sum(params, chunks)


def test_nonprivate_step_is_plain_sgd():
    loss_fn, params, x, y = _problem()
    opt = optax.sgd(0.1)
    step = jaxdp.make_nonprivate_step(loss_fn, opt)
    state, loss = step(jaxdp.init_state(params, opt), x[:16], y[:16])
    g = jax.grad(loss_fn)(params, x[:16], y[:16])
    tree_allclose(state.params, jax.tree_util.tree_map(lambda p, v: p - 0.1 * v, params, g))
    assert np.isfinite(float(loss)) and int(state.step) == 1
