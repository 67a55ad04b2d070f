"""The grid of ``jaxdp bench``: option checks, σ per target ε, one measurement per (model, batch), the outputs.

For a grid of models x batch sizes x target ε, with fixed epochs and a fixed
sampling rate q = B / N per (model, batch): σ is calibrated with jaxdp's accountant
(:func:`jaxdp.accounting.calibrate_noise_multiplier`) for each target ε at δ, and the
ε the plan then spends is reported beside it; each (model, batch) is measured by
:func:`jaxdp.bench.measure.measure_config` (in a fresh subprocess unless
``isolate=False``), then the device scale-out table, then the outputs
(:mod:`jaxdp.bench.report`).

As it goes it prints one line on stderr per configuration as it starts (model, batch,
what is timed and trained) and as it ends (its time and throughput), and writes each
finished row to the CSV, JSON and markdown at once, so an interrupted bench keeps its
rows; the progress bar is drawn only when stderr is a terminal.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Sequence

import jax
from tqdm.auto import tqdm

from jaxdp import CLIPPING_IMPLS, rules
from jaxdp.accounting import calibrate_noise_multiplier, require_upper_bound
from jaxdp.bench.measure import measure_config, run_isolated, scale_out
from jaxdp.bench.models import DEFAULT_MODELS, MODELS
from jaxdp.bench.report import clear_outputs, render_markdown, write_outputs
from jaxdp.host import malloc_setting
from jaxdp.plan import PrivacyPlan, steps_per_epoch
from jaxdp.train.setup import COMPUTE_DTYPES

__all__ = ["DEFAULT_EPSILONS", "BenchError", "calibrate", "run_bench"]

DEFAULT_EPSILONS = (1.0, 2.0, 4.0, 8.0)
# `jaxdp bench --accelerator` (`make bench-gpu`): the grid for one GPU or TPU, meant to finish in <= 8 minutes
# there; each model in float32 and in bfloat16 (mixed precision: float32 parameters, the model in bfloat16).
ACCELERATOR_SUITE = {
    "models": ("wrn16_4", "transformer"),
    "batch_sizes": (1024,),
    "dtypes": ("float32", "bfloat16"),
    "epsilons": (1.0, 8.0),
    "devices": (),
    "epochs": 0,
    "out_dir": os.path.join("benchmarks", "out", "accelerator"),
}


class BenchError(ValueError):
    """A bad benchmark option; the message names the value and the fix."""


def _impls(clipping_impl: str | Sequence[str]) -> list[str]:
    return list(clipping_impl) if isinstance(clipping_impl, list | tuple) else [clipping_impl]


def _check_options(models, batch_sizes, epsilons, delta, accountant, clipping_impl, devices, epochs, dtypes) -> None:
    if not models:
        raise BenchError(f"--models is empty; choose from {', '.join(MODELS)}.")
    if not dtypes:
        raise BenchError(f"--dtypes is empty; give one or more of {', '.join(COMPUTE_DTYPES)}.")
    for d in dtypes:
        if d not in COMPUTE_DTYPES:
            raise BenchError(
                f"--dtypes {d!r} is not known; choose from {', '.join(COMPUTE_DTYPES)} (the dtype the model computes "
                "in; parameters stay float32)."
            )
    for m in models:
        if m not in MODELS:
            raise BenchError(f"--models {m!r} is not a benchmarked model; choose from {', '.join(MODELS)}.")
    for b in batch_sizes or ():
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise BenchError(f"--batch-sizes {b!r} is invalid: need positive ints, e.g. --batch-sizes 64 128.")
    if not epsilons:
        raise BenchError("--epsilons is empty; give at least one target epsilon, e.g. --epsilons 1 2 4 8.")
    try:  # the privacy rules (jaxdp.rules), under the flags' names
        for e in epsilons:
            rules.check_target_epsilon(e, "--epsilons", allow_none=False)
        rules.check_delta(delta, name="--delta")
    except ValueError as err:
        raise BenchError(str(err)) from None
    try:
        require_upper_bound(accountant)
    except ValueError as e:
        raise BenchError(f"--accountant: {e}") from None
    impls = _impls(clipping_impl)
    if not impls:
        raise BenchError(f"--clipping-impl is empty; give one or more of {', '.join(CLIPPING_IMPLS)}.")
    for impl in impls:
        if impl not in CLIPPING_IMPLS:
            raise BenchError(f"--clipping-impl {impl!r} is not known; choose one of {', '.join(CLIPPING_IMPLS)}.")
    if len(set(impls)) != len(impls):
        raise BenchError(f"--clipping-impl {' '.join(impls)} names one implementation twice; list each once.")
    for n in devices:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise BenchError(f"--devices {n!r} is invalid: need positive device counts, e.g. --devices 1 2 4 8.")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0):
        raise BenchError(f"--epochs {epochs!r} is invalid: need an int >= 0 (0 = no accuracy runs).")


def _say(line: str) -> None:
    """One progress line on stderr, above the bar when one is drawn."""
    tqdm.write(f"jaxdp bench: {line}", file=sys.stderr)
    sys.stderr.flush()


def _what(job: dict, isolate: bool) -> str:
    """What one configuration measures, in words."""
    eps = ", ".join(f"{c['epsilon_target']:g}" for c in job["sigmas"])
    timed = (
        f"compiling, then timing the non-private step beside the private step "
        f"({' and '.join(job['clipping_impls'])} clipping) in {job['repeats']} interleaved blocks of "
        f"~{job['block_s']:g} s"
    )
    trained = (
        f"then training {job['epochs']} epoch(s) for test accuracy without noise and at epsilon {eps}"
        if job["epochs"]
        else "no accuracy runs (epochs 0)"
    )
    return f"{timed}; {trained}" + ("; in a fresh process" if isolate else "")


def calibrate(
    epsilons: Sequence[float], delta: float, dataset_size: int, batch: int, epochs: int, accountant: str
) -> list[dict]:
    """σ per target ε for ``epochs`` of Poisson steps at q = batch / dataset_size, and the ε it spends."""
    steps = max(1, epochs) * steps_per_epoch(dataset_size, batch)
    out = []
    for eps in epsilons:
        sigma = calibrate_noise_multiplier(eps, delta, batch / dataset_size, steps, accountant=accountant)
        plan = PrivacyPlan(
            dataset_size=dataset_size,
            batch_size=batch,
            l2_clip_norm=1.0,
            noise_multiplier=sigma,
            num_steps=steps,
            accountant=accountant,
        )
        out.append({"epsilon_target": float(eps), "sigma": float(sigma), "epsilon_spent": plan.epsilon(delta)})
    return out


def run_bench(
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    batch_sizes: Sequence[int] | None = None,
    dtypes: Sequence[str] = ("float32",),
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    delta: float = 1e-5,
    accountant: str = "rdp",
    clipping_impl: str | Sequence[str] = ("auto", "vmap"),
    devices: Sequence[int] = (1, 2, 4, 8),
    out_dir: str = os.path.join("benchmarks", "out"),
    full: bool = False,
    epochs: int | None = None,
    repeats: int | None = None,
    scale_model: str | None = None,
    scale_steps: int = 3,
    isolate: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Run the grid, print the markdown tables, and write CSV, JSON, markdown and PNG to ``out_dir``.

    Args:
      models: names in :data:`jaxdp.bench.MODELS` (default: mnist_cnn, wrn16_4, transformer).
      batch_sizes: the same batch sizes for every model; default each model's quick
        (or ``full``) batches.
      dtypes: what each model computes in, one row per dtype (:func:`jaxdp.train.classification_loss`:
        "float32", or mixed precision "bfloat16" / "float16" with float32 parameters); the private and
        non-private steps of a row compute in the same dtype.
      epsilons: target ε values; σ is calibrated for each at ``delta`` with ``accountant``.
      clipping_impl: one or more of "vmap" (per-example gradients), "ghost" (norms from layer
        inputs and output gradients) and "auto" (ghost where the model is covered, else vmap);
        all are timed side by side in one process; the accuracy runs and the scale-out table
        use the first.
      devices: forced-CPU device counts of the scale-out table (empty: no table).
      full: the long grid (more batches, epochs and repeats) instead of the quick one.
      epochs: epochs of every accuracy run (default per model; 0 = no accuracy runs).
      repeats: interleaved timing blocks (default 5 quick, 9 full).
      scale_model: the model of the scale-out table (default the first of ``models``).
      isolate: one fresh subprocess per (model, batch) so each peak-memory reading is its own.

    Returns:
      ``{"header", "rows", "scale", "files", "elapsed_s"}``.

    Raises:
      BenchError: a bad option, naming it and the fix.

    Example:
      >>> rows = run_bench(models=["mlp"], batch_sizes=[32], epsilons=[8.0], out_dir="/tmp/b",
      ...                  isolate=False, devices=[])  # doctest: +SKIP
    """
    models, devices = list(models), list(devices)
    batch_sizes = list(batch_sizes) if batch_sizes else None
    dtypes = list(dtypes)
    _check_options(models, batch_sizes, epsilons, delta, accountant, clipping_impl, devices, epochs, dtypes)
    impls = _impls(clipping_impl)
    scale_model = scale_model or models[0]
    if scale_model not in MODELS:
        raise BenchError(f"--scale-model {scale_model!r} is not a benchmarked model; choose from {', '.join(MODELS)}.")
    repeats = repeats or (9 if full else 5)
    block_s = 1.0 if full else 0.3
    grid = []
    for m in models:
        spec = MODELS[m]
        for b in batch_sizes or (spec.full_batches if full else spec.quick_batches):
            for d in dtypes:
                grid.append((m, b, epochs if epochs is not None else spec.epochs(full), d))
    for m, b, _, _ in grid:  # every configuration's data rules, before anything is measured or written
        n_train = len(MODELS[m].data().x_train)
        if b > n_train:
            raise BenchError(f"--batch-sizes {b} is larger than {m}'s training set ({n_train}); use <= {n_train}.")
        try:
            rules.check_delta(delta, dataset_size=n_train, name="--delta")
        except ValueError as err:
            raise BenchError(f"{m}: {err}") from None
    scale_batch = max(b for m, b, _, _ in grid if m == scale_model) if scale_model in models else grid[0][1]
    if devices and scale_batch % math.lcm(*devices):
        raise BenchError(
            f"the scale-out table splits a global batch of {scale_batch} over --devices {devices}, which does not "
            f"divide evenly; use a batch size divisible by {math.lcm(*devices)}."
        )

    header = (
        f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{len(jax.devices())} device(s); {platform.machine()}, {os.cpu_count()} CPU cores; "
        f"{malloc_setting()}; delta={delta:g}, accountant={accountant}, clipping_impl={' / '.join(impls)}, C=1"
    )
    t_start = time.perf_counter()
    rows = []
    total = len(grid) + len(devices)
    clear_outputs(out_dir)
    scale_plan = f"the scale-out of {scale_model} on {', '.join(map(str, devices))} forced CPU device(s)"
    _say(
        f"{len(grid)} configuration(s) (model x batch), then {scale_plan if devices else 'no scale-out (--devices)'}: "
        f"{total} stage(s); each configuration's row is written to {os.path.join(out_dir, 'bench.csv')} as it finishes"
    )
    with tqdm(
        total=total,
        desc="jaxdp bench",
        unit="config",
        disable=not (progress and sys.stderr.isatty()),  # a bar in a redirected file is only noise
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        for i, (m, b, e, d) in enumerate(grid, 1):
            bar.set_postfix(model=m, batch=b, dtype=d)
            n_train = len(MODELS[m].data().x_train)
            cal = calibrate(epsilons, delta, n_train, b, e, accountant)
            job = {
                "model": m,
                "batch": b,
                "dtype": d,
                "repeats": repeats,
                "block_s": block_s,
                "epochs": e,
                "sigmas": cal,
                "clipping_impls": impls,
                "delta": delta,
                "accountant": accountant,
                "seed": seed,
            }
            name = f"{m}, batch {b}" + (f", {d}" if d != "float32" else "")
            _say(f"[{i}/{total}] {name}: {_what(job, isolate)} ...")
            t0 = time.perf_counter()
            row = run_isolated("config", job) if isolate else measure_config(job)
            row.update(
                wall_s=time.perf_counter() - t0, calibration=cal, sampling_rate=b / n_train, isolated_process=isolate
            )
            rows.append(row)
            files = write_outputs(out_dir, header, rows, [], time.perf_counter() - t_start, complete=False)
            speeds = ", ".join(f"{p['ex_per_s']:,.0f} ({p['clipping_impl']})" for p in row["private"])
            _say(
                f"[{i}/{total}] {name}: done in {row['wall_s']:.0f} s: private {speeds}, non-private "
                f"{row['nonprivate_ex_per_s']:,.0f} examples/s; row written to {files['csv']}"
            )
            bar.update(1)
        bar.set_postfix(model=scale_model, stage="devices")
        step = iter(range(len(grid) + 1, total + 1))
        starts: dict[int, float] = {}

        def on_start(n: int) -> None:
            starts[n] = time.perf_counter()
            _say(
                f"[{len(grid) + len(starts)}/{total}] scale-out: private step of {scale_model}, global batch "
                f"{scale_batch}, on {n} forced CPU device(s): {scale_steps} steps, then {repeats} timing blocks; "
                "in a fresh process ..."
            )

        def on_done(r: dict) -> None:
            n = r["devices"]
            _say(
                f"[{next(step)}/{total}] scale-out on {n} device(s): done in {time.perf_counter() - starts[n]:.0f} s: "
                f"{r['ex_per_s']:,.0f} examples/s"
            )
            bar.update(1)

        scale = (
            scale_out(
                scale_model, scale_batch, devices, scale_steps, repeats, block_s, impls[0], seed, on_done, on_start
            )
            if devices
            else []
        )
    elapsed = time.perf_counter() - t_start
    files = write_outputs(out_dir, header, rows, scale, elapsed)
    _say(f"finished {total} stage(s) in {elapsed:.0f} s")
    print(render_markdown(header, rows, scale, elapsed))
    print("\nwrote " + ", ".join(files.values()))
    return {"header": header, "rows": rows, "scale": scale, "files": files, "elapsed_s": elapsed}
