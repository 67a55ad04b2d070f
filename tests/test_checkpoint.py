"""Nothing lost on a crash: SIGKILL mid-training, resume, and end bit-identical with the same ε."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxdp.config import apply_overrides, load_config
from jaxdp.train import train

# Its module-scoped runs are shared by its tests: one xdist worker for the whole module (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("checkpoint")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")
COMMON = ["privacy.noise_seed=4", "epochs=30", "checkpoint.every_epochs=1", "checkpoint.keep=2"]


def final_state(workdir):
    ckpts = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    return ckpts, ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(ckpts[-1]), "state"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    summary = train(apply_overrides(load_config(DIGITS), [*COMMON, f"workdir={workdir}"]), progress=False)
    return workdir, summary


@pytest.mark.slow  # ~40 s; test_guards.py kills at named points and resumes in the default suite
def test_sigkill_mid_training_then_resume_is_bit_identical(reference, tmp_path):
    ref_dir, ref_summary = reference
    workdir = str(tmp_path / "killed")
    cmd = [
        sys.executable,
        "-m",
        "jaxdp.cli",
        "train",
        "--config",
        DIGITS,
        "--no-progress",
        *COMMON,
        f"workdir={workdir}",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.isdir(ckdir) and any(d.isdigit() and int(d) >= 3 for d in os.listdir(ckdir)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(workdir, "summary.json")), "the run finished before it could be killed"
    killed_at = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    assert 3 <= killed_at < 30

    summary = train(apply_overrides(load_config(DIGITS), [*COMMON, f"workdir={workdir}"]), progress=False, resume=True)
    assert summary["epsilon"] == ref_summary["epsilon"] and summary["steps"] == ref_summary["steps"]
    ckpts, state = final_state(workdir)
    _, ref_state = final_state(ref_dir)
    assert ckpts[-1] == 30 and len(ckpts) <= 2  # only the last k are kept
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise on CPU
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 31))
    with open(os.path.join(ref_dir, "metrics.jsonl")) as f:
        ref_eps = [json.loads(line)["epsilon"] for line in f]
    assert [json.loads(line)["epsilon"] for line in lines] == ref_eps


def test_unfinished_checkpoint_write_is_ignored(reference, tmp_path):
    """A crash while writing leaves orbax's temporary directory; resume must not pick it up."""
    import shutil

    ref_dir, ref_summary = reference
    workdir = str(tmp_path / "partial")
    shutil.copytree(ref_dir, workdir)
    ckdir = os.path.join(workdir, "checkpoints")
    latest = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    # Pretend an epoch-5 checkpoint was being written when the process died.
    os.makedirs(os.path.join(ckdir, "5.orbax-checkpoint-tmp-1234567890"))
    shutil.rmtree(os.path.join(ckdir, str(latest)))  # and the last good one is the one before
    remaining = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    summary = train(apply_overrides(load_config(DIGITS), [*COMMON, f"workdir={workdir}"]), progress=False, resume=True)
    assert remaining < latest and summary["epsilon"] == ref_summary["epsilon"]
    _, state = final_state(workdir)
    _, ref_state = final_state(ref_dir)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    summary = train(
        apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}", "privacy.noise_seed=1"]),
        progress=False,
        resume=True,
    )
    assert "no checkpoint" in capsys.readouterr().out and summary["steps"] == 6


@pytest.mark.slow  # ~11 s: an 8-device resume (CI's slow step)
def test_checkpoint_from_one_device_resumes_on_eight(reference, tmp_path):
    """Save on 1 device, restore on 8 forced CPU devices: same run to float tolerance."""
    import shutil

    ref_dir, ref_summary = reference
    workdir = str(tmp_path / "eight")
    shutil.copytree(ref_dir, workdir)
    ckdir = os.path.join(workdir, "checkpoints")
    # Keep only an early checkpoint: the last two were kept, so drop the final one.
    shutil.rmtree(os.path.join(ckdir, "30"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxdp.cli", "train", "--config", DIGITS, "--no-progress", "--resume", *COMMON]
    proc = subprocess.run([*cmd, f"workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["devices"] == 8 and "resumed from epoch 29" in proc.stdout
    assert summary["epsilon"] == ref_summary["epsilon"]
    _, state = final_state(workdir)
    _, ref_state = final_state(ref_dir)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_callback_state_ema_is_checkpointed_and_continues(tmp_path):
    import shutil

    common = ["privacy.noise_seed=2", "epochs=8", "checkpoint.every_epochs=1", "checkpoint.keep=8", "ema_decay=0.9"]
    ref_dir = str(tmp_path / "ref")
    ref = train(apply_overrides(load_config(DIGITS), [*common, f"workdir={ref_dir}"]), progress=False)
    workdir = str(tmp_path / "resumed")
    shutil.copytree(ref_dir, workdir)
    for epoch in (6, 7, 8):  # as if killed after epoch 5
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(epoch)))
    resumed = train(apply_overrides(load_config(DIGITS), [*common, f"workdir={workdir}"]), progress=False, resume=True)
    assert resumed["ema_test_accuracy"] == ref["ema_test_accuracy"]
    _, state = final_state(workdir)
    _, ref_state = final_state(ref_dir)
    assert "callbacks" in state and state["callbacks"]  # the EMA is in the checkpoint
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ctrl_c_during_a_checkpoint_write_waits_for_the_commit(tmp_path):
    """A SIGINT inside a save used to cut orbax's commit off (pages of absl tracebacks from its threads, no
    checkpoint); now the save completes and the KeyboardInterrupt comes right after it."""
    from jaxdp.train.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    save = ckpt.manager.save

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the write starts
        time.sleep(0.1)  # Python's handler would raise here, before anything is written
        return save(*args, **kwargs)

    ckpt.manager.save = interrupted_save
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in `jaxdp train`
    try:
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(1, {"w": np.ones(3, np.float32)}, {"epoch": 1})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ckpt.latest() == 1 and ckpt.meta(1) == {"epoch": 1}
    restored, _ = ckpt.restore(1, {"w": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(restored["w"], np.ones(3, np.float32))
    assert signal.getsignal(signal.SIGINT) is previous
    ckpt.close()
