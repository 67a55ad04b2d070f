"""``jaxdp train`` and its workdir, through the real entry point: a run is never written over, --overwrite and
--resume say what happens to it, Ctrl-C and a closed pipe end in one line (or none), failed runs leave no
empty directories, and a resumed run logs each epoch once."""

import fcntl
import json
import os
import pty
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

# The finished run below is shared by the module's tests: one xdist worker for the module (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("cli_workdir")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")
FIXED_SIGMA = ["privacy.target_epsilon=None", "privacy.noise_multiplier=2.0"]


def jaxdp(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxdp.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs
    )


def start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxdp.cli", *args], cwd=ROOT, text=True, **kwargs)


def train_args(workdir, *overrides) -> list[str]:
    return ["train", "--config", DIGITS, f"workdir={workdir}", *overrides]


def one_error_line(proc) -> str:
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def checkpoints(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 2-epoch run (sigma calibrated to epsilon 3), its stdout and stderr going to pipes."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    proc = jaxdp(*train_args(workdir, "epochs=2"))
    assert proc.returncode == 0, proc.stderr
    return workdir, proc


@pytest.fixture
def copy(finished, tmp_path):
    shutil.copytree(finished[0], tmp_path / "run")
    return tmp_path / "run"


def test_rerun_into_a_workdir_holding_a_run_is_refused_and_changes_nothing(copy):
    """It used to train again: metrics.jsonl and summary.json replaced, the old checkpoint kept, the new one not."""
    before = {name: read(copy / name) for name in ("metrics.jsonl", "summary.json")}
    proc = jaxdp(*train_args(copy, "epochs=1"))
    assert proc.returncode == 2
    err = one_error_line(proc)
    assert err.startswith(f"jaxdp: error: workdir '{copy}' holds a run (checkpoints of epochs 2; "), err
    assert "continue it with --resume, replace it with --overwrite" in err and "fresh workdir=DIR" in err
    assert {name: read(copy / name) for name in before} == before and checkpoints(copy) == [2]


def test_overwrite_deletes_the_previous_run_and_nothing_else(copy):
    (copy / "notes.txt").write_text("mine")
    proc = jaxdp(*train_args(copy, "epochs=1"), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "jaxdp: --overwrite: deleted checkpoints, metrics.jsonl, summary.json, tensorboard" in proc.stdout
    assert checkpoints(copy) == [1]  # the old run's checkpoint of epoch 2 is gone: --resume cannot pick it up
    assert [json.loads(line)["epoch"] for line in (copy / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((copy / "summary.json").read_text())["steps"] == 3
    if (copy / "tensorboard").exists():  # the old run's events are gone, the new run's are there
        assert len(os.listdir(copy / "tensorboard")) == 1
    assert (copy / "notes.txt").read_text() == "mine"


@pytest.mark.slow  # ~20 s (make test stays under 10 minutes)
def test_resume_with_another_config_names_the_keys_that_differ(copy):
    """It used to load the checkpoint and die with a traceback from the accountant (sigma 1.78 vs 1.51)."""
    # Overrides may follow --resume (they were "unrecognised" there).
    proc = jaxdp(
        "train", "--config", DIGITS, "--resume", f"workdir={copy}", "privacy.target_epsilon=2.0", "batch_size=256"
    )
    assert proc.returncode == 2
    err = one_error_line(proc)
    assert err.startswith(
        f"jaxdp: error: --resume: the config differs from the one checkpoint 2 ({copy}/checkpoints/2)"
    )
    assert "batch_size 512 -> 256, privacy.target_epsilon 3.0 -> 2.0. A resumed run may change only epochs," in err
    # epochs may grow only where sigma stays the same; here it is calibrated to the target over the planned steps
    proc = jaxdp(*train_args(copy, "epochs=3"), "--resume")
    assert proc.returncode == 2
    assert (
        "--resume: epochs 2 -> 3 would change sigma: it is calibrated to privacy.target_epsilon=3.0"
        in one_error_line(proc)
    )
    proc = jaxdp(*train_args(copy, "epochs=1"), "--resume")
    assert proc.returncode == 2
    assert "--resume: epochs 2 -> 1 is below the epoch of checkpoint 2" in one_error_line(proc)
    proc = jaxdp(*train_args(copy, "epochs=2"), "--resume", "--overwrite")
    assert proc.returncode == 2
    assert "--resume and --overwrite exclude each other" in one_error_line(proc)


@pytest.mark.slow  # ~20 s (make test stays under 10 minutes)
def test_resume_of_a_finished_run_trains_nothing_and_keeps_its_summary(copy):
    """It used to rewrite summary.json with a meaningless examples_per_sec."""
    before = read(copy / "summary.json")
    proc = jaxdp(*train_args(copy, "epochs=2", "checkpoint.keep=4"), "--resume")  # checkpoint.* may change
    assert proc.returncode == 0, proc.stderr
    assert (
        "jaxdp: nothing to train: checkpoint 2 is at the last step (6 of 6); summary.json is unchanged." in proc.stdout
    )
    assert read(copy / "summary.json") == before
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == json.loads(before)


@pytest.mark.slow  # ~24 s (make test stays under 10 minutes)
def test_failed_runs_leave_no_empty_workdir_behind(tmp_path):
    """A bad value or bad data used to leave workdir/checkpoints/ (empty) behind."""
    cases = [
        ("batch_size=5000", "batch_size=5000 is larger than the training set"),  # found at setup
        (f"dataset=npz:{tmp_path}/missing.npz", "not found"),  # bad data
    ]
    for override, message in cases:
        proc = jaxdp(*train_args(tmp_path / "new" / "run", override))
        assert proc.returncode == 2 and message in one_error_line(proc)
        assert not (tmp_path / "new").exists()
    # a directory the user made stays, and so does what is in it
    (tmp_path / "mine" / "run").mkdir(parents=True)
    proc = jaxdp(*train_args(tmp_path / "mine" / "run", "batch_size=5000"))
    assert proc.returncode == 2
    assert os.listdir(tmp_path / "mine" / "run") == []


# The run is started through this prologue: SIGINT unblocked and at Python's default handler, as when a
# shell starts `jaxdp`. A process inherits its parent's blocked-signal mask and an ignored SIGINT across exec,
# and some test before this one can leave the pytest worker that way (seen only under the full suite: the run
# went on after Ctrl-C, to the end of its 400 epochs or until the 2-minute timeout), so the child never saw
# the Ctrl-C this test sends. (A preexec_fn would do the same in the forked child, but forking a process
# that runs JAX is warned against, and warnings are errors here.)
_AS_FROM_A_SHELL = (
    "import runpy, signal, sys; "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = ['jaxdp', *sys.argv[1:]]; "
    "runpy.run_module('jaxdp.cli', run_name='__main__', alter_sys=True)"
)


def interrupt(workdir, *overrides, ready) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Start a long run, wait until ``ready(workdir, line)``, press Ctrl-C."""
    args = train_args(workdir, "epochs=400", *overrides)
    proc = subprocess.Popen(
        [sys.executable, "-c", _AS_FROM_A_SHELL, *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 240
    try:
        for line in proc.stdout:
            if ready(workdir, line) or time.time() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave the run behind (its ResourceWarning fails the worker's next test)
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode, out, err), args


def test_ctrl_c_is_one_line_with_the_last_checkpoint_and_the_resume_command(tmp_path):
    """It used to print ~40 lines of KeyboardInterrupt traceback from inside dp_accounting, and no hint."""

    def after_the_second_checkpoint(workdir, line):
        # Or any epoch line past the fifth: once seen to run all 400 epochs under load without stopping here.
        late = line.startswith("epoch ") and line.split()[1].isdigit() and int(line.split()[1]) >= 5
        return late or (os.path.isdir(workdir / "checkpoints") and len(checkpoints(workdir)) >= 2)

    workdir = tmp_path / "run"
    proc, args = interrupt(workdir, "checkpoint.every_epochs=1", ready=after_the_second_checkpoint)
    assert proc.returncode == 130
    err = one_error_line(proc)
    assert err.startswith("jaxdp: interrupted; the last checkpoint is epoch "), err
    epoch = int(err.split("epoch ")[1].split(" ")[0])
    assert f"({workdir}/checkpoints/{epoch}); continue with: " in err and epoch == checkpoints(workdir)[-1]
    assert shlex.split(err.split("continue with: ")[1]) == ["jaxdp", *args, "--resume"]


@pytest.mark.slow  # ~25 s: the other Ctrl-C test above is in the default suite
def test_ctrl_c_before_the_first_checkpoint_says_so(tmp_path):
    def after_the_first_epoch(workdir, line):
        return line.startswith("epoch   1 |")

    workdir = tmp_path / "run"
    proc, args = interrupt(workdir, "checkpoint.every_epochs=0", ready=after_the_first_epoch)
    assert proc.returncode == 130
    err = one_error_line(proc)
    assert err.startswith(f"jaxdp: interrupted before the first checkpoint (none under {workdir}/checkpoints); ")
    assert shlex.split(err.split("start again with: ")[1]) == ["jaxdp", *args, "--resume"]


@pytest.mark.slow  # ~14 s (make test stays under 10 minutes)
def test_a_closed_output_pipe_ends_quietly(tmp_path):
    """`jaxdp ... | head -1` used to end in a BrokenPipeError traceback."""
    proc = start(*train_args(tmp_path / "run", "epochs=50"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith("jaxdp: ")  # head -1 reads a line, then goes
    proc.stdout.close()
    assert proc.wait(timeout=300) == 141
    err = proc.stderr.read()
    assert "Traceback" not in err and "Broken" not in err and "Exception ignored" not in err, err
    proc.stderr.close()
    # every command: account's table goes to a pipe closed before it is written
    proc = start("account", "--sampling-rate", "0.01", "--noise-multiplier", "1", "--steps", "100", "--json",
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == ""
    proc.stderr.close()


def run_on_a_terminal(*args) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal and stdout into a pipe: (exit code, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a window of 24 x 100 characters
    proc = start(*args, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal is closed once the process exits
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    out, _ = proc.communicate(timeout=300)
    reader.join(timeout=30)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow  # ~40 s on a pseudo-terminal: CI's slow step
def test_no_progress_hides_the_bar_only_and_the_bar_needs_a_terminal(finished, tmp_path):
    """--no-progress used to hide the epoch lines as well."""
    code, out, terminal = run_on_a_terminal(*train_args(tmp_path / "a", "epochs=1"), "--no-progress")
    assert code == 0
    assert "epoch   1 | loss " in out and "private training" not in terminal
    code, out, terminal = run_on_a_terminal(*train_args(tmp_path / "b", "epochs=1"))
    assert code == 0
    assert "epoch   1 | loss " in out and "private training" in terminal  # the bar, drawn on the terminal
    _, redirected = finished  # stdout and stderr into pipes: the epoch lines, no bar
    assert "epoch   1 | loss " in redirected.stdout and "epoch   2 | loss " in redirected.stdout
    assert "private training" not in redirected.stderr


def tensorboard_scalars(logdir) -> list[tuple[str, int, float]]:
    """The scalars TensorBoard shows: events read in order, those at or after a restart's purge step dropped."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    shown = []
    for name in sorted(os.listdir(logdir)):  # events.out.tfevents.<time>...: oldest first
        data = read(os.path.join(logdir, name))
        i = 0
        while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                shown = [s for s in shown if s[1] < event.step]
            for value in event.summary.value:
                shown.append((value.tag, event.step, value.simple_value))
    return shown


@pytest.mark.slow  # ~50 s: a run and its resume (CI's slow step)
def test_resume_logs_each_epoch_once_in_metrics_and_tensorboard(tmp_path):
    """After a resume, TensorBoard used to show the epochs after the checkpoint twice."""
    pytest.importorskip("tensorboardX")
    workdir = tmp_path / "run"
    proc = jaxdp(*train_args(workdir, "epochs=2", "checkpoint.every_epochs=1", *FIXED_SIGMA))
    assert proc.returncode == 0, proc.stderr
    # As if interrupted after epoch 2 was logged, before its checkpoint was committed.
    shutil.rmtree(workdir / "checkpoints" / "2")
    (workdir / "summary.json").unlink()
    # ... and resumed for one more epoch: epochs may grow, sigma is fixed.
    proc = jaxdp(*train_args(workdir, "epochs=3", "checkpoint.every_epochs=1", *FIXED_SIGMA), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "jaxdp: resumed from epoch 1" in proc.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and [r["step"] for r in records] == [3, 6, 9]
    scalars = tensorboard_scalars(workdir / "tensorboard")
    loss = [(step, value) for tag, step, value in scalars if tag == "loss"]
    assert [step for step, _ in loss] == [3, 6, 9]  # each epoch once
    assert [value for _, value in loss] == pytest.approx([r["loss"] for r in records])  # the resumed run's values
    assert len(scalars) == len(set((tag, step) for tag, step, _ in scalars))


def test_help_says_what_steps_and_delta_are_what_overwrite_deletes_and_what_resume_may_change():
    account_help = " ".join(jaxdp("account", "--help").stdout.split())
    assert "--steps STEPS number of noisy steps of the run" in account_help  # it had no description
    assert "--delta DELTA delta of the (epsilon, delta) guarantee reported: in (0, 1)" in account_help
    train_help = " ".join(jaxdp("train", "--help").stdout.split())
    assert (
        "--overwrite start afresh in a workdir that holds a run: deletes its checkpoints/, metrics.jsonl, "
        in train_help
    )
    assert (
        "--no-progress hide the progress bar" in train_help and "the epoch lines are printed either way" in train_help
    )
    from jaxdp.train.loop import RESUMABLE_KEYS

    for key in RESUMABLE_KEYS:  # the rule of --resume, as the code applies it
        assert key in train_help.split("--resume continue from the latest checkpoint")[1], key


def test_overwrite_never_deletes_folders_jaxdp_did_not_write(tmp_path):
    """A user's own checkpoints/ folder: kept when the workdir holds no run, refused (named) when it holds one."""
    from jaxdp.config import ConfigError, apply_overrides, load_config
    from jaxdp.train import train
    from jaxdp.train.loop import _clear_run

    mine = tmp_path / "project"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "model.pt").write_text("not jaxdp's")
    assert _clear_run(str(mine)) == [] and (mine / "checkpoints" / "model.pt").exists()  # no run here: nothing

    (mine / "summary.json").write_text("{}")  # now it holds a run, and the folder also has a file of the user's
    config = apply_overrides(load_config(DIGITS), [f"workdir={mine}"])
    with pytest.raises(ConfigError, match=r"--overwrite would delete files jaxdp did not write: .*model\.pt"):
        train(config, progress=False, overwrite=True)
    assert (mine / "checkpoints" / "model.pt").exists() and (mine / "summary.json").exists()


def test_resume_may_not_extend_a_bandmf_run():
    """BandMF's coefficients are optimised for the planned steps: more epochs would change them mid-run."""
    from jaxdp.config import ConfigError, apply_overrides, load_config
    from jaxdp.train.loop import _check_resume_config, _config_json

    fixed = ["privacy.target_epsilon=None", "privacy.noise_multiplier=2.0"]
    saved = _config_json(apply_overrides(load_config(DIGITS), [*fixed, "privacy.bands=2", "epochs=4"]))
    longer = apply_overrides(load_config(DIGITS), [*fixed, "privacy.bands=2", "epochs=8"])
    with pytest.raises(ConfigError, match=r"BandMF noise coefficients.*privacy\.bands=2"):
        _check_resume_config(saved, longer, {"epoch": 2}, "checkpoint 2")
    # DP-SGD with a fixed sigma may be extended
    saved = _config_json(apply_overrides(load_config(DIGITS), [*fixed, "epochs=4"]))
    _check_resume_config(saved, apply_overrides(load_config(DIGITS), [*fixed, "epochs=8"]), {"epoch": 2}, "ckpt")


def test_ctrl_c_of_an_overwrite_before_its_first_checkpoint_does_not_suggest_resuming_the_old_run(tmp_path):
    import time

    import ml_collections

    from jaxdp.cli.main import _interrupted

    (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # the previous run's checkpoint
    config = ml_collections.ConfigDict({"workdir": str(tmp_path)})
    argv = ["train", "--config", DIGITS, "--overwrite"]
    line = _interrupted(config, argv, started=time.time() + 60)  # the run started after that checkpoint
    assert "start again with" in line and line.endswith("--overwrite") and "--resume" not in line, line
    line = _interrupted(config, argv, started=time.time() - 60)  # this run wrote it
    assert "last checkpoint is epoch 3" in line and line.endswith("--resume") and "--overwrite" not in line, line
