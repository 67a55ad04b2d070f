"""jaxdp.train.guards: faults lose nothing. SIGKILL at named points, divergence, NaN data and a full disk.

The kills run ``tests/fault_runner.py`` in a subprocess; it SIGKILLs itself during a
noisy step, while a checkpoint is being written, or during evaluation. Each killed run
is resumed and must end with the parameters and ε of an uninterrupted run, and no
checkpoint may ever count fewer accountant steps than its parameters have taken.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxdp import data as data_lib
from jaxdp.cli import main
from jaxdp.config import apply_overrides, load_config
from jaxdp.train import TrainingError, train
from jaxdp.train.checkpoint import Checkpointer

# Its module-scoped runs are shared by its tests: one xdist worker for the whole module (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("guards")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")
RUNNER = os.path.join(ROOT, "tests", "fault_runner.py")
# 8 epochs of 3 steps, a checkpoint after every epoch, the last 3 kept.
COMMON = [
    "privacy.noise_seed=4",
    "privacy.target_epsilon=None",
    "privacy.noise_multiplier=3.0",  # given, not calibrated: saves a second per run
    "epochs=8",
    "checkpoint.every_epochs=1",
    "checkpoint.keep=3",
]


def config(workdir, *extra):
    return apply_overrides(load_config(DIGITS), [*COMMON, f"workdir={workdir}", *extra])


def checkpoints(workdir):
    ckdir = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) if os.path.isdir(ckdir) else []


def saved_state(workdir, epoch):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(epoch), "state"))


def assert_never_undercounts(workdir):
    """Every committed checkpoint: accountant steps == the parameters' step == epoch * 3."""
    manager = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        for epoch in checkpoints(workdir):
            meta = manager.meta(epoch)
            params_step = int(saved_state(workdir, epoch)["train"]["step"])
            assert meta["accountant"]["steps"] == params_step == 3 * epoch, (epoch, meta["accountant"], params_step)
    finally:
        manager.close()


def assert_same_run(workdir, ref_dir, summary, ref_summary):
    assert summary["epsilon"] == ref_summary["epsilon"] and summary["steps"] == ref_summary["steps"] == 24
    leaves = jax.tree_util.tree_leaves(saved_state(workdir, 8))
    ref_leaves = jax.tree_util.tree_leaves(saved_state(ref_dir, 8))
    for a, b in zip(leaves, ref_leaves, strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise on CPU
    eps, ref_eps = metric(workdir, "epsilon"), metric(ref_dir, "epsilon")
    assert eps == ref_eps and len(eps) == 8


def metric(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    summary = train(config(workdir), progress=False)
    return workdir, summary


# point:N for the runner, and the checkpoints that must survive the kill.
KILLS = {
    # the 14th step (epoch 5) is dispatched and running; the accountant has not counted it
    "step": ("step:14", [2, 3, 4]),
    # epoch 6's checkpoint is fully written to orbax's temp dir but not committed
    "checkpoint": ("checkpoint:6", [3, 4, 5]),
    # the 9th evaluation = epoch 5's train accuracy: its steps ran and were counted, nothing saved
    "eval": ("eval:9", [2, 3, 4]),
}


@pytest.fixture(scope="module")
def killed(tmp_path_factory, request):
    """Start the three runs that kill themselves at once, run the reference meanwhile, wait for all."""
    base = tmp_path_factory.mktemp("killed")
    procs = {}
    for point, (spec, _) in KILLS.items():
        workdir = str(base / point)
        cmd = [sys.executable, RUNNER, spec, "--config", DIGITS, "--no-progress", *COMMON, f"workdir={workdir}"]
        procs[point] = (workdir, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    request.getfixturevalue("reference")  # the uninterrupted run, while the others start up
    out = {}
    for point, (workdir, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        out[point] = (workdir, proc.returncode, err.decode()[-2000:])
    return out


@pytest.mark.parametrize("point", sorted(KILLS))
def test_sigkill_at_a_named_point_then_resume_ends_identical(point, killed, reference):
    ref_dir, ref_summary = reference
    workdir, returncode, stderr = killed[point]
    assert returncode == -9, (returncode, stderr)  # died by SIGKILL, not by an error
    with open(os.path.join(workdir, "killed_at.json")) as f:
        where = json.load(f)
    assert where["point"] == point
    if point == "step":
        assert where["params_step_before"] == 13  # the kill landed inside step 14
    if point == "checkpoint":
        assert os.path.isdir(os.path.join(where["tmp"], "state"))  # written, never committed
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    assert checkpoints(workdir) == KILLS[point][1]
    assert_never_undercounts(workdir)

    summary = train(config(workdir), progress=False, resume=True)
    assert_same_run(workdir, ref_dir, summary, ref_summary)
    assert_never_undercounts(workdir)


def test_resume_refuses_a_checkpoint_whose_accountant_is_behind(reference, tmp_path):
    """A checkpoint that counts fewer steps than its parameters took would under-state ε: refused."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "behind")
    shutil.copytree(ref_dir, workdir)
    meta_file = os.path.join(workdir, "checkpoints", "8", "meta", "metadata")
    with open(meta_file) as f:
        meta = json.load(f)
    meta["accountant"]["steps"] -= 1
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with pytest.raises(TrainingError, match=r"parameters have taken 24 steps, its accountant counted 23"):
        train(config(workdir), progress=False, resume=True)


def nan_params_at_step(monkeypatch, bad_step):
    """Make the loop's step return NaN parameters from noisy step ``bad_step`` on."""
    import jaxdp.train.setup as setup_mod

    make_private_step = setup_mod.make_private_step

    def patched(*args, **kwargs):
        private_step = make_private_step(*args, **kwargs)
        step = private_step.step_fn

        def step_nan(state, *a):
            state, metrics = step(state, *a)
            if int(state.step) >= bad_step:
                params = jax.tree_util.tree_map(lambda p: p * jnp.nan, state.params)
                state = state._replace(params=params)
            return state, metrics

        private_step.step_fn = step_nan
        return private_step

    monkeypatch.setattr(setup_mod, "make_private_step", patched)


def test_divergence_stops_with_epoch_and_fix_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    workdir = str(tmp_path / "diverged")
    nan_params_at_step(monkeypatch, 11)  # epoch 4 = steps 10-12
    with pytest.raises(TrainingError) as info:
        train(config(workdir), progress=False)
    message = str(info.value)
    assert "training diverged in epoch 4 (steps 10-12)" in message and "became NaN/inf" in message
    assert "optimizer.learning_rate (now 0.02)" in message and "privacy.l2_clip_norm (now 1.0)" in message
    assert "last good checkpoint is epoch 3" in message
    assert checkpoints(workdir) == [1, 2, 3]  # nothing of epoch 4 was written
    assert metric(workdir, "epoch") == [1, 2, 3]
    state = saved_state(workdir, 3)  # the last good checkpoint restores, with finite parameters at step 9
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state["train"]["params"]))
    assert_never_undercounts(workdir)
    # (that resuming from such a checkpoint ends identical is shown by the kill and full-disk tests)


def test_loss_overflow_is_a_one_line_error_naming_the_learning_rate(tmp_path, capsys):
    args = ["epochs=1", "optimizer.name=sgd", "optimizer.learning_rate=1e38", "privacy.noise_seed=0"]
    assert main(["train", "--config", DIGITS, "--no-progress", f"workdir={tmp_path}", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("jaxdp: error: training diverged in epoch 1 (steps 1-3): the loss is inf"), err
    assert "lower optimizer.learning_rate (now 1e+38)" in err and "no checkpoint yet" in err
    assert checkpoints(str(tmp_path)) == []


def test_nonfinite_gradients_are_dropped_with_a_warning_and_the_run_goes_on(tmp_path, capsys):
    # NaN/inf features are refused at load (jaxdp.data.validate); finite features that overflow the model
    # still give non-finite gradients at run time, which the step's guard drops.
    digits = data_lib.load("digits")
    x = np.array(digits.x_train, np.float32)
    x[:40] = 1e38  # 40 of 1437 training examples overflow the model (finite, so the data checks pass)
    path = str(tmp_path / "nan_digits.npz")
    np.savez(path, x_train=x, y_train=digits.y_train, x_test=digits.x_test, y_test=digits.y_test)
    overrides = [f"workdir={tmp_path}/run", f"dataset=npz:{path}", "privacy.noise_seed=0"]
    summary = train(apply_overrides(load_config(f"{DIGITS}:smoke"), overrides), progress=False)
    err = capsys.readouterr().err
    assert "examples had a NaN/inf gradient and were dropped" in err and "check the data for NaN/inf" in err
    assert 0 < summary["nonfinite_dropped"] < 0.1 * 6 * 512  # about 40 * q per step
    assert summary["test_accuracy"] > 0.3  # the other examples still train the model
    state = saved_state(str(tmp_path / "run"), 2)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state["train"]["params"]))


def test_full_disk_while_saving_is_clear_and_the_previous_checkpoint_resumes(reference, tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    ref_dir, ref_summary = reference
    workdir = str(tmp_path / "full")
    save = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def full_at_epoch_5(self, x, directory):
        if x.get("epoch") == 5:  # the meta file of epoch 5: the state files are already written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await save(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_at_epoch_5)
    with pytest.raises(TrainingError) as info:
        train(config(workdir), progress=False)
    message = str(info.value)
    assert "could not write the checkpoint of epoch 5" in message and "No space left on device" in message
    assert "last good checkpoint is epoch 4" in message and "free disk space" in message
    assert checkpoints(workdir) == [2, 3, 4]
    monkeypatch.undo()  # space was freed
    summary = train(config(workdir), progress=False, resume=True)
    assert_same_run(workdir, ref_dir, summary, ref_summary)
