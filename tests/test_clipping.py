"""clipped_grad against a slow per-example python loop, and its guarantees (jaxdp/clipping/fn.py, vmap.py, core.py)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cnn_problem, nnx_loss, tree_allclose, tree_equal
from flax import nnx

import jaxdp
from jaxdp.clipping import batch_argnums, core
from jaxdp.models import MLP

_GRADS = {}


def _grad(loss_fn):
    """One jitted single-example gradient per loss (the loop stays a loop; only faster)."""
    if loss_fn not in _GRADS:
        _GRADS[loss_fn] = jax.jit(jax.grad(loss_fn))
    return _GRADS[loss_fn]


def reference_clipped_sum(loss_fn, params, x, y, clip, per_layer=False, mask=None):
    """The obviously-correct version: one example at a time, in numpy."""
    total = None
    norms = []
    for i in range(x.shape[0]):
        g = _grad(loss_fn)(params, x[i : i + 1], y[i : i + 1])
        leaves, treedef = jax.tree_util.tree_flatten(g)
        leaves = [np.asarray(v, np.float64) for v in leaves]
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in leaves))
        norms.append(norm)
        if per_layer:
            budget = clip / math.sqrt(len(leaves))
            leaves = [v * min(1.0, budget / max(np.linalg.norm(v), 1e-30)) for v in leaves]
        else:
            leaves = [v * min(1.0, clip / max(norm, 1e-30)) for v in leaves]
        if mask is not None and mask[i] == 0:
            leaves = [np.zeros_like(v) for v in leaves]
        total = leaves if total is None else [t + v for t, v in zip(total, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, total), np.asarray(norms)


@pytest.mark.parametrize("problem", ["mlp", "cnn-dp", "cnn-nnx"])
@pytest.mark.parametrize("microbatch_size", [None, 3, 4])
@pytest.mark.parametrize("per_layer", [False, True])
def test_equals_per_example_loop(problem, microbatch_size, per_layer, request):
    if problem == "mlp":
        loss_fn, params, x, y = request.getfixturevalue("mlp_problem")
    else:
        loss_fn, params, x, y = make_cnn_problem(problem.removeprefix("cnn-"))
    clip = 0.7
    fn = jax.jit(
        jaxdp.clipped_grad(
            loss_fn, l2_clip_norm=clip, microbatch_size=microbatch_size, per_layer=per_layer, return_norms=True
        )
    )
    got, aux = fn(params, x, y)
    want, want_norms = reference_clipped_sum(loss_fn, params, x, y, clip, per_layer=per_layer)
    tree_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux.norms), want_norms, rtol=1e-4)
    assert aux.loss.shape == (x.shape[0],)
    # The problems are built so that clipping is active for some examples.
    assert int(aux.num_clipped) > 0


def test_microbatching_matches_whole_batch(mlp_problem):
    loss_fn, params, x, y = mlp_problem
    mask = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], jnp.float32)
    whole = jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, return_norms=True)
    for m in (1, 3, 5, 10, 64):
        chunked = jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, return_norms=True, microbatch_size=m)
        (g1, a1), (g2, a2) = whole(params, x, y, example_mask=mask), chunked(params, x, y, example_mask=mask)
        tree_allclose(g1, g2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a1.norms, a2.norms, rtol=1e-6)
        assert int(a1.num_clipped) == int(a2.num_clipped)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("per_layer", [False, True])
def test_each_clipped_gradient_is_within_bound(seed, per_layer):
    """Random model, random data, random C: every example's clipped gradient has norm <= C."""
    rng = np.random.default_rng(seed)
    hidden = tuple(int(h) for h in rng.integers(2, 40, size=rng.integers(1, 3)))
    model = MLP(6, 3, hidden=hidden, rngs=nnx.Rngs(seed))
    loss_fn, params = nnx_loss(model)
    n = 9
    x = jnp.asarray(rng.normal(size=(n, 6)) * 10 ** rng.uniform(-1, 2), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=n), jnp.int32)
    clip = float(10 ** rng.uniform(-3, 2))
    fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=clip, per_layer=per_layer, return_norms=True))
    for i in range(n):
        one_hot = jnp.zeros(n).at[i].set(1.0)
        g, aux = fn(params, x, y, example_mask=one_hot)
        norm = float(jaxdp.per_example_norms(jax.tree_util.tree_map(lambda v: v[None], g))[0])
        assert norm <= clip * (1 + 1e-6), (i, norm, clip)
        # Unclipped examples keep their gradient exactly (up to rounding).
        if float(aux.norms[i]) < (clip / math.sqrt(len(jax.tree_util.tree_leaves(g))) if per_layer else clip):
            np.testing.assert_allclose(norm, float(aux.norms[i]), rtol=1e-5)


def test_masked_examples_contribute_exactly_zero(mlp_problem):
    loss_fn, params, x, y = mlp_problem
    mask = jnp.asarray([1, 0, 1, 1, 0, 1, 1, 1, 1, 0], jnp.float32)
    fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=0.5))
    g_a, aux_a = fn(params, x, y, example_mask=mask)
    # Whatever sits in the masked slots (huge values, NaN) changes nothing, bit for bit.
    garbage = x.at[1].set(1e30).at[4].set(jnp.nan).at[9].set(-7.0)
    g_b, aux_b = fn(params, garbage, y, example_mask=mask)
    assert tree_equal(g_a, g_b)
    assert int(aux_b.num_nonfinite) == 0  # masked NaN examples are not counted as dropped
    # ...and equals the sum over the unmasked examples only.
    keep = np.flatnonzero(np.asarray(mask))
    want, _ = reference_clipped_sum(loss_fn, params, x[keep], y[keep], 0.5)
    tree_allclose(g_a, want, rtol=1e-4, atol=1e-6)
    # An all-masked batch gives exactly zero.
    g0, _ = fn(params, x, y, example_mask=jnp.zeros(10))
    assert all(not np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(g0))


def test_nonfinite_example_is_dropped_and_counted(mlp_problem):
    loss_fn, params, x, y = mlp_problem
    fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, return_norms=True))
    bad = x.at[3, 0].set(jnp.nan).at[6, 2].set(jnp.inf)
    g, aux = fn(params, bad, y)
    assert int(aux.num_nonfinite) == 2
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree_util.tree_leaves(g))
    assert not np.isfinite(float(aux.norms[3]))
    mask = jnp.ones(10).at[3].set(0).at[6].set(0)
    g_masked, _ = fn(params, x, y, example_mask=mask)
    assert tree_equal(g, g_masked)


def test_zero_gradient_stays_zero():
    def loss(w, x):
        return jnp.mean(x @ w) * 0.0

    g, aux = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, return_norms=True)(jnp.ones(3), jnp.ones((4, 3)))
    assert np.array_equal(np.asarray(g), np.zeros(3))
    assert int(aux.num_nonfinite) == 0 and int(aux.num_clipped) == 0


def test_plain_dict_params_unbatched_args_and_aux():
    def loss(p, x, scale):
        pred = x @ p["w"] + p["b"]
        return jnp.mean(scale * pred**2), pred

    params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    x = jnp.arange(12.0).reshape(4, 3)
    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1e6, batch_argnums=1, has_aux=True)
    g, aux = fn(params, x, 2.0)
    # Huge C: no clipping, so the sum is the sum of per-example gradients = 4 x grad of the mean.
    exact = jax.grad(lambda p: loss(p, x, 2.0)[0])(params)
    tree_allclose(g, jax.tree_util.tree_map(lambda v: 4 * v, exact), rtol=1e-6)
    assert aux.aux.shape == (4, 1)


def test_no_recompile_for_new_masks_and_data(mlp_problem):
    loss_fn, params, x, y = mlp_problem
    fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0))
    for seed in range(4):
        mask = jnp.asarray(np.random.default_rng(seed).integers(0, 2, 10), jnp.float32)
        fn(params, x + seed, y, example_mask=mask)
    assert fn._cache_size() == 1


def test_sensitivity_is_reported(mlp_problem):
    loss_fn = mlp_problem[0]
    assert jaxdp.clipped_grad(loss_fn, l2_clip_norm=2.5).l2_sensitivity == 2.5


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "1.0", None])
def test_bad_clip_norm_is_refused(bad, mlp_problem):
    with pytest.raises(ValueError, match="l2_clip_norm"):
        jaxdp.clipped_grad(mlp_problem[0], l2_clip_norm=bad)


def test_bad_arguments_name_themselves(mlp_problem):
    loss_fn, params, x, y = mlp_problem
    with pytest.raises(ValueError, match="microbatch_size"):
        jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, microbatch_size=0)
    fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0)
    with pytest.raises(ValueError, match="example_mask"):
        fn(params, x, y, example_mask=jnp.ones(3))
    with pytest.raises(ValueError, match="leading"):
        fn(params, x, y[:4])
    with pytest.raises(ValueError, match="batch_argnums"):
        jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, batch_argnums=5)(params, x, y)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_bound_holds_for_low_precision_params(dtype):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(16, 4)), dtype)}
    x = jnp.asarray(rng.normal(size=(32, 16)) * 5, dtype)

    def loss(p, xb):
        return jnp.mean(jnp.sum(jnp.tanh(xb @ p["w"]) ** 2, axis=-1))

    fn = jax.jit(jaxdp.clipped_grad(loss, l2_clip_norm=1.0))
    for i in range(32):
        g, _ = fn(params, x, example_mask=jnp.zeros(32).at[i].set(1.0))
        assert g["w"].dtype == jnp.float32
        assert float(jnp.linalg.norm(g["w"])) <= 1.0 * (1 + 1e-6)


def test_pytree_batches_are_supported():
    def loss(w, batch):
        return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

    batch = {"x": jnp.arange(12.0).reshape(4, 3), "y": jnp.ones(4)}
    g, aux = jaxdp.clipped_grad(loss, l2_clip_norm=1e6)(jnp.ones(3), batch)
    exact = 4 * jax.grad(loss)(jnp.ones(3), batch)
    np.testing.assert_allclose(g, exact, rtol=1e-6)
    with pytest.raises(ValueError, match="leading"):
        jaxdp.clipped_grad(loss, l2_clip_norm=1.0)(jnp.ones(3), {"x": batch["x"], "y": jnp.ones(3)})


def test_example_grad_hook_is_what_gets_clipped(mlp_problem):
    """A per-example estimator's output is clipped and summed exactly like a plain gradient (vs a loop)."""
    loss_fn, params, x, y = mlp_problem

    def doubled_with_own_loss(value_and_grad, p):  # any function of the one example it is given
        (loss, aux), g = value_and_grad(p)
        return (loss, aux), jax.tree_util.tree_map(lambda v: (2.0 + loss) * v, g)

    mask = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], jnp.float32)
    fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm=0.8, example_grad=doubled_with_own_loss, return_norms=True)
    got, aux = jax.jit(fn)(params, x, y, example_mask=mask)
    per_example, losses = jax.jit(fn.per_example_grads)(params, x, y)
    want, want_norms = None, []
    for i in range(x.shape[0]):
        loss_i = float(jax.jit(loss_fn)(params, x[i : i + 1], y[i : i + 1]))
        g = [
            np.asarray(v, np.float64) * (2.0 + loss_i)
            for v in jax.tree_util.tree_leaves(_grad(loss_fn)(params, x[i : i + 1], y[i : i + 1]))
        ]
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in g))
        want_norms.append(norm)
        np.testing.assert_allclose(np.asarray(losses[i]), loss_i, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(per_example), g, strict=True):
            np.testing.assert_allclose(np.asarray(a[i]), b, rtol=1e-4, atol=1e-5)
        g = [v * min(1.0, 0.8 / norm) * float(mask[i]) for v in g]
        want = g if want is None else [s + v for s, v in zip(want, g, strict=True)]
    for a, b in zip(jax.tree_util.tree_leaves(got), want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux.norms), want_norms, rtol=1e-4)


def test_example_grad_must_return_a_params_shaped_gradient(mlp_problem):
    loss_fn, params, x, y = mlp_problem
    with pytest.raises(TypeError, match="example_grad returned a gradient with structure"):
        jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, example_grad=lambda vg, p: (vg(p)[0], [0.0]))(params, x, y)
    with pytest.raises(TypeError, match="example_grad=3 is not callable"):
        jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, example_grad=3)


def test_batch_argnums_names_the_batched_arguments():
    assert batch_argnums(None, 3) == (1, 2, 3)
    assert batch_argnums(2, 3) == (2,)
    assert batch_argnums([1, 3], 3) == (1, 3)
    for bad in (0, 4, [1, 0], "1"):
        with pytest.raises(ValueError, match="batch_argnums=.*valid batch argnums are 1..3"):
            batch_argnums(bad, 3)


def test_scaled_sum_is_one_product_when_every_dropped_example_is_finite():
    """core.scaled_sum with ``finite`` (from each example's sum of squares): one product of the factors with the
    gradients when every dropped example is finite, where a dropped (masked) example adds 0 * g = 0 exactly,
    whatever its values; the select otherwise, where a dropped NaN/inf adds exactly zero. The product is taken
    only as claimed: told a NaN example is finite, the sum is NaN (the contract the callers keep)."""
    rng = np.random.default_rng(0)
    g = rng.normal(size=(8, 3, 5)).astype(np.float32)
    factor = jnp.asarray(rng.uniform(0.1, 1.0, 8), jnp.float32)
    keep = jnp.asarray([True, True, False, True, True, False, True, True])
    expected = np.einsum("b,bij->ij", np.where(np.asarray(keep), np.asarray(factor), 0.0), g.astype(np.float64))

    def total(per_example, finite):
        return np.asarray(jax.jit(core.scaled_sum)(jnp.asarray(per_example), factor, keep, finite))

    def finite_of(per_example):
        return jnp.isfinite(core.sq_norm_per_example(jnp.asarray(per_example)))

    huge, zero = g.copy(), g.copy()
    huge[[2, 5]], zero[[2, 5]] = 1e15, 0.0  # squares finite: "finite" holds
    np.testing.assert_allclose(total(huge, finite_of(huge)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(total(huge, finite_of(huge)), total(zero, finite_of(zero)))  # exactly zero
    bad = g.copy()
    bad[2, 0, 0], bad[5, 1, 2] = np.nan, np.inf
    np.testing.assert_allclose(total(bad, finite_of(bad)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total(bad, None), expected, rtol=1e-5, atol=1e-6)
    assert bool(finite_of(huge).all())
    assert np.isnan(total(bad, jnp.ones(8, bool))).any()  # the product, when told (wrongly) that all are finite
    low = total(huge.astype(jnp.bfloat16), finite_of(huge.astype(jnp.bfloat16)))  # summed in float32
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(10, 5, 20), (64, 3, 3, 32), (256, 288, 64)])
def test_scaled_sum_bits_do_not_depend_on_what_dropped_examples_hold(shape):
    """Which way core.scaled_sum sums (one product, or rows zeroed first) depends on the dropped examples' data:
    are they finite? The two ways must give the same bits, or a masked example's NaN would show in the rounding
    of the sum (it did: the select-and-sum rounded in another order than the product at XLA's default level)."""
    rng = np.random.default_rng(sum(shape))
    g = rng.normal(size=shape).astype(np.float32)
    b = shape[0]
    factor = jnp.asarray(rng.uniform(0.1, 1.0, b), jnp.float32)
    keep = jnp.asarray(rng.uniform(size=b) < 0.7)
    fn = jax.jit(core.scaled_sum)

    def total(per_example):
        per_example = jnp.asarray(per_example)
        return np.asarray(fn(per_example, factor, keep, jnp.isfinite(core.sq_norm_per_example(per_example))))

    dropped = ~np.asarray(keep)
    finite_rows, nan_rows, zero_rows = g.copy(), g.copy(), g.copy()
    finite_rows[dropped] = rng.normal(size=finite_rows[dropped].shape) * 1e6
    nan_rows[dropped] = np.nan
    nan_rows[np.flatnonzero(dropped)[0]] = np.inf
    zero_rows[dropped] = 0.0
    reference = total(finite_rows)
    expected = np.einsum("b,b...->...", np.where(dropped, 0.0, np.asarray(factor, np.float64)), g.astype(np.float64))
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)
    for other in (nan_rows, zero_rows, g):
        np.testing.assert_array_equal(total(other), reference)


def test_clip_factors_use_the_bound_keep_finite_unmasked_and_count():
    """The core, alone: factors from the bounds, norms from the estimates, a slightly negative estimate is
    kept (not dropped as NaN), NaN is dropped and counted, a masked example is neither kept nor counted."""
    leaf_sq = [jnp.asarray([4.0, -1e-9, jnp.nan, 100.0]), jnp.asarray([0.0, 0.0, 1.0, 0.0])]
    leaf_bound = [jnp.asarray([9.0, 1e-9, jnp.nan, 100.0]), jnp.asarray([0.0, 0.0, 1.0, 0.0])]
    mask = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    factors, keep, norms, (n_clip, n_bad) = core.clip_factors(
        leaf_sq, mask, l2_clip_norm=1.0, per_layer=False, leaf_bound=leaf_bound
    )
    np.testing.assert_allclose(np.asarray(norms)[[0, 1, 3]], [2.0, 0.0, 10.0])
    assert np.isnan(float(norms[2]))
    np.testing.assert_allclose(np.asarray(factors[0])[[0, 1, 3]], [1 / 3, 1.0, 0.1], rtol=1e-6)
    assert factors[0] is factors[1]  # whole-gradient clipping: one factor for every leaf
    assert np.asarray(keep).tolist() == [True, True, False, False]
    assert (int(n_clip), int(n_bad)) == (1, 1)
    # The masked sum: dropped examples (NaN or masked) add exactly zero.
    per_example = jnp.asarray([[3.0, 0.0], [1.0, 1.0], [jnp.nan, jnp.inf], [5.0, 5.0]])
    np.testing.assert_allclose(np.asarray(core.scaled_sum(per_example, factors[0], keep)), [2.0, 1.0], rtol=1e-6)
    # Per layer: each of the K = 2 leaves gets C / sqrt(2).
    factors, *_ = core.clip_factors(
        [jnp.asarray([2.0]), jnp.asarray([0.25])], jnp.ones(1), l2_clip_norm=1.0, per_layer=True
    )
    np.testing.assert_allclose([float(factors[0][0]), float(factors[1][0])], [0.5, 1.0], rtol=1e-6)


_LOW_PRECISION_AT_O0 = """
import jax, jax.numpy as jnp, numpy as np, jaxdp
worst = {}
for dtype in (jnp.bfloat16, jnp.float16):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(16, 4)), dtype)}
    x = jnp.asarray(rng.normal(size=(32, 16)) * 5, dtype)
    loss = lambda p, xb: jnp.mean(jnp.sum(jnp.tanh(xb @ p["w"]) ** 2, axis=-1))
    fn = jax.jit(jaxdp.clipped_grad(loss, l2_clip_norm=1.0))
    norms = [float(jnp.linalg.norm(fn(params, x, example_mask=jnp.zeros(32).at[i].set(1.0))[0]["w"])) for i in range(32)]
    worst[jnp.dtype(dtype).name] = max(norms)
print(worst)
"""


def test_low_precision_bound_holds_whatever_xla_fuses():
    """float16 parameters clipped to 1.00045 C when XLA's CPU backend fused at optimisation level 0: the norm saw
    one rounding of the gradient, the sum another. The clip factor now allows for it (core.rounding_slack)."""
    import ast
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.run([sys.executable, "-c", _LOW_PRECISION_AT_O0], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    worst = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert worst["float16"] <= 1.0 * (1 + 1e-6) and worst["bfloat16"] <= 1.0 * (1 + 1e-6), worst
    assert worst["float16"] > 0.99  # the examples really are clipped (the bound is at stake)


def test_rounding_slack_is_one_eps_below_float32_and_none_above():
    from jaxdp.clipping.core import rounding_slack

    assert rounding_slack(jnp.float32) == rounding_slack(jnp.float64) == rounding_slack(jnp.complex64) == 1.0
    assert rounding_slack(jnp.float16) == pytest.approx((1 + 2**-10) ** 2)
    assert rounding_slack(jnp.bfloat16) == pytest.approx((1 + 2**-7) ** 2)
