"""Measuring one configuration: private vs non-private step time, memory, references, accuracy; device scale-out.

* the private step (:func:`jaxdp.make_private_step`, once per clipping implementation)
  and the same model's non-private step (:func:`jaxdp.make_nonprivate_step`) are
  compiled ahead of time (compile time) and timed in interleaved blocks in one process
  (:func:`jaxdp.bench.time_interleaved`: median examples/s of each, and their ratio).
  σ only scales the noise added once per step, so throughput does not depend on ε: it
  is measured once per (model, batch);
* memory: XLA's planned memory of each compiled step (arguments + outputs +
  temporaries - aliased, from ``compiled.memory_analysis()``), and the process peak:
  device ``memory_stats()["peak_bytes_in_use"]`` where the backend has it, else host
  peak RSS (``resource.getrusage``). Both peaks are monotone over a process, so each
  (model, batch) runs in a fresh subprocess (:func:`run_isolated`) and the peak is read
  after the non-private step, then after each private step;
* accuracy on the test split after the fixed budget, for each σ (and without noise),
  trained with :func:`jaxdp.run_private_step` on the plan's Poisson sampler;
* scale-out (:func:`scale_out`): the private step on 1, 2, 4, 8 forced CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before jax is
  imported, so each count is a subprocess) with the same global batch and seed.

The noise keys are fixed (from the seed) so that runs are repeatable: this is a
benchmark, not a private release.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdp
from jaxdp import distributed
from jaxdp.bench.models import MODELS, ModelSpec, param_count, split_model
from jaxdp.bench.refs import REFERENCES
from jaxdp.bench.timing import time_interleaved
from jaxdp.host import keep_freed_memory
from jaxdp.keys import key_from_secret
from jaxdp.plan import PrivacyPlan, steps_per_epoch
from jaxdp.train import evaluate, make_optimizer

__all__ = ["measure_config", "references", "run_isolated", "scale_out", "scale_worker", "worker_main"]

# name -> callable(model_name, batch, repeats) -> examples/s of that implementation's private step
# (or a dict with "ex_per_s"; or raises ImportError when its package is missing). The built-in
# ones (jaxdp.bench.refs.REFERENCES: jax_privacy's clipped_grad, optax's DP aggregator, Opacus)
# need the optional `bench` extra; without it their columns say n/a. Entries are called in the
# process that times jaxdp (a fresh subprocess per configuration unless isolate=False), so
# register them at import time of this module.
references: dict[str, Callable[[str, int, int], Any]] = dict(REFERENCES)


def _peak_bytes() -> tuple[float, str]:
    """Process peak memory so far: device peak where the backend reports it, else host peak RSS."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss * (1 if sys.platform == "darwin" else 1024)), "host peak RSS"


def _xla_mb(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return math.nan
    planned = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return planned / 2**20


def _optimizer(spec: ModelSpec):
    name, lr = spec.optimizer
    return make_optimizer(name, lr)


def _timing_plan(n_train: int, batch: int) -> PrivacyPlan:
    # σ does not change the step's cost: 1.0 for every timing.
    return PrivacyPlan(dataset_size=n_train, batch_size=batch, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=1)


def _reference_ratios(model: str, batch: int, repeats: int, jaxdp_ex_per_s: float) -> dict:
    out = {}
    for name, ref in references.items():
        try:
            got = ref(model, batch, repeats)
            ref_ex = float(got["ex_per_s"] if isinstance(got, dict) else got)
            out[name] = {"ex_per_s": ref_ex, "jaxdp_over_ref": jaxdp_ex_per_s / ref_ex}
        except ImportError as e:
            out[name] = {"error": f"not installed ({e})"}
        except (NotImplementedError, ValueError) as e:  # e.g. a model the reference has no twin of
            out[name] = {"error": f"not available for {model} ({e})"}
    return out


def measure_config(job: dict) -> dict:
    """Everything measured for one (model, batch): timing, memory, references, accuracy per σ.

    ``job`` holds model, batch, repeats, block_s, epochs, sigmas (list of calibration
    dicts), clipping_impls (timed side by side; the accuracy runs use the first),
    delta, accountant, seed.
    """
    spec = MODELS[job["model"]]
    batch, impls, seed, dtype = job["batch"], job["clipping_impls"], job["seed"], job.get("dtype", "float32")
    dataset = spec.data()
    _, params, _, loss_fn = split_model(job["model"], seed, dtype)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(dataset.x_train), batch)
    x, y = jnp.asarray(dataset.x_train[idx]), jnp.asarray(dataset.y_train[idx])
    mask = jnp.ones((batch,), jnp.float32)
    opt = _optimizer(spec)
    peak0, peak_kind = _peak_bytes()

    # The timed calls are the ahead-of-time compiled steps on one already-placed batch: the compile
    # time and memory_analysis() come from that executable (a later jitted call would compile again),
    # and a draw of one chunk on one device is exactly one step_fn call of run_private_step.
    np_step = jaxdp.make_nonprivate_step(loss_fn, opt)
    np_state = [jaxdp.init_state(params, opt)]
    np_compiled, compile_np = _compile(np_step, np_state[0], x, y)

    def run_nonprivate():
        np_state[0], loss = np_compiled(np_state[0], x, y)
        return loss

    jax.block_until_ready(run_nonprivate())
    peak_np, _ = _peak_bytes()

    # Private step per clipping implementation, each compiled, run once and its process peak read, in order.
    plan = _timing_plan(len(dataset.x_train), batch)
    runners, private = {"nonprivate": run_nonprivate}, []
    for impl in impls:
        p_step = jaxdp.make_private_step(plan, loss_fn, opt, noise_key=key_from_secret(seed + 1), clipping_impl=impl)
        p_state = [p_step.init(params)]
        p_compiled, compile_p = _compile(p_step.step_fn, p_state[0], None, x, y, mask)

        def run_private(p_compiled=p_compiled, p_state=p_state):
            p_state[0], metrics = p_compiled(p_state[0], None, x, y, mask)
            return metrics["loss_sum"]

        jax.block_until_ready(run_private())
        peak_p, _ = _peak_bytes()
        runners[f"private:{impl}"] = run_private
        coverage = jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).ghost_coverage(params, x, y)
        path = impl if impl != "auto" else ("ghost" if coverage is None else "vmap")
        private.append(
            {
                "clipping_impl": impl,
                "path": path,
                "compile_s": compile_p,
                "xla_mb": _xla_mb(p_compiled),
                "peak_mb_after": peak_p / 2**20,
                "ghost_refused_because": coverage,
            }
        )

    t = time_interleaved(runners, job["repeats"], block_s=job["block_s"], warmup=False)  # each ran once above
    for p in private:
        p["ex_per_s"] = batch / t[f"private:{p['clipping_impl']}"].seconds
        p["over_nonprivate"] = t["nonprivate"].seconds / t[f"private:{p['clipping_impl']}"].seconds
    first = private[0]
    row = {
        "model": job["model"],
        "data": spec.data_label(),
        "params": param_count(params),
        "batch": batch,
        "dtype": dtype,
        "clipping_impl": impls[0],
        "dataset_size": len(dataset.x_train),
        "compile_s_nonprivate": compile_np,
        "compile_s_private": first["compile_s"],
        "nonprivate_ex_per_s": batch / t["nonprivate"].seconds,
        "private_ex_per_s": first["ex_per_s"],
        "private_over_nonprivate": first["over_nonprivate"],
        "xla_mb_nonprivate": _xla_mb(np_compiled),
        "xla_mb_private": first["xla_mb"],
        "peak_kind": peak_kind,
        "peak_mb_start": peak0 / 2**20,
        "peak_mb_after_nonprivate": peak_np / 2**20,
        "peak_mb_after_private": first["peak_mb_after"],
        "private": private,
        "timing": "median of {} interleaved blocks ({} steps)".format(
            job["repeats"], " / ".join(str(t[k].iters) for k in runners)
        ),
        # The peers run in float32: a ratio against them only means something for a float32 row.
        "references": _reference_ratios(job["model"], batch, job["repeats"], first["ex_per_s"])
        if dtype == "float32"
        else {},
        "epochs": job["epochs"],
        "accuracy": [],
    }
    if job["epochs"]:
        row["accuracy_nonprivate"] = train_accuracy(job, None)
        for cal in job["sigmas"]:
            row["accuracy"].append({**cal, "test_accuracy": train_accuracy(job, cal)})
    return row


def _compile(jitted, *args) -> tuple[Any, float]:
    """``jitted`` compiled ahead of time for ``args``, and the seconds that took."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def train_accuracy(job: dict, cal: dict | None) -> float:
    """Test accuracy after ``job["epochs"]`` of private (``cal``: a calibration dict) or non-private (None) training.

    Private: the plan's Poisson sampler and :func:`jaxdp.run_private_step`, as ``jaxdp train``
    runs it, with the job's first clipping implementation. Non-private: the same number of
    steps of the ordinary step on shuffled batches of B.
    """
    spec, batch, seed = MODELS[job["model"]], job["batch"], job["seed"]
    dataset = spec.data()
    graphdef, params, rest, loss_fn = split_model(job["model"], seed, job.get("dtype"))
    n = len(dataset.x_train)
    steps = job["epochs"] * steps_per_epoch(n, batch)
    opt = _optimizer(spec)
    x_train, y_train = dataset.x_train, dataset.y_train
    if cal is None:
        np_step = jaxdp.make_nonprivate_step(loss_fn, opt)
        state = jaxdp.init_state(params, opt)
        rng = np.random.default_rng(seed + 2)
        for _ in range(steps):
            idx = rng.choice(n, batch, replace=False)
            state, _ = np_step(state, x_train[idx], y_train[idx])
    else:
        plan = PrivacyPlan(
            dataset_size=n,
            batch_size=batch,
            l2_clip_norm=1.0,
            noise_multiplier=cal["sigma"],
            num_steps=steps,
            accountant=job["accountant"],
        )
        p_step = jaxdp.make_private_step(
            plan, loss_fn, opt, noise_key=key_from_secret(seed + 5), clipping_impl=job["clipping_impls"][0]
        )
        state = p_step.init(params)
        for _, chunks in plan.sampler(seed=seed + 4).steps(0, steps):
            state, _ = jaxdp.run_private_step(p_step, state, [(x_train[i], y_train[i], m) for i, m in chunks])
    predict = jax.jit(lambda p, xb: jnp.argmax(nnx.merge(graphdef, p, rest)(xb), axis=-1))
    return evaluate(predict, state.params, dataset.x_test, dataset.y_test, batch=256)


def scale_worker(job: dict) -> dict:
    """Private-step examples/s on this process's devices, and the params after k steps (saved to npz)."""
    n = job["devices"]
    if len(jax.devices()) < n:
        raise RuntimeError(f"asked for {n} devices, jax sees {len(jax.devices())} ({jax.devices()}).")
    spec, batch, seed = MODELS[job["model"]], job["batch"], job["seed"]
    dataset = spec.data()
    _, params, _, loss_fn = split_model(job["model"], seed)
    rng = np.random.default_rng(seed)
    mesh = distributed.make_mesh(n)
    # One public key for every device count (synthetic data, nothing private): the runs must draw the same
    # noise for their parameters to be compared.
    p_step = jaxdp.make_private_step(
        _timing_plan(len(dataset.x_train), batch),
        loss_fn,
        _optimizer(spec),
        noise_key=key_from_secret(seed + 3),
        mesh=mesh,
        clipping_impl=job["clipping_impl"],
    )
    state = [p_step.init(params)]
    mask = np.ones((batch,), np.float32)
    batches = [
        (dataset.x_train[idx], dataset.y_train[idx], mask)
        for idx in (rng.integers(0, len(dataset.x_train), batch) for _ in range(job["steps"]))
    ]
    # Each step is waited for: with several steps in flight, the forced CPU devices' collectives
    # (the psum of the clipped sums) of different steps can hold all of XLA's CPU threads and
    # wait on each other until XLA aborts (seen here: "rendezvous ... only 1 of 2 arrived").
    for chunk in batches:  # same seed, same batches, same noise key: the params must match 1 device
        state[0], m = jaxdp.run_private_step(p_step, state[0], [chunk])
        jax.block_until_ready(m["loss_sum"])
    np.savez(job["params_path"], *[np.asarray(v) for v in jax.tree_util.tree_leaves(state[0].params)])
    # Timed: step_fn on one batch sharded once beforehand, so the host-to-device copy that
    # run_private_step makes of each chunk is not counted in the step's examples/s.
    placed = distributed.shard_batch(mesh, batches[0])

    def run():
        state[0], m = p_step.step_fn(state[0], None, *placed)
        return jax.block_until_ready(m["loss_sum"])

    t = time_interleaved({"run": run}, job["repeats"], block_s=job["block_s"])["run"]
    return {"devices": n, "platform": jax.devices()[0].platform, "ex_per_s": batch / t.seconds}


def run_isolated(kind: str, job: dict, env_extra: dict | None = None) -> dict:
    """Run ``kind`` ("config" or "scale") in a fresh Python with this jaxdp on the path; return its JSON."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(jaxdp.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(env_extra or {})
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        proc = subprocess.run(
            [sys.executable, "-m", "jaxdp.bench", kind, job_path, out_path], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(
                f"benchmark subprocess ({kind}, {job.get('model')}, batch {job.get('batch')}) failed with exit "
                f"code {proc.returncode}:\n{proc.stderr[-3000:]}"
            )
        with open(out_path) as f:
            return json.load(f)


def scale_out(
    model, batch, devices, steps, repeats, block_s, clipping_impl, seed, on_done=None, on_start=None
) -> list[dict]:
    """One :func:`scale_worker` subprocess per device count; examples/s and param difference to 1 device.

    ``on_start(n)`` is called before the count ``n`` runs and ``on_done(row)`` with its row once it has.
    """
    rows, params = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in devices:
            if on_start is not None:
                on_start(n)
            job = {
                "model": model,
                "batch": batch,
                "devices": n,
                "steps": steps,
                "repeats": repeats,
                "block_s": block_s,
                "clipping_impl": clipping_impl,
                "seed": seed,
                "params_path": os.path.join(tmp, f"params_{n}.npz"),
            }
            flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
            rows.append(run_isolated("scale", job, {"XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}))
            with np.load(job["params_path"]) as f:
                params[n] = [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]
            if on_done is not None:
                on_done(rows[-1])
    base = params.get(1)
    for r in rows:
        r.update(model=model, batch=batch, steps=steps)
        p = params[r["devices"]]
        r["max_abs_param_diff_vs_1"] = (
            math.nan if base is None else max(float(np.max(np.abs(a - b))) for a, b in zip(p, base, strict=True))
        )
        r["ex_per_s_over_1_device"] = r["ex_per_s"] / rows[0]["ex_per_s"] if rows[0]["devices"] == 1 else math.nan
    return rows


def worker_main(argv: list[str]) -> int:
    """The subprocess: ``python -m jaxdp.bench {config|scale} JOB OUT``."""
    kind, job_path, out_path = argv
    keep_freed_memory()  # as in the jaxdp command that started this subprocess (see jaxdp.host)
    with open(job_path) as f:
        job = json.load(f)
    result = measure_config(job) if kind == "config" else scale_worker(job)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0
