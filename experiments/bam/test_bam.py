"""BAM and DP-SAT: the estimator's limit, per-example isolation, the clipping bound, privatised-only ascent."""

import json
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
from experiments.bam.bam import BiasProbe, bam_example_grad, clipping_bias, method_hooks, sat_perturb
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


@pytest.mark.parametrize(
    "model, microbatch_size",
    [
        ("mlp", None),
        ("mlp", 3),
        ("cnn", None),
        # BAM microbatched is still checked against the loop on the MLP above.
        pytest.param("cnn", 3, marks=pytest.mark.slow),  # ~6 s (make test stays under 10 minutes)
    ],
)
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


def loop_bias(g, clip, h=None):
    """The slow reference: clipping bias by a Python loop over examples, in float64."""
    g = np.asarray(g, np.float64)
    n = len(g)

    def clipped(v):
        norm = math.sqrt(sum(float(x) ** 2 for x in v))
        return v * (clip / norm) if norm > clip else v, norm

    mean, cmean, norms = np.zeros(g.shape[1]), np.zeros(g.shape[1]), []
    for i in range(n):
        c, norm = clipped(g[i])
        mean += g[i] / n
        cmean += c / n
        norms.append(norm)
    out = {
        "bias": np.linalg.norm(cmean - mean),
        "cosine": cmean @ mean / (np.linalg.norm(cmean) * np.linalg.norm(mean)),
        "bias_bound": sum(max(0.0, x - clip) for x in norms) / n,
        "clipped_fraction": sum(x > clip for x in norms) / n,
        "norm_median": float(np.median(norms)),
        "grad_norm": np.linalg.norm(mean),
    }
    if h is not None:
        hmean = sum(clipped(np.asarray(h[i], np.float64))[0] for i in range(n)) / n
        out["oracle_bias"] = np.linalg.norm(hmean - mean)
        out["oracle_cosine"] = hmean @ mean / (np.linalg.norm(hmean) * np.linalg.norm(mean))
    return out


def _cases():
    rng = np.random.default_rng(7)
    random = rng.normal(size=(48, 30)) * rng.uniform(0.1, 3.0, size=(48, 1))
    adversarial = np.concatenate(
        [
            np.zeros((3, 30)),  # zero gradients
            np.eye(30)[:4] * 0.5,  # exactly at C = 0.5
            rng.normal(size=(4, 30)) * 1e6,  # huge
            rng.normal(size=(4, 30)) * 1e-9,  # tiny
            np.ones((1, 30)),  # the one example that survives the cancellation below
        ]
    )
    pair = rng.normal(size=(6, 30)) * 5
    adversarial = np.concatenate([adversarial, pair, -pair])  # cancelling pairs: bound large, bias not
    return {"random": random, "adversarial": adversarial}


@pytest.mark.parametrize("case", ["random", "adversarial"])
def test_clipping_bias_equals_a_loop_over_examples(case):
    g = _cases()[case]
    h = g + np.random.default_rng(1).normal(size=g.shape)  # another estimator (as BAM's g^BAM)
    got, want = clipping_bias(g, 0.5, estimator=h), loop_bias(g, 0.5, h)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert got["bias"] <= got["bias_bound"] + 1e-9  # the triangle inequality the bound rests on
    np.testing.assert_allclose(clipping_bias(g, 0.5, estimator=g)["oracle_bias"], got["bias"], rtol=1e-12)


def test_bias_is_not_its_bound_and_vanishes_when_nothing_is_clipped():
    u = np.eye(4)[0]
    cancel = clipping_bias(np.stack([5 * u, -5 * u]), 1.0)  # clipping keeps the (zero) mean exactly
    assert cancel["bias"] == 0.0 and cancel["bias_bound"] == 4.0 and cancel["clipped_fraction"] == 1.0
    same = clipping_bias(np.stack([3 * u, 5 * u]), 1.0)  # one direction: clipping only shrinks
    assert same["bias"] == pytest.approx(3.0) and same["cosine"] == pytest.approx(1.0)
    small = clipping_bias(np.random.default_rng(0).normal(size=(10, 4)) * 0.01, 1.0)
    assert small["bias"] == 0.0 and small["bias_bound"] == 0.0 and small["cosine"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="expected \\(examples, parameters\\)"):
        clipping_bias(np.zeros(4), 1.0)


def test_bias_probe_measures_plain_and_bam_gradients_of_its_examples_like_a_loop(tmp_path):
    model = MLP(12, 5, hidden=(16,), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def logits(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    rng = np.random.default_rng(0)
    ds = jaxdp.data.Dataset(
        "toy", rng.normal(size=(40, 12)).astype(np.float32) * 2, rng.integers(0, 5, 40), None, None, 5
    )
    plan = jaxdp.PrivacyPlan(dataset_size=40, batch_size=8, l2_clip_norm=0.3, noise_multiplier=1.0, num_steps=5)
    probe = BiasProbe(size=12, every=2, example_grad=bam_example_grad(radius=0.05, lam=0.05), chunk=8)
    probe.on_start(predict_logits=jax.jit(logits), dataset=ds, plan=plan)
    assert len(probe.y) == 12 and probe.steps == [1, 2, 4, 5]

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x[None]), y[None]).mean()

    g_rows, h_rows = [], []
    grad = jax.jit(jax.grad(loss))
    for x, y in zip(probe.x, probe.y, strict=True):  # one example at a time
        g = grad(params, x, y)
        gn = math.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree_util.tree_leaves(g)))
        moved = jax.tree_util.tree_map(lambda p, d, gn=gn: p + 0.05 * d / gn, params, g)
        g_rows.append(flat(g))
        h_rows.append(flat(grad(moved, x, y)))  # alpha = lam / r = 1
    want = loop_bias(np.stack(g_rows), 0.3, np.stack(h_rows))
    got = probe.measure(params)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-4, atol=1e-6, err_msg=key)
    assert not np.allclose(np.stack(h_rows), np.stack(g_rows), rtol=1e-2)  # BAM's vectors are not the g_i

    probe.on_step(3, params)  # not a probe step
    assert probe.history() == []
    for step in (1, 2):
        probe.on_step(step, params)
    assert [r["step"] for r in probe.history()] == [1, 2]
    resumed = BiasProbe(size=12, every=2, example_grad=bam_example_grad(radius=0.05, lam=0.05), chunk=8)
    resumed.on_start(predict_logits=jax.jit(logits), dataset=ds, plan=plan)
    template, state = resumed.state_template(params), probe.state_dict()
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), template) == jax.tree_util.tree_map(
        lambda a: (a.shape, a.dtype), state
    )  # what a checkpoint restores into
    resumed.load_state_dict(state)
    assert resumed.history() == probe.history()
    out = resumed.on_end(params, str(tmp_path))
    assert out["final_bias"] == pytest.approx(want["bias"], rel=2e-4)
    assert {"final_bias", "final_oracle_bias", "bias_history"} <= set(out["not_covered_by_epsilon"])
    assert len((tmp_path / "bias.jsonl").read_text().splitlines()) == 2


def _row(method, seed, acc, bias, eps=3.0, spent=3.0, evaluated_on="test", lr=0.01, cos=0.5):
    return {
        "method": method, "epsilon_target": eps, "seed": seed, "learning_rate": lr, "evaluated_on": evaluated_on,
        "radius": 0.05 if method == "bam" else None, "lam": 0.05 if method == "bam" else None,
        "sat_radius": 0.05 if method == "dpsat" else None, "epsilon_spent": spent, "accuracy": acc,
        "late_bias": bias, "late_cosine": cos, "history": [],
    }  # fmt: skip


def _rows(acc_gain, bias_drop, seeds=5, spent_bam=3.0, cos=0.5):
    rows = []
    for s in range(seeds):
        jitter = 0.002 * (s - 2)
        rows.append(_row("dpsgd", s, 0.80 + jitter, 0.40 + jitter, cos=0.3 + jitter))
        rows.append(_row("bam", s, 0.80 + acc_gain + jitter, 0.40 - bias_drop + jitter, spent=spent_bam, cos=cos))
    return rows


def test_verdict_needs_the_actual_bias_to_fall_and_an_accuracy_gain_beyond_the_seed_std():
    assert "**reproduced**" in run.verdict_text(_rows(0.02, 0.05), 5)
    assert "does not fall" in run.verdict_text(_rows(0.02, 0.0), 5)  # accuracy alone is not enough
    assert "**not reproduced**" in run.verdict_text(_rows(0.02, 0.0), 5)
    assert "**not reproduced**" in run.verdict_text(_rows(0.001, 0.05), 5)  # gain within the seed std
    # The bias falls but the direction is no better: a smaller gradient, not less clipping bias.
    assert "does not rise" in run.verdict_text(_rows(0.02, 0.05, cos=0.3), 5)
    assert "**not reproduced**" in run.verdict_text(_rows(0.02, 0.05, cos=0.3), 5)
    # --redo appends: the latest row of a run counts, once.
    rows = _rows(0.02, 0.05)
    redone = [dict(r, accuracy=0.5) for r in rows if r["method"] == "bam"]
    assert "**not reproduced**" in run.verdict_text(rows + redone, 5)
    assert len(run.latest(rows + redone)) == len(rows)
    # Rows of another r or step size are not this table's.
    config = load_config(run.config_path("digits"))
    mine = [dict(r, learning_rate=config.optimizer.learning_rate, radius=config.bam.radius, lam=config.bam.lam)
            for r in rows]  # fmt: skip
    other = [dict(r, radius=0.5, lam=0.5) for r in mine if r["method"] == "bam"]
    assert run.table_rows(mine + other, config) == mine
    assert "not testable yet: 4 seed(s)" in run.verdict_text(_rows(0.02, 0.05, seeds=4), 5)
    assert "ε spent differs" in run.verdict_text(_rows(0.02, 0.05, spent_bam=3.1), 5)
    validation = [dict(r, evaluated_on="validation") for r in _rows(0.02, 0.05)]
    assert run.verdict_text(validation, 5) == ""  # search rows never make a verdict


def test_runs_on_record_are_skipped_and_the_search_never_sees_the_test_set(tmp_path, monkeypatch):
    seen = []

    def fake_run_one(config, method, eps, seed, workdir, quiet=True):
        seen.append((method, seed, config.get("validation_size"), float(config.optimizer.learning_rate)))
        acc = 0.5 + float(config.optimizer.learning_rate)  # the larger step size (and r, rho) wins the search
        acc += {"bam": float(config.bam.radius), "dpsat": float(config.bam.sat_radius)}.get(method, 0.0)
        return _row(method, seed, acc, 0.4, eps, evaluated_on="validation" if config.validation_size else "test",
                    lr=float(config.optimizer.learning_rate)) | {  # fmt: skip
            "radius": float(config.bam.radius) if method == "bam" else None,
            "lam": float(config.bam.lam) if method == "bam" else None,
            "sat_radius": float(config.bam.sat_radius) if method == "dpsat" else None,
            "late_cosine": 0.5, "wall_s": 0.0, "config_id": run.config_id(config),
        }  # fmt: skip

    monkeypatch.setattr(run, "run_one", fake_run_one)
    monkeypatch.setattr(run, "RESULTS", str(tmp_path))
    monkeypatch.setattr(run, "ROOT", str(tmp_path))
    monkeypatch.setattr(run, "FIGURES", str(tmp_path))
    monkeypatch.setattr(run, "plot", lambda rows, path: path)  # the fake rows have no history to draw
    with pytest.raises(SystemExit, match="no search on record"):
        run.main(["--table", "digits"])
    run.main(["--tune", "digits"])
    config = load_config(run.config_path("digits"))
    b = config.bam
    assert len(seen) == len(b.tune_seeds) * (len(b.tune_learning_rates) + len(b.tune_radii) + len(b.tune_sat_radii))
    assert all(vs == b.tune_validation_size > 0 for _, _, vs, _ in seen)  # never evaluated on the test set
    assert {lr for m, _, _, lr in seen if m != "dpsgd"} == {max(b.tune_learning_rates)}  # stage 2 at the best
    tune_file = tmp_path / "digits_tune.jsonl"
    assert len(tune_file.read_text().splitlines()) == len(seen)
    seen.clear()
    run.main(["--tune", "digits"])  # everything is on record: nothing trains again
    assert seen == []
    rows = tune_file.read_text().splitlines()
    tune_file.write_text("\n".join(rows[:-1]) + "\n" + rows[-1][:40])  # the last run killed while writing its row
    run.main(["--tune", "digits"])
    assert len(seen) == 1  # that run trains again, and its row does not join the cut-off text
    assert [json.loads(line) for line in tune_file.read_text().splitlines()][-1]["seed"] == json.loads(rows[-1])["seed"]
    seen.clear()
    with pytest.raises(SystemExit, match="optimizer.learning_rate=0.1 bam.radius=0.1 bam.sat_radius=0.1"):
        run.check_tuned("digits", config)  # the config's values are not the (fake) search's choice
    picked = ["optimizer.learning_rate=0.1", "bam.radius=0.1", "bam.lam=0.1", "bam.sat_radius=0.1"]
    run.check_tuned("digits", apply_overrides(load_config(run.config_path("digits")), picked))
    run.main(["--table", "digits", "--untuned", "epochs=1"])
    assert len(seen) == 3 * len(b.epsilons) * len(b.seeds) and all(vs == 0 for _, _, vs, _ in seen)
    seen.clear()
    run.main(["--table", "digits", "--untuned", "--redo", "bam.seeds=(0,)", "bam.epsilons=(3.0,)"])
    assert [m for m, *_ in seen] == ["dpsgd", "dpsat", "bam"]
    seen.clear()
    run.main(["--table", "digits", "--untuned", "epochs=2"])  # another recipe: nothing of the epochs=1 rows is reused
    assert len(seen) == 3 * len(b.epsilons) * len(b.seeds)


@pytest.mark.slow  # ~40 s: trains all three methods for 2 epochs (CI's slow step)
def test_smoke_table_trains_every_method_and_probes_the_bias(tmp_path):
    config = load_config(SMOKE)
    path = str(tmp_path / "smoke.jsonl")
    rows = run.run_cells(config, run.table_cells(config), path, str(tmp_path))
    assert [r["method"] for r in rows] == ["dpsgd", "dpsat", "bam"]
    for r in rows:
        assert r["epsilon_spent"] <= 3.0 + 1e-9 and 0.2 < r["accuracy"] <= 1.0  # above chance (0.1)
        assert r["history"][0]["step"] == 1 and r["history"][-1]["step"] == r["steps"]
        assert 0 <= r["late_bias"] <= r["late_bias_bound"] and r["late_clipped_fraction"] > 0.5  # C < norms
    assert "late_oracle_bias" in rows[2] and "late_oracle_bias" not in rows[0]
    assert run.run_cells(config, run.table_cells(config), path, str(tmp_path)) == []  # on record
    assert "| 3 (" in run.table_text(rows) and "not testable yet: 1 seed(s)" in run.verdict_text(rows, 5)


def test_cifar_recipe_is_the_authors_setting():
    config = load_config(os.path.join(HERE, "configs", "cifar10_wrn16_4.py"))
    assert (config.privacy.target_epsilon, config.privacy.delta, config.privacy.l2_clip_norm) == (8.0, 1e-5, 1.0)
    assert config.batch_size == 4096 and config.physical_batch_size == 256 and config.augment.multiplicity == 6
    assert config.model.name == "wrn" and (config.optimizer.name, config.optimizer.learning_rate) == ("nadam", 2e-3)
    assert config.bam.method == "bam" and 0 < config.bam.radius <= 0.1 and config.bam.lam == config.bam.radius
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


@pytest.mark.slow  # ~40 s: compiles six steps (CI's slow step)
def test_bench_times_every_row_side_by_side():
    from experiments.bam import bench

    best = bench.main(["--batch", "16", "--steps", "1", "--rounds", "1", "--set", "model.kwargs.features=(4,)"])
    assert set(best) == {
        "non-private",
        "DP-SGD (vmap)",
        "DP-SGD (ghost)",
        "DP-SAT",
        "BAM",
        "two gradients, shared point",
    }
    assert all(t > 0 for t in best.values())
