"""The main job end to end: config -> private training -> metrics, and the CLI's errors."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import nnx_loss
from flax import nnx

import jaxdp
from jaxdp import distributed
from jaxdp.cli import main
from jaxdp.config import ConfigError, apply_overrides, load_config
from jaxdp.models import MLP
from jaxdp.train import TrainState, make_private_step, train

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


def test_cli_smoke_writes_metrics_and_summary(tmp_path, capsys):
    cnn = os.path.join(ROOT, "configs", "digits_cnn.py")
    assert main(["train", "--config", f"{cnn}:smoke", "--no-progress", f"workdir={tmp_path}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["model"] == "cnn" and summary["steps"] == 6
    assert 0 < summary["epsilon"] < 3 and summary["examples_per_sec"] > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    diagnostics = ["grad_norm_mean", "grad_norm_q10", "grad_norm_q50", "grad_norm_q90", "clip_bias_bound"]
    for r in records:  # clipping diagnostics are logged every epoch ...
        assert 0 < r["grad_norm_q10"] <= r["grad_norm_q50"] <= r["grad_norm_q90"]
        assert 0 <= r["clip_bias_bound"] < r["grad_norm_mean"]
        assert (r["clip_bias_bound"] > 0) == (r["fraction_clipped"] > 0)
    # ... and labelled as computed from private data without noise.
    assert set(diagnostics) <= set(summary["not_covered_by_epsilon"])


def test_step_reports_the_per_example_norms_it_clipped():
    loss_fn, params = nnx_loss(MLP(12, 5, hidden=(8,), rngs=nnx.Rngs(1)))
    plan = jaxdp.PrivacyPlan(dataset_size=100, batch_size=10, l2_clip_norm=0.5, noise_multiplier=1.0, num_steps=1)
    tx, step, _ = make_private_step(plan, loss_fn, optax.sgd(0.1), noise_key=jax.random.key(0))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 12)).astype(np.float32)
    y = rng.integers(0, 5, 8).astype(np.int32)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1], np.float32)
    _, metrics = step(TrainState(params, tx.init(params), jnp.zeros((), jnp.int32)), None, x, y, mask)
    _, aux = plan.clipped_grad(loss_fn, return_norms=True)(params, x, y)
    np.testing.assert_allclose(metrics["norms"], np.where(mask > 0, aux.norms, np.nan), rtol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["no_such_key=1"], "unknown config key 'no_such_key'"),
        (["privacy.clip=1"], "'clip' is not under privacy"),
        (["privacy.l2_clip_norm=-1.0"], "privacy.l2_clip_norm=-1.0"),
        (["batch_size=5000"], "batch_size=5000 is larger than the training set (1437 examples)"),
        (["epochs=abc"], "config key 'epochs' expects int"),
        (["dataset=imagenet"], "dataset='imagenet' is not available"),
        (["privacy.accountant=gdp"], "privacy.accountant='gdp' is an approximation"),
        (["sampling=shuffle"], "sampling='shuffle' is for non-private runs"),
        (["privacy.accountant=foo"], "privacy.accountant='foo' is not registered"),
        (["privacy.target_epsilon=None"], "are both None"),
        (["privacy.target_epsilon=-1.0"], "privacy.target_epsilon=-1.0 is invalid"),
        (["privacy.noise_multiplier=0.0"], "privacy.target_epsilon=3.0 cannot be met"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, message, capsys, tmp_path):
    assert main(["train", "--config", DIGITS, "--no-progress", f"workdir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("jaxdp: error:")


def test_cli_missing_config_file_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdp.cli", "train", "--config", "configs/nope.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == "jaxdp: error: config file 'configs/nope.py' not found; pass e.g. --config configs/digits.py"
    )


def test_overrides_cast_types():
    config = apply_overrides(
        load_config(DIGITS), ["privacy.l2_clip_norm=2", "--config.privacy.per_layer=true", "model.kwargs.hidden=32"]
    )
    assert config.privacy.l2_clip_norm == 2.0 and isinstance(config.privacy.l2_clip_norm, float)
    assert config.privacy.per_layer is True and config.model.kwargs.hidden == (32,)
    with pytest.raises(ConfigError, match="privacy.per_layer"):
        apply_overrides(load_config(DIGITS), ["privacy.per_layer=2"])


def _ascend_along_prev(params, prev):  # a DP-SAT-like perturb: moves only once prev is non-zero
    return jax.tree_util.tree_map(lambda p, d: p + 0.3 * d, params, prev)


@pytest.mark.parametrize("perturb", [None, _ascend_along_prev])
def test_step_does_not_recompile_and_spilled_draws_are_exact(perturb):
    """One compiled step for every draw; a draw split over two chunks equals one big chunk (perturbed too)."""
    loss_fn, params = nnx_loss(MLP(12, 5, hidden=(8,), rngs=nnx.Rngs(0)))
    plan = jaxdp.PrivacyPlan(dataset_size=200, batch_size=20, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=5)
    mesh = distributed.make_mesh(1)
    tx, step, accumulate = make_private_step(
        plan, loss_fn, optax.sgd(0.1), noise_key=jax.random.key(0), mesh=mesh, perturb=perturb
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)).astype(np.float32)
    y = rng.integers(0, 5, 200).astype(np.int32)
    state0 = distributed.replicate(mesh, TrainState(params, tx.init(params), jnp.zeros((), jnp.int32)))
    sampler = plan.sampler(seed=0, physical_batch_size=16)
    state = state0
    for s in range(5):
        (idx, mask), *rest = sampler.chunks(sampler.draw(s))[-1:]
        state, _ = step(state, None, *distributed.shard_batch(mesh, (x[idx], y[idx], mask)))
    assert step._cache_size() == 1

    # From a state with a previous (non-zero) privatised gradient, so a perturbation really moves.
    idx = np.arange(24)
    one, _ = step(state, None, x[idx], y[idx], np.ones(24, np.float32))
    acc, _ = accumulate(state, None, x[idx[:12]], y[idx[:12]], np.ones(12, np.float32))
    two, _ = step(state, acc, x[idx[12:]], y[idx[12:]], np.ones(12, np.float32))
    for u, v in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(two.params), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    if perturb is not None:  # the earlier chunk must be taken at the perturbed point as well
        at_params, _ = plan.clipped_grad(loss_fn)(state.params, x[idx[:12]], y[idx[:12]])
        moved = [np.max(np.abs(u - v)) for u, v in zip(*map(jax.tree_util.tree_leaves, (acc, at_params)), strict=True)]
        assert max(moved) > 1e-4


def test_account_command_table_and_json(capsys):
    args = ["account", "--sampling-rate", str(256 / 60000), "--noise-multiplier", "1.1", "--steps", "14062"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| rdp | 2.5966 |" in table and "| pld | 2.38" in table and "gdp (CLT approx.)" in table
    assert "| prv | 2.39" in table  # Opacus's default accountant, upper end of its error bound (default report)
    assert main([*args, "--json", "--accountants", "rdp,pld"]) == 0
    result = json.loads(capsys.readouterr().out)
    by_name = {r["accountant"]: r for r in result["accountants"]}
    assert by_name["rdp"]["epsilon"] == pytest.approx(2.5966, rel=2e-3)
    assert by_name["pld"]["epsilon"] == pytest.approx(2.3817, rel=1e-2)
    assert by_name["rdp"]["tpr_at_fpr_0.01"] >= by_name["pld"]["tpr_at_fpr_0.01"]


def test_account_epochs_count_the_steps_training_runs(capsys):
    """`--epochs 40` for the digits recipe is the 120 steps `jaxdp train` runs, hence the same epsilon."""
    sigma = "5.971604641665706"
    args = ["account", "--batch-size", "512", "--dataset-size", "1437", "--noise-multiplier", sigma, "--epochs", "40"]
    assert main([*args, "--json", "--accountants", "rdp"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 120
    assert result["accountants"][0]["epsilon"] == pytest.approx(3.0, abs=1e-3)


def test_secret_noise_seed_by_default_and_a_warning_when_fixed(tmp_path, capsys):
    from jaxdp.train import privacy_seed

    assert privacy_seed(None) != privacy_seed(None)  # fresh OS entropy every run
    capsys.readouterr()
    assert privacy_seed(7) == 7
    assert "privacy.noise_seed=7 is set" in capsys.readouterr().err
    a = train(apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}/a"]), progress=False)
    b = train(apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}/b"]), progress=False)
    # Same config and model seed, different (secret) noise: the runs differ.
    assert (a["train_accuracy"], a["test_accuracy"]) != (b["train_accuracy"], b["test_accuracy"])


def test_spilled_draws_in_the_loop_match_one_big_chunk(tmp_path):
    """physical_batch_size far below the draw: every step spills into several chunks, same result."""
    common = [f"workdir={tmp_path}", "privacy.noise_seed=3"]
    big = train(apply_overrides(load_config(f"{DIGITS}:smoke"), common), progress=False)
    small = train(apply_overrides(load_config(f"{DIGITS}:smoke"), [*common, "physical_batch_size=128"]), progress=False)
    assert small["epsilon"] == big["epsilon"] and small["steps"] == big["steps"]
    assert small["test_accuracy"] == pytest.approx(big["test_accuracy"], abs=1e-9)
    assert small["train_accuracy"] == pytest.approx(big["train_accuracy"], abs=1e-9)


def test_account_command_calibrates(capsys):
    args = ["account", "--batch-size", "100", "--dataset-size", "10000", "--target-epsilon", "3", "--steps", "10000"]
    assert main([*args, "--json", "--accountants", "rdp"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["noise_multiplier"] == pytest.approx(1.6619, rel=5e-3)
    assert result["accountants"][0]["epsilon"] <= 3.0


def test_account_calibration_accountant_is_one_rule_and_printed(capsys, monkeypatch):
    """--target-tpr used to calibrate with pld even when --calibrate-with said rdp, and the header did not say
    which. The rule: an explicit --calibrate-with is used for either target; the default is rdp for an epsilon
    target (as jaxdp train) and pld for a TPR target. The header and the JSON name the one used."""
    from jaxdp.accounting import report

    used = []  # the accountant each calibration was asked to use (the calibrations are tested in test_accounting)
    monkeypatch.setattr(report, "calibrate_noise_multiplier", lambda *a, accountant: used.append(accountant) or 1.5)
    monkeypatch.setattr(
        report, "calibrate_noise_multiplier_for_attack_risk", lambda *a, accountant: used.append(accountant) or 1.5
    )
    base = ["account", "--sampling-rate", "0.01", "--steps", "300", "--accountants", "rdp"]
    cases = [
        (["--target-epsilon", "3"], "rdp", "epsilon <= 3.0 with rdp"),
        (["--target-tpr", "0.05"], "pld", "TPR <= 0.05 at FPR 0.01 with pld"),
        (["--target-tpr", "0.05", "--calibrate-with", "rdp"], "rdp", "TPR <= 0.05 at FPR 0.01 with rdp"),
        (["--target-epsilon", "3", "--calibrate-with", "pld"], "pld", "epsilon <= 3.0 with pld"),
    ]
    for extra, name, what in cases:
        assert main([*base, *extra]) == 0
        assert f"(calibrated to {what} in " in capsys.readouterr().out
        assert main([*base, *extra, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["calibrated_with"] == name and result["calibrated_to"] == what
        assert used[-2:] == [name, name]
    with pytest.raises(SystemExit):
        main(["account", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "for either target (default: rdp for --target-epsilon, as jaxdp train; pld for --target-tpr)" in help_text


def test_account_delta_follows_the_training_rule(capsys):
    """`--delta 0.5` used to print epsilon = 0. Now refused as training refuses it: above 1/N where
    --dataset-size gives N, above q otherwise (q*N >= 1, so that is above 1/N for every N)."""
    base = ["account", "--noise-multiplier", "1.1", "--steps", "100", "--accountants", "rdp"]
    q = ["--sampling-rate", "0.0042666667"]
    n = ["--batch-size", "256", "--dataset-size", "60000"]
    refused = [
        ([*q, "--delta", "0.5"], "--delta=0.5 is larger than the sampling rate q = 0.00426667"),
        ([*n, "--delta", "1e-4"], "--delta=0.0001 is larger than 1/N = 1/60000"),
        ([*q, "--dataset-size", "60000", "--delta", "1e-4"], "--delta=0.0001 is larger than 1/N = 1/60000"),
        ([*q, "--delta", "0"], "--delta=0.0 must lie in (0, 1)"),
    ]
    for extra, message in refused:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main([*base, *n, "--delta", "1e-5"]) == 0
    assert main([*base, *q, "--delta", "1e-3"]) == 0  # below q: allowed without N (training may still refuse it)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sampling-rate", "2", "--noise-multiplier", "1", "--steps", "3"], "--sampling-rate=2.0 must lie in (0, 1]"),
        (["--sampling-rate", "0.1", "--noise-multiplier", "-1", "--steps", "3"], "--noise-multiplier=-1.0"),
        (["--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "3", "--delta", "2"], "delta=2.0"),
        (["--batch-size", "10", "--noise-multiplier", "1", "--steps", "3"], "--batch-size needs --dataset-size"),
        (
            ["--sampling-rate", "0.1", "--target-epsilon", "3", "--steps", "30", "--calibrate-with", "gdp"],
            "approximation",
        ),
    ],
)
def test_account_command_bad_input(args, message, capsys):
    assert main(["account", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_non_private_shuffled_run(tmp_path):
    overrides = [
        f"workdir={tmp_path}",
        "sampling=shuffle",
        "privacy.target_epsilon=None",
        "privacy.noise_multiplier=0.0",
    ]
    summary = train(apply_overrides(load_config(f"{DIGITS}:smoke"), overrides), progress=False)
    assert summary["steps"] == 2 * 3 and summary["epsilon"] == math.inf and summary["attack_risk"] == {}


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboardX")  # installed by the dev extra that `make test` uses
    train(apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}"]), progress=False)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
