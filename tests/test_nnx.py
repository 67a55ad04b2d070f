"""jaxdp.nnx: clipped gradients of an NNX module, and the private step with nnx.Optimizer, against slow references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import nnx_loss, tree_allclose, tree_equal
from flax import nnx

import jaxdp
from jaxdp import nnx as dpnnx
from jaxdp.models import CNN, MLP


def _mlp():
    rng = np.random.default_rng(0)
    model = MLP(12, 5, hidden=(16, 8), rngs=nnx.Rngs(0))
    x = (rng.normal(size=(10, 12)) * 3).astype(np.float32)
    return model, x, rng.integers(0, 5, 10).astype(np.int32)


def _cnn():
    rng = np.random.default_rng(1)
    model = CNN((8, 8, 2), 4, features=(4, 6), rngs=nnx.Rngs(1))
    x = (rng.normal(size=(7, 8, 8, 2)) * 2).astype(np.float32)
    return model, x, rng.integers(0, 4, 7).astype(np.int32)


def tutorial_loss(model, batch):
    """The Flax NNX MNIST tutorial's loss_fn, as written there."""
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits=logits, labels=batch["label"]).mean()
    return loss, logits


def plain_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _reference(model, x, y, mask, clip, per_layer=False):
    """Loop over examples: nnx.grad on a batch of one, clip (whole or per leaf), sum the unmasked ones."""
    total = jax.tree_util.tree_map(jnp.zeros_like, nnx.state(model, nnx.Param))
    k = len(jax.tree_util.tree_leaves(total))
    for i in np.flatnonzero(mask):
        g = nnx.grad(plain_loss)(model, x[i : i + 1], y[i : i + 1])
        if per_layer:
            g = jax.tree_util.tree_map(lambda v: v * jnp.minimum(1.0, clip / np.sqrt(k) / jnp.linalg.norm(v)), g)
        else:
            factor = jnp.minimum(1.0, clip / jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(g))))
            g = jax.tree_util.tree_map(lambda v, f=factor: v * f, g)
        total = jax.tree_util.tree_map(jnp.add, total, g)
    return total


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize(
    "options",
    # The options are jaxdp.clipped_grad's, each checked against a loop in tests/test_clipping.py; here the
    # wrapper is checked with each, the pass-through ones in CI's slow step.
    [
        {},
        pytest.param({"microbatch_size": 3}, marks=pytest.mark.slow),
        pytest.param({"per_layer": True}, marks=pytest.mark.slow),
        {"clipping_impl": "ghost"},
    ],
    ids=["vmap", "microbatched", "per_layer", "ghost"],
)
def test_value_and_clipped_grad_equals_a_loop_over_examples(make, options):
    model, x, y = make()
    mask = (np.arange(len(y)) % 3 != 1).astype(np.float32)
    fn = dpnnx.value_and_clipped_grad(tutorial_loss, l2_clip_norm=0.8, has_aux=True, **options)
    (loss, logits), grads, aux = fn(model, {"image": x, "label": y}, example_mask=mask)

    assert isinstance(grads, nnx.State)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(nnx.state(model, nnx.Param))
    tree_allclose(grads, _reference(model, x, y, mask, 0.8, options.get("per_layer", False)), rtol=2e-5, atol=2e-6)
    # value: the loss of the real examples, and the tutorial's logits per example, shaped (batch, classes)
    real = mask > 0
    per_example = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
    np.testing.assert_allclose(loss, per_example[real].mean(), rtol=1e-5)
    np.testing.assert_allclose(logits, model(x), rtol=1e-5, atol=1e-6)
    assert int(aux.num_clipped) <= int(real.sum()) and fn.l2_sensitivity == 0.8


def test_masked_examples_contribute_exactly_zero():
    model, x, y = _mlp()
    fn = dpnnx.value_and_clipped_grad(plain_loss, l2_clip_norm=1.0)
    mask = np.array([1] * 6 + [0] * 4, np.float32)
    poisoned = x.copy()
    poisoned[6:] = np.nan
    loss_a, a, _ = fn(model, x, y, example_mask=mask)
    loss_b, b, aux = fn(model, poisoned, y, example_mask=mask)
    _, c, _ = fn(model, x[:6], y[:6])
    assert tree_equal(a, b) and float(loss_a) == float(loss_b) and int(aux.num_nonfinite) == 0
    tree_allclose(a, c, rtol=1e-6, atol=1e-7)
    _, none, _ = fn(model, x, y, example_mask=np.zeros(10, np.float32))
    assert all(not np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(none))


def test_the_tutorial_train_step_under_nnx_jit_takes_one_noisy_step():
    """The tutorial's nnx.jit train_step with the private grad_fn and an optimizer whose tx starts with the
    privatizer equals clipped_grad + privatize + sgd on the functional params; the model is not mutated by the
    gradient call itself."""
    model, x, y = _mlp()
    batch, mask = {"image": x, "label": y}, np.ones(10, np.float32)
    grad_fn = dpnnx.value_and_clipped_grad(tutorial_loss, l2_clip_norm=0.5, has_aux=True)
    privatizer = dict(l2_clip_norm=0.5, noise_multiplier=1.2, expected_batch_size=10)
    tx = optax.chain(jaxdp.privatize(**privatizer, key=jaxdp.key_from_secret(3)), optax.sgd(0.3))
    before = jax.tree_util.tree_map(np.array, nnx.state(model, nnx.Param))  # a copy
    _, eager, _ = grad_fn(model, batch, example_mask=mask)
    assert tree_equal(nnx.state(model, nnx.Param), before)

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))

    @nnx.jit
    def train_step(model, optimizer, metrics, batch, mask):
        (loss, logits), grads, _ = grad_fn(model, batch, example_mask=mask)
        metrics.update(loss=loss, logits=logits, labels=batch["label"], mask=mask)
        optimizer.update(model, grads)
        return grads

    jitted = train_step(model, optimizer, metrics, batch, mask)
    tree_allclose(jitted, eager, rtol=1e-5, atol=1e-6)

    loss_fn, params = nnx_loss(MLP(12, 5, hidden=(16, 8), rngs=nnx.Rngs(0)))
    g, _ = jaxdp.clipped_grad(loss_fn, l2_clip_norm=0.5)(params, x, y)
    ref_tx = optax.chain(jaxdp.privatize(**privatizer, key=jaxdp.key_from_secret(3)), optax.sgd(0.3))
    updates, _ = ref_tx.update(g, ref_tx.init(params), params)
    tree_allclose(nnx.state(model, nnx.Param), optax.apply_updates(params, updates), rtol=1e-5, atol=1e-6)
    assert float(metrics.compute()["loss"]) > 0


class _Dropout(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(12, 5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x, rngs=None):
        return self.drop(self.linear(x), rngs=rngs)


def test_non_param_state_is_read_only_and_batchnorm_is_refused():
    _, x, y = _mlp()
    fn = dpnnx.value_and_clipped_grad(plain_loss, l2_clip_norm=1.0)
    model = _Dropout(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"non-parameter state 'drop/rngs/(count|key)'.*read-only"):
        fn(model, x, y)
    assert int(model.drop.rngs.count.get_value()) == 0  # nothing was written back into the model

    model.eval()  # deterministic dropout draws nothing: allowed, same as the plain linear layer
    _, g, _ = fn(model, x, y)
    _, g_linear, _ = fn(model.linear, x, y)
    tree_allclose(g["linear"], g_linear)

    # The documented fix: a key per example in the batch, handed to the layer.
    def keyed_loss(model, x, y, keys):
        logits = model(x, rngs=nnx.Rngs(dropout=keys[0]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    model.train()
    keys = jax.random.split(jax.random.key(0), len(y))
    _, g, _ = dpnnx.value_and_clipped_grad(keyed_loss, l2_clip_norm=1.0)(model, x, y, keys)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(g))

    class WithBatchNorm(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(12, 5, rngs=rngs)
            self.norm = nnx.BatchNorm(5, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.linear(x))

    with pytest.raises(ValueError, match="BatchNorm.*GroupNorm"):
        fn(WithBatchNorm(nnx.Rngs(0)), x, y)
    with pytest.raises(TypeError, match="nnx.Module"):
        fn(nnx.state(model, nnx.Param), x, y)


def test_a_module_handed_to_jaxdp_clipped_grad_works_as_a_pytree():
    """jaxdp.clipped_grad takes an nnx.Module as its params pytree (modules are pytrees in flax 0.12): the sum is a
    module of gradients equal to dpnnx's, and nnx.state(grads, nnx.Param) feeds optimizer.update."""
    model, x, y = _mlp()
    module_grads, _ = jaxdp.clipped_grad(plain_loss, l2_clip_norm=0.7)(model, x, y)
    assert isinstance(module_grads, MLP)
    _, grads, _ = dpnnx.value_and_clipped_grad(plain_loss, l2_clip_norm=0.7)(model, x, y)
    tree_allclose(nnx.state(module_grads, nnx.Param), grads, rtol=1e-6, atol=1e-7)
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    before = jax.tree_util.tree_map(np.array, nnx.state(model, nnx.Param))  # a copy
    optimizer.update(model, nnx.state(module_grads, nnx.Param))
    tree_allclose(nnx.state(model, nnx.Param), jax.tree_util.tree_map(jnp.subtract, before, grads))


def _problem(n=200, seed=7):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    return x, rng.integers(0, 5, n).astype(np.int32)


def _plan(**kw):
    args = dict(dataset_size=200, batch_size=20, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=5)
    return jaxdp.PrivacyPlan(**{**args, **kw})


def test_private_step_with_nnx_optimizer_equals_run_private_step():
    """Same noise key, same Poisson draws (spilling into chunks of 16): nnx.Optimizer + private_step gives the
    parameters run_private_step gives on the functional state, step after step, and both accountants agree."""
    x, y = _problem()
    plan = _plan()
    model = MLP(12, 5, hidden=(8,), rngs=nnx.Rngs(7))
    loss_fn, params = nnx_loss(MLP(12, 5, hidden=(8,), rngs=nnx.Rngs(7)))

    step = dpnnx.make_private_step(plan, plain_loss, model, optax.adam(1e-2), noise_key=jaxdp.key_from_secret(77))
    optimizer = nnx.Optimizer(model, step.tx, wrt=nnx.Param)
    reference = jaxdp.make_private_step(plan, loss_fn, optax.adam(1e-2), noise_key=jaxdp.key_from_secret(77))
    state = reference.init(params)
    ours, theirs = plan.make_accountant(), plan.make_accountant()
    sampler = plan.sampler(seed=3, physical_batch_size=16)
    spilled = 0
    for _, chunks in sampler.steps(0, 5):
        batch = [(x[i], y[i], m) for i, m in chunks]
        spilled += len(chunks) > 1
        metrics = dpnnx.private_step(model, optimizer, step, batch, accountant=ours)
        state, ref_metrics = jaxdp.run_private_step(reference, state, batch, accountant=theirs)
        tree_allclose(nnx.state(model, nnx.Param), state.params, rtol=1e-5, atol=1e-6)
        assert float(metrics["examples"]) == float(ref_metrics["examples"])
    assert spilled >= 1  # at least one draw really spilled into several chunks
    assert ours.steps == theirs.steps == int(state.step) == 5


def test_noise_is_added_once_per_draw_however_many_chunks():
    """One draw of 24 examples as 1, 2 or 3 chunks: always the clipped sum plus ONE draw of the privatizer's noise
    (slow reference: per-example loop, then privatize with the same key, then sgd)."""
    x, y = _problem()
    plan = _plan(l2_clip_norm=0.7, noise_multiplier=1.3)
    results = []
    for n_chunks in (1, 2, 3):
        model = MLP(12, 5, hidden=(8,), rngs=nnx.Rngs(7))
        step = dpnnx.make_private_step(plan, plain_loss, model, optax.sgd(0.5), noise_key=jaxdp.key_from_secret(11))
        optimizer = nnx.Optimizer(model, step.tx, wrt=nnx.Param)
        size = 24 // n_chunks
        chunks = [(x[i : i + size], y[i : i + size], np.ones(size, np.float32)) for i in range(0, 24, size)]
        metrics = dpnnx.private_step(model, optimizer, step, chunks)
        assert float(metrics["examples"]) == 24
        results.append(nnx.state(model, nnx.Param))

    model = MLP(12, 5, hidden=(8,), rngs=nnx.Rngs(7))
    total = _reference(model, x[:24], y[:24], np.ones(24), 0.7)
    privatizer = jaxdp.privatize(l2_clip_norm=0.7, noise_multiplier=1.3, expected_batch_size=20, key=11)
    noisy, _ = privatizer.update(total, privatizer.init(total))
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, nnx.state(model, nnx.Param), noisy)
    noiseless = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g / 20, nnx.state(model, nnx.Param), total)
    for got in results:
        tree_allclose(got, expected, rtol=1e-5, atol=1e-6)
    leaves = zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(noiseless), strict=True)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves)
    assert gap > 1e-2  # the noise is really there (so a second draw would show)


def test_the_accountant_is_stepped_once_per_draw_whatever_its_chunks():
    x, y = _problem()
    plan = _plan()
    model = MLP(12, 5, hidden=(8,), rngs=nnx.Rngs(0))
    step = dpnnx.make_private_step(plan, plain_loss, model, optax.sgd(0.1), noise_key=jaxdp.key_from_secret(5))
    optimizer = nnx.Optimizer(model, step.tx, wrt=nnx.Param)
    accountant = plan.make_accountant()
    ones = np.ones(10, np.float32)
    for n_chunks in (1, 3, 2):
        chunks = [(x[10 * i : 10 * i + 10], y[10 * i : 10 * i + 10], ones) for i in range(n_chunks)]
        dpnnx.private_step(model, optimizer, step, chunks, accountant=accountant)
    assert accountant.steps == 3
    assert accountant.epsilon(1e-5) == pytest.approx(plan.epsilon(1e-5, steps=3))


def test_private_step_refuses_what_would_break_the_guarantee():
    x, y = _problem()
    plan = _plan()
    model = _Dropout(nnx.Rngs(0))
    model.eval()
    step = dpnnx.make_private_step(plan, plain_loss, model, optax.sgd(0.1), noise_key=jaxdp.key_from_secret(5))
    chunk = [(x[:10], y[:10], np.ones(10, np.float32))]
    with pytest.raises(ValueError, match=r"step\.tx.*no noise"):
        dpnnx.private_step(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), step, chunk)
    optimizer = nnx.Optimizer(model, step.tx, wrt=nnx.Param)
    with pytest.raises(TypeError, match=r"\(\*batch, mask\)"):
        dpnnx.private_step(model, optimizer, step, [x[:10]])
    model.train()
    with pytest.raises(ValueError, match="model.train"):
        dpnnx.private_step(model, optimizer, step, chunk)
    model.eval()
    model.drop.rngs.count.set_value(model.drop.rngs.count.get_value() + 1)
    with pytest.raises(ValueError, match="'drop/rngs/count' changed since make_private_step"):
        dpnnx.private_step(model, optimizer, step, chunk)
    with pytest.raises(TypeError, match="run_private_step"):
        dpnnx.private_step(model, optimizer, step.functional, chunk)


def test_a_second_optimizer_on_one_step_is_refused():
    """step.tx's init returns the step's noise key each time: a second nnx.Optimizer on it would replay the noise."""
    x, y = _problem()
    model = _Dropout(nnx.Rngs(0))
    model.eval()
    step = dpnnx.make_private_step(_plan(), plain_loss, model, optax.sgd(0.1), noise_key=jaxdp.key_from_secret(6))
    chunk = [(x[:10], y[:10], np.ones(10, np.float32))]
    first = nnx.Optimizer(model, step.tx, wrt=nnx.Param)
    dpnnx.private_step(model, first, step, chunk)
    dpnnx.private_step(model, first, step, chunk)  # the same optimizer again: its key has moved on
    second = nnx.Optimizer(model, step.tx, wrt=nnx.Param)
    with pytest.raises(ValueError, match="repeat the first optimizer's noise"):
        dpnnx.private_step(model, second, step, chunk)
