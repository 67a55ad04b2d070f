"""jaxdp.train.loop: the main job end to end, config -> private training -> metrics and summary."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tree_equal

import jaxdp
from jaxdp.config import ConfigError, apply_overrides, load_config
from jaxdp.train import setup_run, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")


def test_default_run_lands_in_accuracy_band_and_spends_the_budget(tmp_path):
    """The exact `make train` config (seed 0).

    Upper edges catch noise silently switched off: without noise the same recipe
    fits the training set to ~0.995 (next test); with it, ~0.95.
    """
    config = apply_overrides(load_config(DIGITS), [f"workdir={tmp_path}", "privacy.noise_seed=0"])
    summary = train(config, progress=False)
    assert 0.90 <= summary["test_accuracy"] <= 0.975, summary
    assert 0.90 <= summary["train_accuracy"] <= 0.98, summary
    # sigma was calibrated: the whole budget is spent, never more.
    assert 2.99 <= summary["epsilon"] <= 3.0, summary
    assert summary["noise_multiplier"] == pytest.approx(5.9716, rel=1e-3)
    assert summary["steps"] == summary["planned_steps"] == 120 and summary["nonfinite_dropped"] == 0
    risk = summary["attack_risk"]
    assert 0.01 < risk["tpr_at_fpr_0.01"] < math.exp(3.0) * 0.01 + 1e-5 and 0 < risk["advantage"] < 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 41))
    eps = [r["epsilon"] for r in lines]
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))  # spent budget grows every epoch
    assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]


def test_noise_off_trains_better_than_private(tmp_path):
    """Sanity of the band above: the same recipe without noise fits the training set far better."""
    config = apply_overrides(
        load_config(DIGITS),
        [f"workdir={tmp_path}", "privacy.target_epsilon=None", "privacy.noise_multiplier=0.0", "privacy.noise_seed=0"],
    )
    summary = train(config, progress=False)
    assert summary["train_accuracy"] >= 0.985 and summary["epsilon"] == float("inf"), summary


def test_budget_stops_the_run_cleanly(tmp_path, capsys):
    """A given sigma too small for the target: the run stops before exceeding it, and says so."""
    config = apply_overrides(load_config(DIGITS), [f"workdir={tmp_path}", "privacy.noise_multiplier=2.5", "epochs=6"])
    summary = train(config, progress=False)
    out = capsys.readouterr().out
    assert summary["steps"] < summary["planned_steps"] == 18
    assert summary["epsilon"] <= 3.0
    # One more step would have gone over: the cap is tight, not just safe.
    plan_next = jaxdp.PrivacyPlan(
        dataset_size=1437, batch_size=512, l2_clip_norm=1.0, noise_multiplier=2.5, num_steps=summary["steps"] + 1
    )
    assert plan_next.epsilon(1e-5) > 3.0
    assert f"stopped after {summary['steps']} of 18 planned steps" in out
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == summary["steps"]


def test_delta_above_one_over_n_is_refused(tmp_path):
    """delta > 1/N allows leaking an example outright: an error before the first step, not a warning."""
    config = apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}", "privacy.delta=0.001"])
    with pytest.raises(ConfigError, match=r"privacy.delta=0.001 is larger than 1/N = 1/1437.*e\.g\. 1e-5"):
        train(config, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_secret_noise_seed_by_default_and_a_warning_when_fixed(tmp_path, capsys):
    from jaxdp.train import privacy_seed

    assert privacy_seed(None) != privacy_seed(None)  # fresh OS entropy every run
    capsys.readouterr()
    assert privacy_seed(7) == 7
    assert "privacy.noise_seed=7 is set" in capsys.readouterr().err
    # Same config and model seed: two runs get different secrets, so different noise keys and Poisson draws.
    config = apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}"])
    a, b = setup_run(config), setup_run(config)
    assert a.secret_seed != b.secret_seed
    key_a, key_b = (
        [
            jax.random.key_data(x)
            for x in jax.tree_util.tree_leaves(r.state.opt_state)
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        ]
        for r in (a, b)
    )
    assert len(key_a) == 1 and not np.array_equal(key_a[0], key_b[0])
    assert not np.array_equal(a.sampler.draw(0), b.sampler.draw(0))
    assert tree_equal(a.state.params, b.state.params)  # the model init is public (config.seed): the same


@pytest.mark.slow  # ~20 s; tests/test_step.py checks spilled draws exactly on one step (default suite)
def test_spilled_draws_in_the_loop_match_one_big_chunk(tmp_path):
    """physical_batch_size far below the draw: every step spills into several chunks, same result."""
    common = ["privacy.noise_seed=3"]  # two runs, two workdirs (a workdir holding a run is not written over)
    big = train(apply_overrides(load_config(f"{DIGITS}:smoke"), [*common, f"workdir={tmp_path}/big"]), progress=False)
    small_overrides = [*common, f"workdir={tmp_path}/small", "physical_batch_size=128"]
    small = train(apply_overrides(load_config(f"{DIGITS}:smoke"), small_overrides), progress=False)
    assert small["epsilon"] == big["epsilon"] and small["steps"] == big["steps"]
    assert small["test_accuracy"] == pytest.approx(big["test_accuracy"], abs=1e-9)
    assert small["train_accuracy"] == pytest.approx(big["train_accuracy"], abs=1e-9)


def test_non_private_shuffled_run(tmp_path):
    overrides = [
        f"workdir={tmp_path}",
        "sampling=shuffle",
        "privacy.target_epsilon=None",
        "privacy.noise_multiplier=0.0",
    ]
    summary = train(apply_overrides(load_config(f"{DIGITS}:smoke"), overrides), progress=False)
    assert summary["steps"] == 2 * 3 and summary["epsilon"] == math.inf and summary["attack_risk"] == {}


@pytest.mark.slow  # ~8 s of training for a logging side channel (CI's slow step)
def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboardX")  # installed by the dev extra that `make test` uses
    train(apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}"]), progress=False)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


@pytest.mark.slow  # ~15 s: two trainings (CI's slow step); the setup-level check above is in the default suite
def test_two_default_runs_of_one_config_train_differently(tmp_path):
    a = train(apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}/a"]), progress=False)
    b = train(apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}/b"]), progress=False)
    # Same config and model seed, different (secret) noise: the runs differ.
    assert (a["train_accuracy"], a["test_accuracy"]) != (b["train_accuracy"], b["test_accuracy"])


def test_validation_size_trains_on_the_rest_and_evaluates_on_the_held_out_part(tmp_path, capsys):
    config = apply_overrides(
        load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}", "privacy.noise_seed=0", "validation_size=237"]
    )
    run = setup_run(config)
    assert len(run.dataset.y_train) == 1437 - 237 and len(run.dataset.y_test) == 237
    assert run.plan.dataset_size == 1437 - 237  # the privacy accounting is over what is trained on
    summary = train(config, progress=False)
    assert summary["evaluated_on"] == "validation"
    assert "validation=237 held out of train" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [
        ("validation_size=1437", "validation_size=1437 is invalid: need 0 < size < 1437"),
        ("validation_size=-3", "validation_size=-3 is invalid: need an int >= 0"),
        ("data_memory_mb=-1.0", "data_memory_mb=-1.0 is invalid"),
        ("data_prefetch=-1", "data_prefetch=-1 is invalid"),
        ("model.dtype=float8", "model.dtype='float8' is invalid: need one of float32, bfloat16, float16"),
    ],
)
def test_bad_data_keys_are_config_errors_naming_the_key(tmp_path, override, message):
    config = apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}", override])
    with pytest.raises(ConfigError, match=message):
        setup_run(config)


def test_learning_rate_schedule_scales_the_step_after_its_boundary_and_names_bad_values():
    from jaxdp.train import make_optimizer

    tx = make_optimizer("sgd", 2.0, lr_boundaries=(3,), lr_scales=(0.25,))
    params, state = jnp.zeros(()), None
    state = tx.init(params)
    steps = []
    for _ in range(5):
        updates, state = tx.update(jnp.ones(()), state, params)
        steps.append(float(-updates))
    # Three updates at 2.0, then a quarter of it: "after step 3" as documented.
    assert steps == [2.0, 2.0, 2.0, 0.5, 0.5]
    for kwargs, match in [
        (dict(lr_boundaries=(3,), lr_scales=()), "same length"),
        (dict(lr_boundaries=(5, 3), lr_scales=(0.5, 0.5)), "increasing step ints"),
        (dict(lr_boundaries=(3,), lr_scales=(0.0,)), "numbers > 0"),
    ]:
        with pytest.raises(ConfigError, match=match):
            make_optimizer("sgd", 1.0, **kwargs)


def test_nadam_is_optax_nadam_and_unknown_names_list_the_choices():
    from jaxdp.train import make_optimizer

    ours, ref = make_optimizer("nadam", 0.1), optax.nadam(0.1)
    params = jnp.array([1.0, -2.0])
    s1, s2 = ours.init(params), ref.init(params)
    for g in (jnp.array([0.5, 1.0]), jnp.array([-0.25, 2.0]), jnp.array([1.0, 0.0])):
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        np.testing.assert_array_equal(u1, u2)
    with pytest.raises(ConfigError, match="'sgd', 'adam' or 'nadam'"):
        make_optimizer("adamw", 0.1)


@pytest.mark.parametrize("impl", ["ghost", pytest.param("vmap", marks=pytest.mark.slow)])
def test_mixed_precision_trains_in_bfloat16_with_float32_parameters(tmp_path, impl):
    """model.dtype=bfloat16: the model's products run in bfloat16, the parameters and the update stay float32, and
    the smoke recipe still learns, spending the budget as in float32."""
    config = apply_overrides(
        load_config(f"{DIGITS}:smoke"),
        [f"workdir={tmp_path}", "model.dtype=bfloat16", f"clipping_impl={impl}", "privacy.noise_seed=0"],
    )
    run = setup_run(config)
    x, y = run.dataset.x_train[:4], run.dataset.y_train[:4]
    params = run.state.params
    from jaxdp.train import classification_loss

    jaxpr = jax.make_jaxpr(classification_loss(run.graphdef, run.rest, "bfloat16"))(params, x, y)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in dots)
    summary = train(config, progress=False)
    assert summary["model_dtype"] == "bfloat16" and summary["clipping_impl"] == impl
    assert summary["test_accuracy"] > 0.5 and summary["nonfinite_dropped"] == 0, summary
    assert summary["epsilon"] == pytest.approx(run.plan.epsilon(config.privacy.delta))
    assert summary["epsilon"] <= 3.0
    from jaxdp.step import run_private_step

    mask = np.ones((4,), np.float32)
    state, _ = run_private_step(run.step, run.state, [(x, y, mask)])
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(state.params))
    clipped, _ = run.step.clipped_sum(params, [(x, y, mask)])
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(clipped))
