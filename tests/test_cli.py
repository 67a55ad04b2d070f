"""jaxdp.cli: argument parsing and printing; bad input is one line and exit code 2."""

import json
import os
import re
import subprocess
import sys

import pytest

from jaxdp.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")


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
        (["sampling=shuffle"], "sampling='shuffle' with privacy.noise_multiplier=None and privacy.target_epsilon=3.0"),
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
    from jaxdp.cli import account as report

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


def test_audit_prints_both_epsilons(capsys):
    args = ["audit", "--config", DIGITS, "--canaries", "300", "epochs=3", "privacy.noise_seed=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "accountant epsilon (rdp, upper bound): 3.000" in out
    assert "empirical epsilon lower bound (95% confidence):" in out
    assert "f-DP test against the claimed mechanism's PLD curve: p-value" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epsilon_accountant"] == pytest.approx(3.0, abs=1e-3)
    assert 0 <= summary["epsilon_lower_bound"] < summary["epsilon_accountant"]
    assert summary["canaries"] == 300 and summary["passed"] and summary["steps"] == 9
    assert summary["epsilon_passed"] and summary["fdp_passed"] and summary["tests"] == ["epsilon", "fdp"]


def test_audit_sabotaged_run_exits_1(capsys):
    args = ["audit", "--config", DIGITS, "--canaries", "600", "epochs=3", "privacy.noise_seed=0"]
    assert main([*args, "--sabotage", "noise_off"]) == 1
    out = capsys.readouterr().out
    assert "FAILED (epsilon and fdp)" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epsilon_lower_bound"] > 3.5 and summary["fdp_p_value"] <= 0.05


@pytest.mark.parametrize(
    "args, message",
    [
        (["--canaries", "1"], "--canaries=1 must be an int >= 2"),
        (["--confidence", "1.5"], "--confidence=1.5 must lie in (0, 1)"),
        (["augment.multiplicity=2"], "augment.multiplicity=2 is not supported"),
    ],
)
def test_audit_bad_input_is_one_line_exit_2(args, message, capsys):
    assert main(["audit", "--config", DIGITS, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "resnet"], r"--models 'resnet' is not a benchmarked model; choose from mnist_cnn"),
        (["--epsilons", "0"], r"--epsilons=0.0 is invalid"),
        (["--epsilons", "inf"], r"--epsilons=inf is invalid"),
        (["--batch-sizes", "0"], r"--batch-sizes 0 is invalid"),
        (["--delta", "2"], r"--delta=2.0 must lie in \(0, 1\)"),
        (["--accountant", "nope"], r"--accountant"),
        (["--clipping-impl", "fast"], r"--clipping-impl 'fast' is not known; choose one of vmap, ghost, auto"),
        (["--clipping-impl", "vmap", "vmap"], r"--clipping-impl vmap vmap names one implementation twice"),
        (["--devices", "0"], r"--devices 0 is invalid"),
        (["--models", "mlp", "--batch-sizes", "30", "--devices", "1", "4"], r"global batch of 30 .* divisible by 4"),
        (["--models", "mlp", "--batch-sizes", "5000", "--devices"], r"--batch-sizes 5000 is larger than mlp's"),
        (["--models", "mlp", "--delta", "0.01", "--devices"], r"mlp: --delta=0.01 is larger than 1/N = 1/"),
        (["--repeats", "0"], r"--repeats 0 is invalid"),
        (["--epochs", "-1"], r"--epochs -1 is invalid"),
        (["--dtypes", "fp8"], r"--dtypes 'fp8' is not known; choose from float32, bfloat16, float16"),
    ],
)
def test_bench_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path), "--in-process", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxdp: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_missing_tfds_data_is_a_one_line_cli_error(tmp_path, capsys):
    assert main(["train", "--config", os.path.join(ROOT, "configs", "mnist_cnn.py"), f"data_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tfds build mnist --file_format=array_record" in err


def test_bench_explain_prints_the_ghost_form_per_parameter(capsys):
    assert main(["bench", "--explain", "--models", "mlp", "--batch-sizes", "16"]) == 0
    out = capsys.readouterr().out
    assert "### mlp, batch 16: ghost path" in out
    assert re.search(
        r"\| `params\['hidden'\]\[0\]\['kernel'\]\.value` \| dot_general \| Gram <XXᵀ, GGᵀ> \| 1 \| 64 \| 32 \|", out
    )
    assert main(["bench", "--explain", "--models", "nope"]) == 2
    assert "nope: not a benchmarked model" in capsys.readouterr().err
