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
    learning_rate_for_temperature,
    noise_for_temperature,
    temperature,
)
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
    inflates the variance by 1/(1 − η(1+λ)/2) ≈ 0.8%, inside the tolerance.
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


def test_burn_in_is_accounted_and_sampling_is_free(tmp_path):
    # run.langevin_config fixes privacy.noise_seed (per seed), so both runs draw the same noise.
    config, collector, info = run.langevin_config(SMOKE, 3.0, 0, str(tmp_path / "with"))
    with_samples = train(config, progress=False, callbacks=[collector])
    config2, _, _ = run.langevin_config(SMOKE, 3.0, 0, str(tmp_path / "without"))
    without = train(config2, progress=False)
    assert collector.count == info["steps"] - collector.burn_in > 0
    # Every step counts, burn-in included; collecting samples changes neither ε nor the trajectory.
    assert with_samples["steps"] == without["steps"] == info["steps"]
    assert with_samples["epsilon"] == without["epsilon"]
    plan_all = jaxdp.PrivacyPlan(
        dataset_size=1437, batch_size=512, l2_clip_norm=1.0, noise_multiplier=info["sigma"], num_steps=info["steps"]
    )
    assert with_samples["epsilon"] == pytest.approx(plan_all.epsilon(1e-5), rel=1e-12)
    assert with_samples["epsilon"] > plan_all.epsilon(1e-5, info["steps"] - collector.burn_in)
    assert with_samples["test_accuracy"] == without["test_accuracy"]
    # The posterior predictive is saved (orbax) beside the run.
    assert os.path.isdir(with_samples["posterior_predictive_path"])


@pytest.mark.slow  # ~16 s: trains the table's runs once (CI's slow step)
def test_experiment_smoke_produces_table_and_diagrams(tmp_path):
    results = run.main(["--config", SMOKE, "--epsilons", "3", "--seeds", "0", "--out", str(tmp_path)])
    methods = {r["method"] for r in results}
    assert methods == {"DP-SGLD", "DP-SGD (same run, final iterate)", "DP-SGD (tuned Adam recipe)"}
    for r in results:
        assert r["epsilon_spent"] <= 3.0 and 0 <= r["ece"] <= 1 and r["nll"] > 0 and 0 < r["accuracy"] <= 1
    assert "| DP-SGLD | 3" in (tmp_path / "table.md").read_text()
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3
    assert (tmp_path / "reliability_DP-SGLD_eps3.png").read_bytes()[:4] == b"\x89PNG"


def test_posterior_predictive_refuses_burn_in_past_the_end():
    collector = PosteriorPredictive(burn_in=10)

    class Plan:
        num_steps = 10

    with pytest.raises(ValueError, match="burn_in=10 leaves no samples"):
        collector.on_start(predict_logits=lambda p, x: x, dataset=type("D", (), {"x_test": 0, "y_test": 0}), plan=Plan)


@pytest.mark.parametrize("name", ["mnist", "pneumonia"])
def test_data_recipes_load_and_say_what_is_missing(name, tmp_path):
    """The recipes whose data is not on this machine parse, and fail with a message naming the data."""
    from jaxdp.config import apply_overrides, load_config

    config = apply_overrides(
        load_config(os.path.join(HERE, "configs", f"{name}.py")), [f"workdir={tmp_path}", f"data_dir={tmp_path}"]
    )
    assert config.model.name == "cnn" and config.langevin.mode == "lr"
    with pytest.raises(ValueError, match="not prepared|not found"):
        run.langevin_config(os.path.join(HERE, "configs", f"{name}.py"), 3.0, 0, str(tmp_path))
