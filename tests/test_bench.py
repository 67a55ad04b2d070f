"""``jaxdp bench``: a tiny grid runs in-process and writes parseable outputs; bad options are clear errors.

Nothing here asserts a time: throughput is measured, never asserted.
"""

import csv
import json
import math
import os

import pytest

from jaxdp import bench


def _in_process(out_dir, **grid):
    """A tiny grid of the small MLP, measured in this process, no device scale-out, one timing block."""
    return bench.run_bench(
        models=["mlp"], out_dir=str(out_dir), devices=[], repeats=1, isolate=False, progress=False, **grid
    )


@pytest.mark.slow  # ~12 s: a whole bench grid (CI's slow step)
def test_tiny_grid_writes_csv_json_markdown_png(tmp_path, capsys):
    out = tmp_path / "out"
    result = _in_process(out, batch_sizes=[32], epsilons=[4.0], clipping_impl="vmap", epochs=1)
    printed = capsys.readouterr().out
    assert "| mlp | 2,410 | 32 | float32 | vmap |" in printed and "does not depend on epsilon" in printed
    for key in ("csv", "json", "md", "png"):
        assert os.path.getsize(result["files"][key]) > 0, key
    with open(result["files"]["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(result["files"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    assert row["model"] == "mlp" and row["clipping_impl"] == "vmap" and float(row["epsilon_target"]) == 4.0
    assert float(row["private_ex_per_s"]) > 0 and float(row["nonprivate_ex_per_s"]) > 0
    assert 0.0 <= float(row["test_accuracy"]) <= 1.0
    assert float(row["epsilon_spent"]) <= 4.0 + 1e-9
    with open(result["files"]["json"]) as f:
        data = json.load(f)
    assert {"header", "note", "rows", "scale", "elapsed_s"} <= set(data)
    (r,) = data["rows"]
    for key in (
        "compile_s_private",
        "compile_s_nonprivate",
        "private_over_nonprivate",
        "xla_mb_private",
        "peak_kind",
        "peak_mb_after_private",
        "calibration",
        "accuracy",
        "references",
    ):
        assert key in r, key
    assert r["accuracy"][0]["epsilon_target"] == 4.0


def test_sigma_rises_as_epsilon_falls():
    cal = bench.calibrate([8.0, 4.0, 2.0, 1.0], 1e-5, dataset_size=1437, batch=64, epochs=3, accountant="rdp")
    sigmas = [c["sigma"] for c in cal]
    assert all(a < b for a, b in zip(sigmas, sigmas[1:], strict=False)), sigmas
    for c in cal:  # the calibrated sigma spends at most the target, and not much less
        assert c["epsilon_target"] * 0.95 <= c["epsilon_spent"] <= c["epsilon_target"] + 1e-9


@pytest.mark.slow  # ~9 s of timing (CI's slow step)
def test_references_hook_reports_ratio_or_not_installed(tmp_path, monkeypatch, capsys):
    def fake(model, batch, repeats):
        return 100.0

    def missing(model, batch, repeats):
        raise ImportError("no module named 'opacus'")

    monkeypatch.setitem(bench.references, "fake", fake)
    monkeypatch.setitem(bench.references, "opacus", missing)
    result = _in_process(tmp_path, batch_sizes=[16], epsilons=[8.0], epochs=0)
    refs = result["rows"][0]["references"]
    assert math.isclose(refs["fake"]["jaxdp_over_ref"], result["rows"][0]["private_ex_per_s"] / 100.0)
    assert "not installed" in refs["opacus"]["error"]
    printed = capsys.readouterr().out
    assert "jaxdp/fake" in printed and "n/a" in printed and "not run" in printed


@pytest.mark.slow  # ~9 s of timing (CI's slow step)
def test_clipping_impls_are_timed_side_by_side(tmp_path, capsys):
    """Each implementation gets its own line; auto says which path it took; the CSV has a record per impl."""
    result = _in_process(tmp_path, batch_sizes=[16], epsilons=[8.0], clipping_impl=["auto", "vmap"], epochs=0)
    printed = capsys.readouterr().out
    assert "| mlp | 2,410 | 16 | float32 | auto (ghost) |" in printed
    assert "| mlp | 2,410 | 16 | float32 | vmap |" in printed
    (row,) = result["rows"]
    assert [p["clipping_impl"] for p in row["private"]] == ["auto", "vmap"]
    assert row["private"][0]["path"] == "ghost" and row["private"][0]["ghost_refused_because"] is None
    assert all(p["ex_per_s"] > 0 and p["over_nonprivate"] > 0 for p in row["private"])
    with open(result["files"]["csv"]) as f:
        records = list(csv.DictReader(f))
    assert [(r["clipping_impl"], r["clipping_path"]) for r in records] == [("auto", "ghost"), ("vmap", "vmap")]


@pytest.mark.slow
def test_subprocess_per_config_and_device_scale_out(tmp_path):
    """The default path: a fresh process per configuration, and 1 vs 2 forced CPU devices agree after k steps."""
    result = bench.run_bench(
        models=["mlp"],
        batch_sizes=[16],
        epsilons=[8.0],
        out_dir=str(tmp_path),
        devices=[1, 2],
        epochs=0,
        repeats=1,
        scale_steps=2,
        progress=False,
    )
    assert result["rows"][0]["isolated_process"] and result["rows"][0]["private_ex_per_s"] > 0
    one, two = result["scale"]
    assert (one["devices"], two["devices"]) == (1, 2) and one["platform"] == "cpu"
    assert one["max_abs_param_diff_vs_1"] == 0.0
    assert two["max_abs_param_diff_vs_1"] < 1e-5
    with open(result["files"]["devices_csv"]) as f:
        assert len(list(csv.DictReader(f))) == 2


def test_nothing_else_in_the_library_imports_the_bench_package():
    """jaxdp.bench is a leaf: only the command line (jaxdp/cli) reaches it."""
    import ast
    import pathlib

    import jaxdp

    root = pathlib.Path(jaxdp.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.is_relative_to(root / "bench") or path.is_relative_to(root / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith("jaxdp.bench")]
    assert not offenders, offenders


def _fake_row(job: dict) -> dict:
    """A measured row as measure_config returns it, with made-up numbers (for tests of the bookkeeping only)."""
    impl = job["clipping_impls"][0]
    private = {"clipping_impl": impl, "path": "vmap", "compile_s": 1.0, "xla_mb": 1.0, "peak_mb_after": 2.0}
    private.update(ex_per_s=500.0, over_nonprivate=0.5, ghost_refused_because=None)
    return {
        "model": job["model"],
        "data": "digits",
        "params": 2410,
        "batch": job["batch"],
        "clipping_impl": impl,
        "dataset_size": 1437,
        "compile_s_nonprivate": 1.0,
        "compile_s_private": 1.0,
        "nonprivate_ex_per_s": 1000.0,
        "private_ex_per_s": 500.0,
        "private_over_nonprivate": 0.5,
        "xla_mb_nonprivate": 1.0,
        "xla_mb_private": 1.0,
        "peak_kind": "host peak RSS",
        "peak_mb_start": 1.0,
        "peak_mb_after_nonprivate": 2.0,
        "peak_mb_after_private": 2.0,
        "private": [private],
        "timing": "fake",
        "references": {},
        "epochs": job["epochs"],
        "accuracy": [],
    }


def test_each_row_is_written_as_it_finishes_and_said_as_it_goes(tmp_path, monkeypatch, capsys):
    """An interrupted bench used to lose every row (the files were written at the end only) and printed
    nothing but a bar. Now each configuration's start and end is a line on stderr, the row is in the CSV
    and JSON as soon as it is measured, and a bar is drawn only on a terminal (capsys's stderr is not one)."""
    from jaxdp.bench import suite

    def measure(job):
        if job["batch"] == 32:
            raise KeyboardInterrupt  # Ctrl-C during the second configuration
        return _fake_row(job)

    monkeypatch.setattr(suite, "measure_config", measure)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(
            models=["mlp"], batch_sizes=[16, 32], epsilons=[8.0], out_dir=str(out), devices=[], epochs=0,
            repeats=1, isolate=False, progress=True, clipping_impl="vmap",
        )  # fmt: skip
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["batch"], r["private_ex_per_s"]) for r in rows] == [("mlp", "16", "500.0")]
    with open(out / "bench.json") as f:
        data = json.load(f)
    assert data["complete"] is False and [r["batch"] for r in data["rows"]] == [16]
    err = capsys.readouterr().err
    assert "\r" not in err, err
    lines = err.splitlines()
    assert any(line.startswith("jaxdp bench: [1/2] mlp, batch 16: compiling, then timing") for line in lines), err
    assert any(line.startswith("jaxdp bench: [1/2] mlp, batch 16: done in ") and "500 (vmap)" in line for line in lines)
    assert lines[-1].startswith("jaxdp bench: [2/2] mlp, batch 32: compiling"), err


def test_a_new_run_replaces_the_previous_runs_files(tmp_path, monkeypatch):
    """Stale outputs of an earlier run are removed first, so a folder never mixes two runs."""
    from jaxdp.bench import suite

    out = tmp_path / "out"
    out.mkdir()
    for name in ("bench.csv", "bench.png", "bench_devices.csv"):
        (out / name).write_text("old run")
    monkeypatch.setattr(suite, "measure_config", _fake_row)
    bench.run_bench(
        models=["mlp"], batch_sizes=[16], epsilons=[8.0], out_dir=str(out), devices=[], epochs=0, repeats=1,
        isolate=False, progress=False, clipping_impl="vmap",
    )  # fmt: skip
    assert not (out / "bench_devices.csv").exists()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "bench.json") as f:
        assert json.load(f)["complete"] is True


@pytest.mark.slow  # ~10 s: a real one-configuration bench through the command line (CI's slow step)
def test_redirected_bench_prints_lines_not_a_bar(tmp_path):
    """`jaxdp bench > log 2>&1` used to fill the log with carriage-return bar frames; now it has one line per
    configuration as it starts and ends, and no bar."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["bench", "--models", "mlp", "--batch-sizes", "16", "--epsilons", "8", "--devices", "--epochs", "0"]
    argv += ["--repeats", "1", "--clipping-impl", "vmap", "--in-process", "--out", str(tmp_path / "out")]
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "jaxdp.cli", *argv], cwd=root, stdout=out, stderr=err, timeout=600)
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stderr
    for text in (stdout, stderr):
        assert "\r" not in text and "█" not in text and "config/s" not in text and "it/s" not in text, text
    lines = stderr.splitlines()
    assert any(line.startswith("jaxdp bench: [1/1] mlp, batch 16: compiling, then timing") for line in lines), stderr
    assert any(line.startswith("jaxdp bench: [1/1] mlp, batch 16: done in ") for line in lines), stderr
    assert "| mlp | 2,410 | 16 | float32 | vmap |" in stdout


def test_the_accelerator_suite_runs_its_grid_here_on_a_tiny_model(tmp_path, capsys):
    """`make bench-gpu` = `jaxdp bench --accelerator`: on a GPU, WRN-16-4 and the transformer at batch 1024 in float32
    and bfloat16, epsilon 1 and 8, auto beside vmap, no accuracy or scale-out. Here the same suite on a tiny grid
    (CPU): the bfloat16 row takes the ghost path too."""
    from jaxdp.bench import ACCELERATOR_SUITE
    from jaxdp.cli import main

    assert ACCELERATOR_SUITE["models"] == ("wrn16_4", "transformer") and ACCELERATOR_SUITE["batch_sizes"] == (1024,)
    assert ACCELERATOR_SUITE["dtypes"] == ("float32", "bfloat16")
    argv = ["bench", "--accelerator", "--models", "mlp", "--batch-sizes", "16", "--repeats", "1", "--in-process"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for dtype in ("float32", "bfloat16"):
        assert f"| mlp | 2,410 | 16 | {dtype} | auto (ghost) |" in out, out
        assert f"| mlp | 2,410 | 16 | {dtype} | vmap |" in out, out
    assert "| 1 | " in out and "| 8 | " in out and "| 2 | " not in out  # epsilon 1 and 8 only
    assert "not run" in out  # no accuracy runs
    with open(tmp_path / "bench.json") as f:
        run = json.load(f)
    assert run["scale"] == [] and run["complete"] is True  # no device scale-out
    assert [(r["model"], r["batch"], r["dtype"]) for r in run["rows"]] == [
        ("mlp", 16, "float32"),
        ("mlp", 16, "bfloat16"),
    ]
    bf16 = run["rows"][1]
    assert bf16["references"] == {}  # the peers run in float32: no ratio against them
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Makefile")) as f:
        assert "jaxdp bench --accelerator" in f.read()
