"""DP-SGLD: the temperature derivation recovers a known posterior; accounting is unaffected; smoke run."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from experiments.langevin import run
from experiments.langevin.langevin import (
    PosteriorPredictive,
    hessian_top_eigenvalue,
    learning_rate_for_temperature,
    loss_plateau_epoch,
    noise_for_temperature,
    temperature,
)
from jaxdp import metrics
from jaxdp.train import train

HERE = os.path.dirname(os.path.abspath(__file__))
SMOKE = os.path.join(HERE, "configs", "digits.py") + ":smoke"


def test_temperature_formulas_round_trip_and_never_lower_privacy_noise():
    common = dict(dataset_size=1437, batch_size=512, l2_clip_norm=1.0)
    lr = learning_rate_for_temperature(0.4, noise_multiplier=5.97, **common)
    assert temperature(learning_rate=lr, noise_multiplier=5.97, **common) == pytest.approx(0.4, rel=1e-12)
    # Fixed step size: noise is topped up to reach the temperature...
    sigma, tau = noise_for_temperature(0.4, learning_rate=lr / 4, privacy_noise_multiplier=5.97, **common)
    assert sigma == pytest.approx(2 * 5.97) and tau == pytest.approx(0.4)
    # ...but never lowered below what privacy needs (the chain then runs hotter).
    sigma, tau = noise_for_temperature(0.4, learning_rate=lr * 4, privacy_noise_multiplier=5.97, **common)
    assert sigma == 5.97 and tau == pytest.approx(1.6)


def test_dp_sgld_recovers_a_known_gaussian_posterior():
    """Gaussian mean model, prior from weight decay: posterior N(Σx / (N(1+λ)), τ / (N(1+λ)) I).

    The privacy noise alone (σC, the step size from `learning_rate_for_temperature`)
    must produce the posterior at τ = 1: a factor-2 slip in the derivation would put
    the variance off by 100%. Full-batch (q = 1) removes minibatch noise and C is far
    above every gradient norm, so clipping is inactive; the Euler discretisation
    inflates the variance by 1/(1 − η(1+λ)/2) ≈ 1%, inside the tolerance.
    """
    n, lam, tau, sigma, clip = 500, 0.2, 1.0, 1.0, 250.0
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, 2)) + np.array([1.0, -2.0]), jnp.float32)
    post_mean = np.asarray(x.sum(0)) / (n * (1 + lam))
    post_var = tau / (n * (1 + lam))
    lr = learning_rate_for_temperature(tau, dataset_size=n, batch_size=n, noise_multiplier=sigma, l2_clip_norm=clip)

    def loss(theta, xb):
        return jnp.mean(jnp.sum((xb - theta) ** 2, axis=-1) / 2)

    grad_fn = jaxdp.clipped_grad(loss, l2_clip_norm=clip)
    steps, burn_in, chains = 12000, 2000, 8

    def chain(key):
        tx = optax.chain(
            jaxdp.privatize(l2_clip_norm=clip, noise_multiplier=sigma, expected_batch_size=n, key=key),
            optax.add_decayed_weights(lam),
            optax.sgd(lr),
        )
        theta0 = jnp.zeros(2)

        def step(carry, _):
            theta, state = carry
            g, aux = grad_fn(theta, x)
            updates, state = tx.update(g, state, theta)
            theta = optax.apply_updates(theta, updates)
            return (theta, state), (theta, aux.num_clipped)

        _, (trace, clipped) = jax.lax.scan(step, (theta0, tx.init(theta0)), None, length=steps)
        return trace, clipped

    traces, clipped = jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(0), chains))
    assert int(clipped.sum()) == 0  # the derivation's regime: no clipping
    samples = np.asarray(traces[:, burn_in:]).reshape(-1, 2)
    std = math.sqrt(post_var)
    np.testing.assert_allclose(samples.mean(0), post_mean, atol=0.15 * std)
    np.testing.assert_allclose(samples.var(0), [post_var, post_var], rtol=0.1)


@pytest.mark.slow  # ~20 s of compiles: a diagnostic, not a privacy check
def test_hessian_power_iteration_finds_the_top_eigenvalue():
    # A quadratic with a known spectrum, as a pytree of two leaves.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    eig = np.array([7.0, 3.0, 2.5, *np.linspace(0.1, 2.0, 9)])
    a = jnp.asarray(q @ np.diag(eig) @ q.T, jnp.float32)

    def quad(p, a):
        v = jnp.concatenate([p["w"].ravel(), p["b"]])
        return 0.5 * v @ a @ v

    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
    lam, iters, converged = hessian_top_eigenvalue(quad, params, a, rtol=1e-4, iters=300)
    assert converged and lam == pytest.approx(7.0, rel=1e-4) and iters < 300
    # Too few iterations: said, not hidden.
    assert hessian_top_eigenvalue(quad, params, a, rtol=1e-6, iters=2)[2] is False
    # A small MLP's cross-entropy: against the dense Hessian's largest eigenvalue.
    x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 64))
    p = {
        "w1": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
    }

    def ce(p, x, y):
        logits = jnp.tanh(x @ p["w1"]) @ p["w2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + 0.5e-2 * sum(
            jnp.sum(v**2) for v in jax.tree_util.tree_leaves(p)
        )

    flat, unravel = jax.flatten_util.ravel_pytree(p)
    dense = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda w: ce(unravel(w), x, y))(flat), np.float64))
    top = dense[np.argmax(np.abs(dense))]
    lam, _, converged = hessian_top_eigenvalue(ce, p, x, y, rtol=1e-4, iters=1000)
    assert converged and lam == pytest.approx(top, rel=1e-3)
    # The same loss at parameters of another shape gets its own product (no stale unravel).
    p3 = {
        "w1": jnp.asarray(rng.normal(size=(4, 7)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32),
    }
    flat3, unravel3 = jax.flatten_util.ravel_pytree(p3)
    dense3 = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda w: ce(unravel3(w), x, y))(flat3), np.float64))
    top3 = dense3[np.argmax(np.abs(dense3))]
    assert hessian_top_eigenvalue(ce, p3, x, y, rtol=1e-4, iters=1000)[0] == pytest.approx(top3, rel=1e-3)


def test_loss_plateau_epoch_is_where_95_percent_of_the_decrease_is_made():
    epochs = np.arange(1, 101)
    loss = 0.3 + 2.0 * np.exp(-epochs / 10.0)
    # 95% of the decrease from the first epoch: the first epoch whose loss is at or below that level.
    target = loss[0] - 0.95 * (loss[0] - loss.min())
    assert loss_plateau_epoch(loss, window=1) == int(np.argmax(loss <= target)) + 1 == 31
    # One noisy epoch does not end the burn-in early: a dip at epoch 5 is smoothed away.
    spiky = loss.copy()
    spiky[4] = 0.3
    assert loss_plateau_epoch(spiky, window=1) == 5 and loss_plateau_epoch(spiky) > 20


def test_cells_share_sigma_and_burn_in_spend_equal_epsilon_and_sampling_is_free(tmp_path):
    configs, cbs, facts = run.cell_configs(SMOKE, 3.0, 0, str(tmp_path))
    a, b = configs["A"], configs["B"]
    assert a.privacy.noise_multiplier == b.privacy.noise_multiplier == facts["sigma"]
    assert a.privacy.noise_seed == b.privacy.noise_seed and tuple(b.optimizer.lr_boundaries) == (
        facts["burn_in_steps"],
    )
    sa = train(a, progress=False, callbacks=[cbs["A"]])
    sb = train(b, progress=False, callbacks=[cbs["B"]])
    # Equal epsilon, spent: every step, burn-in included, is accounted.
    plan = jaxdp.PrivacyPlan(
        dataset_size=facts["train_size"],
        batch_size=facts["batch_size"],
        l2_clip_norm=1.0,
        noise_multiplier=facts["sigma"],
        num_steps=facts["steps"],
    )
    assert sa["epsilon"] == sb["epsilon"] == pytest.approx(plan.epsilon(1e-5), rel=1e-12) and sa["epsilon"] <= 3.0
    assert sb["epsilon"] > plan.epsilon(1e-5, facts["steps"] - facts["burn_in_steps"])
    collector = cbs["B"]
    assert collector.count == (facts["steps"] - facts["burn_in_steps"] - 1) // facts["thin"] + 1 > 1
    # The ECE-vs-samples curve ends at the posterior predictive's ECE; λ_max was measured at both points.
    assert collector.ece_curve[collector.count - 1] == pytest.approx(
        metrics.expected_calibration_error(collector.mean_probs, collector.labels)
    )
    assert set(collector.lambda_max) == {"burn_in", "final"} and set(cbs["A"].lambda_max) == {"final"}
    # Those diagnostics read training data without noise: the summary says they are not covered by ε.
    assert {"loss", "lambda_max_burn_in", "lambda_max_final", "clipped_sq_norm_final"} <= set(
        sb["not_covered_by_epsilon"]
    )
    assert collector.holdout_mean_probs.shape == (facts["holdout_size"], 10)
    # The clipped per-example norms of the minibatch-noise diagnostic never exceed C (= 1 here).
    assert 0 < collector.clipped_sq_norm <= 1.0 + 1e-6 and cbs["A"].clipped_sq_norm is None
    # Collecting samples changes neither epsilon nor the trajectory.
    b2 = run.cell_configs(SMOKE, 3.0, 0, str(tmp_path / "again"))[0]["B"]
    without = train(b2, progress=False)
    assert without["epsilon"] == sb["epsilon"] and without["test_accuracy"] == sb["test_accuracy"]
    with open(os.path.join(b.workdir, "metrics.jsonl")) as f1, open(os.path.join(b2.workdir, "metrics.jsonl")) as f2:
        assert [json.loads(r)["loss"] for r in f1] == [json.loads(r)["loss"] for r in f2]
    # The held-out split is never trained on (train + held-out is exactly the training set, row for row),
    # the test split is whole, and the tuning dataset evaluates on the held-out split, not the test set.
    full = jaxdp.data.load("digits")
    ds, (x_hold, y_hold) = run._SPLITS[facts["dataset"]]

    def rows(x):
        return sorted(map(bytes, np.ascontiguousarray(x, np.float32).reshape(len(x), -1)))

    assert rows(np.concatenate([ds.x_train, x_hold])) == rows(full.x_train)
    assert facts["train_size"] + facts["holdout_size"] == 1437 and facts["test_size"] == 360
    name, _ = run.calibration_split("digits", 287, tune=True)
    tune_ds = run._SPLITS[name][0]
    assert tune_ds.eval_split == "validation" and rows(tune_ds.x_test) == rows(x_hold)


@pytest.mark.slow  # ~60 s: trains the table's cells (CI's slow step)
def test_experiment_smoke_writes_each_cell_at_once_and_a_rerun_skips_them(tmp_path, capsys):
    results = str(tmp_path / "cells.jsonl")
    argv = ["--config", SMOKE, "--epsilons", "3", "--seeds", "0", "--results", results, "--out", str(tmp_path)]
    rows = run.main(argv)
    assert [r["method"] for r in rows] == list(run.METHODS)
    for r in rows:
        assert r["epsilon_spent"] <= 3.0 and 0 <= r["ece"] <= 1 and r["nll"] > 0 and 0 < r["accuracy"] <= 1
        assert r["evaluated_on"] == "test" and r["lambda_max_final"] > 0 and r["ece_floor"] > 0
        # η·λ_max is given for the SGD runs (B); run A is Adam here, whose step is not η·g.
        assert r["eta_lambda_final"] > 0 if r["run"] == "B" else math.isnan(r["eta_lambda_final"])
    assert rows[1]["temperature_fitted"] > 0 and len(rows[3]["ece_curve"]) == rows[3]["samples"]
    assert (tmp_path / "reliability_sgld_eps3.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    again = run.main(argv)  # nothing is trained again
    assert "on record" in capsys.readouterr().out and len(again) == 4


def test_posterior_predictive_refuses_burn_in_past_the_end():
    collector = PosteriorPredictive(burn_in=10)

    class Plan:
        num_steps = 10

    with pytest.raises(ValueError, match="burn_in=10 leaves no samples"):
        collector.on_start(predict_logits=lambda p, x: x, dataset=type("D", (), {"x_test": 0, "y_test": 0}), plan=Plan)


@pytest.mark.parametrize("name", ["fashion_mnist", "pneumonia"])
def test_data_recipes_say_what_is_missing(name, tmp_path):
    """The recipes parse and, without their data, fail with a message naming the data."""
    spec = os.path.join(HERE, "configs", f"{name}.py")
    with pytest.raises(ValueError, match="not prepared|not found|No such file"):
        run.cell_configs(spec, 3.0, 0, str(tmp_path), [f"data_dir={tmp_path}"])


def _rows(eps, ece, acc, spent=3.0, floor=0.005, seeds=3):
    return [
        {
            "method": m,
            "epsilon_target": eps,
            "seed": s,
            "ece": e + 0.001 * s,
            "accuracy": a,
            "epsilon_spent": spent,
            "ece_floor": floor,
            "flagged": False,
        }
        for s in range(seeds)
        for m, e, a in zip(run.METHODS, ece, acc, strict=True)
    ]


def test_verdict_needs_a_matched_baseline_and_a_2x_lower_ece_at_equal_epsilon():
    # DP-SGD, +TS, step-decayed, DP-SGLD.
    ok = _rows(3, [0.10, 0.03, 0.09, 0.04], [0.90, 0.90, 0.905, 0.90])
    assert run.verdict_text(ok).endswith("→ reproduced")
    # Matched only by the step-decayed iterate, whose ECE is not 2x higher: not reproduced.
    assert run.verdict_text(_rows(3, [0.10, 0.03, 0.06, 0.04], [0.88, 0.88, 0.90, 0.90])).endswith("→ not reproduced")
    # No DP-SGD predictor within a point of DP-SGLD's accuracy: not reproduced, and said why.
    text = run.verdict_text(_rows(3, [0.10, 0.03, 0.09, 0.04], [0.85, 0.85, 0.85, 0.90]))
    assert "not reproduced (no DP-SGD predictor is matched in accuracy)" in text
    # Unequal epsilon spent, too few seeds, or a flagged DP-SGLD run is never reproduced.
    unequal = ok[:4] + _rows(3, [0.10, 0.03, 0.09, 0.04], [0.90, 0.90, 0.905, 0.90], spent=2.5)[4:]
    assert "ε spent equal in all runs: False" in run.verdict_text(unequal)
    assert "not reproduced (ε spent differs)" in run.verdict_text(unequal)
    assert "fewer than 3 seeds" in run.verdict_text(_rows(3, [0.10, 0.03, 0.09, 0.04], [0.9] * 4, seeds=2))
    flagged = [dict(r, flagged=r["method"] == "DP-SGLD") for r in ok]
    assert "a DP-SGLD run is flagged" in run.verdict_text(flagged)
    # Lower on average but not in every seed: not reproduced.
    mixed = [dict(r) for r in ok]
    mixed[3]["ece"] = 0.2  # seed 0's DP-SGLD is worse than every DP-SGD there
    assert run.verdict_text(mixed).endswith("→ not reproduced")
    # Every matched DP-SGD predictor already sits within 2x of its ECE floor: not testable.
    at_floor = _rows(3, [0.03, 0.03, 0.03, 0.028], [0.9] * 4, floor=0.025)
    assert "not testable" in run.verdict_text(at_floor)


def test_ece_floor_is_the_ece_of_a_calibrated_predictor_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = (metrics.softmax(rng.normal(scale=3.0, size=(n, 10))) for n in (360, 10_000))
    # A calibrated predictor's ECE is pure binning noise, about sqrt(1/n) in size: 360 vs 10,000 examples.
    assert 0.01 < run.ece_floor(small) < 0.06 and run.ece_floor(large) < 0.012
    assert run.ece_floor(large) < run.ece_floor(small) / 3


def test_burn_in_tail_drop_tells_a_plateau_from_a_falling_loss():
    epochs = np.arange(100)
    plateaued = 0.3 + np.exp(-epochs / 8.0)
    falling = 2.0 - 0.015 * epochs
    assert run.burn_in_tail_drop(plateaued, 100) < 0.01
    assert run.burn_in_tail_drop(falling, 100) > 0.15


def test_posterior_predictive_means_thinned_samples_and_resumes_mid_run():
    """Fake 'parameters' (the step number) with known logits: the running means equal hand-made means."""
    x_test, y_test = np.arange(6, dtype=np.float32)[:, None], np.array([0, 1, 2, 0, 1, 2])
    x_hold, y_hold = np.ones((4, 1), np.float32), np.array([0, 1, 2, 0])

    def logits(step, x):
        return jnp.concatenate([x * step / 10, -x, jnp.sin(x * step)], axis=1)

    class Data:
        pass

    data, steps, burn_in, thin = Data(), 20, 6, 3
    data.x_test, data.y_test, data.num_classes = x_test, y_test, 3

    class Plan:
        num_steps = steps

    def collector():
        c = PosteriorPredictive(burn_in=burn_in, thin=thin, holdout=(x_hold, y_hold))
        c.on_start(predict_logits=logits, dataset=data, plan=Plan)
        return c

    full = collector()
    for step in range(1, steps + 1):
        full.on_step(step, step)
    kept = [s for s in range(burn_in + 1, steps + 1) if (s - burn_in - 1) % thin == 0]
    assert kept == [7, 10, 13, 16, 19] and full.count == len(kept)
    expected = np.mean([metrics.softmax(np.asarray(logits(s, x_test))) for s in kept], axis=0)
    np.testing.assert_allclose(full.mean_probs, expected, rtol=1e-6)  # float32 logits, jitted or not
    for k in range(1, len(kept) + 1):  # the curve: ECE of the mean of the first k samples
        first_k = np.mean([metrics.softmax(np.asarray(logits(s, x_test))) for s in kept[:k]], axis=0)
        assert full.ece_curve[k - 1] == pytest.approx(metrics.expected_calibration_error(first_k, y_test), abs=1e-6)
    hold = np.mean([metrics.softmax(np.asarray(logits(s, x_hold))) for s in kept], axis=0)
    np.testing.assert_allclose(full.holdout_mean_probs, hold, rtol=1e-6)
    # Interrupted after step 11 and resumed from its state: the same means at the end.
    first = collector()
    for step in range(1, 12):
        first.on_step(step, step)
    resumed = collector()
    resumed.load_state_dict(first.state_dict())
    for step in range(12, steps + 1):
        resumed.on_step(step, step)
    np.testing.assert_allclose(resumed.mean_probs, full.mean_probs, rtol=1e-12)
    np.testing.assert_allclose(resumed.ece_curve, full.ece_curve)
