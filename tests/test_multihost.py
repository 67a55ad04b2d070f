"""Multi-host as on a TPU pod, on loopback: two ``jaxdp train`` processes join through
``jax.distributed`` (CPU collectives: gloo, JAX's default) and train on one global mesh.

Each process has 2 forced CPU devices, so the global mesh has 4; the reference is one
process with 4 forced devices and the same (test-only) noise seed, which
tests/test_distributed.py already checks against 1 device and the one-step formula
(noise added once). Equal parameters therefore also mean the noise was added once
across hosts: a second draw would move them by ~1e-3, the tolerance is 1e-5.

All of them are marked slow (deselected by ``make test``, run by CI's second step ``make test-slow``):
the comparisons' four launches of the CLI (seven processes, what users run) take ~50 s of CPU time,
70-95 s of wall time on 2 CPU cores, and ``test_two_processes_join_and_train`` another ~17 s. The
multi-host secret broadcast (every host gets the whole 128-bit seed) stays in the default suite, in
``tests/test_keys.py``.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

# Its module-scoped runs are shared by its tests: one xdist worker for the whole module (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("multihost")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per launch; a hung collective fails the test instead of CI
# Fixed sigma (no target): the plan does not depend on epochs, so a 1-epoch run resumed with
# epochs=2 is the same run as 2 epochs straight. Checkpoints after every epoch.
COMMON = [
    "privacy.noise_seed=0",
    "privacy.target_epsilon=None",
    "privacy.noise_multiplier=1.5",
    "checkpoint.every_epochs=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _command(workdir, overrides, resume=False):
    cmd = [sys.executable, "-m", "jaxdp.cli", "train", "--config", "configs/digits.py:smoke", "--no-progress"]
    return cmd + (["--resume"] if resume else []) + [*COMMON, f"workdir={workdir}", *overrides]


def _report(results) -> str:
    return "\n".join(
        f"--- process {i}: exit {rc}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
        for i, (rc, out, err) in enumerate(results)
    )


def _start(workdir, overrides, devices, resume=False):
    return subprocess.Popen(
        _command(workdir, overrides, resume),
        cwd=ROOT,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(procs):
    """Wait for every process (at most TIMEOUT_S each); (rc, stdout, stderr) each. Kills all on a timeout."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        results = [(p.wait(), *p.communicate()) for p in procs]
        pytest.fail(f"run did not finish in {TIMEOUT_S} s\n{_report(results)}")
    return results


def _two_processes(workdirs, overrides, resume=False, devices=2):
    """Start processes 0 and 1 (``devices`` CPU devices each) joined on a fresh loopback port."""
    port = _free_port()
    return [
        _start(
            workdir,
            [
                *overrides,
                f"distributed.coordinator_address=127.0.0.1:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
            ],
            devices=devices,
            resume=resume,
        )
        for i, workdir in enumerate(workdirs)
    ]


@pytest.mark.slow  # ~17 s: two processes; the multi-host key broadcast stays in tests/test_keys.py (CI's slow step)
def test_two_processes_join_and_train(tmp_path):
    """One epoch on 2 processes x 1 device: both see the global mesh and end with the same
    summary; process 1, given a workdir of its own, writes no logs there."""
    results = _finish(_two_processes([tmp_path / "p0", tmp_path / "p1"], ["epochs=1"], devices=1))
    assert all(rc == 0 for rc, _, _ in results), _report(results)
    summaries = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert summaries[0]["devices"] == summaries[1]["devices"] == 2
    for key in ("test_accuracy", "train_accuracy", "epsilon", "steps"):
        assert summaries[0][key] == summaries[1][key], key
    assert (tmp_path / "p0" / "metrics.jsonl").exists() and (tmp_path / "p0" / "summary.json").exists()
    assert not (tmp_path / "p1" / "metrics.jsonl").exists() and not (tmp_path / "p1" / "summary.json").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    shared, own = tmp / "shared", tmp / "process1_own"  # "shared": both processes pass this path
    reference = _start(tmp / "reference", ["epochs=2"], devices=4)  # beside the first launch: saves ~10 s
    # Epoch 1 with process 1 in a workdir of its own: it must write no logs, and process 0 the checkpoint.
    first = _finish(_two_processes([shared, own], ["epochs=1"]))
    assert all(rc == 0 for rc, _, _ in first), _report(first)
    ref = _finish([reference])
    assert ref[0][0] == 0, _report(ref)
    # Resume on a shared workdir for epoch 2: restores the multi-host checkpoint on both hosts.
    resumed = _finish(_two_processes([shared, shared], ["epochs=2"], resume=True))
    assert all(rc == 0 for rc, _, _ in resumed), _report(resumed)
    # Resume where process 1 cannot see the checkpoints: both must stop with the reason, not hang.
    split = _finish(_two_processes([shared, own], ["epochs=3"], resume=True))
    return {"tmp": tmp, "first": first, "resumed": resumed, "split": split}


def _params(workdir, epoch):
    import jax
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(epoch), "state"))
    return jax.tree_util.tree_leaves(state["train"]["params"])


def _max_diff(a, b):
    assert len(a) == len(b)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(a, b, strict=True))


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    """Epoch 1 (3 noisy steps) on 2 processes x 2 devices == 1 process x 4 devices, float32 to 1e-5."""
    tmp = runs["tmp"]
    assert "devices=4" in runs["first"][0][1] and "devices=4" in runs["first"][1][1]  # one global mesh
    ref, got = _params(tmp / "reference", 1), _params(tmp / "shared", 1)
    assert _max_diff(got, ref) < 1e-5, _max_diff(got, ref)
    assert _max_diff(got, _params(tmp / "reference", 2)) > 1e-3  # the comparison can tell steps apart
    want, have = _records(tmp / "reference")[0], _records(tmp / "shared")[0]
    for key in ("step", "epsilon", "test_accuracy", "train_accuracy"):
        assert have[key] == want[key], key
    assert have["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.mark.slow
def test_multi_host_resume_ends_like_an_uninterrupted_run(runs):
    tmp = runs["tmp"]
    assert "resumed from epoch 1" in runs["resumed"][0][1] and "resumed from epoch 1" in runs["resumed"][1][1]
    ref, got = _params(tmp / "reference", 2), _params(tmp / "shared", 2)
    assert _max_diff(got, ref) < 1e-5, _max_diff(got, ref)
    summary = json.loads((tmp / "shared" / "summary.json").read_text())
    assert summary["epsilon"] == json.loads((tmp / "reference" / "summary.json").read_text())["epsilon"]
    assert summary["steps"] == 6 and summary["devices"] == 4


@pytest.mark.slow
def test_only_process_zero_writes_logs(runs):
    own = runs["tmp"] / "process1_own"
    assert not (own / "metrics.jsonl").exists() and not (own / "summary.json").exists()
    assert not (own / "checkpoints").exists() or not os.listdir(own / "checkpoints")
    assert (runs["tmp"] / "shared" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resume_without_a_shared_workdir_stops_every_process(runs):
    for rc, _, err in runs["split"]:
        assert rc == 1, _report(runs["split"])
        assert "process 0: epoch 2, process 1: none" in err and "every host shares" in err, err[-2000:]
