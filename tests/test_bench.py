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
    assert "| mlp | 2,410 | 32 | vmap |" in printed and "does not depend on epsilon" in printed
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
    assert "| mlp | 2,410 | 16 | auto (ghost) |" in printed and "| mlp | 2,410 | 16 | vmap |" in printed
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
