"""``jaxdp bench``: throughput per epsilon, measured side by side in one process.

For a grid of models x batch sizes x target ε, with fixed epochs and a fixed
sampling rate q = B / N per (model, batch):

* σ is calibrated with jaxdp's accountant (:func:`jaxdp.accounting.calibrate_noise_multiplier`)
  for each target ε at δ, and the ε the plan then spends is reported beside it;
* the private step (:func:`jaxdp.train.make_private_step`) and the same model's
  non-private step (:func:`jaxdp.train.make_nonprivate_step`) are compiled (compile
  time) and timed in interleaved blocks in one process (median examples/s of each,
  and their ratio). σ only scales the noise added once per step, so throughput does
  not depend on ε: it is measured once per (model, batch);
* memory: XLA's planned memory of each compiled step (arguments + outputs +
  temporaries - aliased, from ``compiled.memory_analysis()``), and the process peak:
  device ``memory_stats()["peak_bytes_in_use"]`` where the backend has it, else host
  peak RSS (``resource.getrusage``). Both peaks are monotone over a process, so each
  (model, batch) runs in a fresh subprocess and the peak is read after the
  non-private step, then after the private step (the second includes the first);
* accuracy on the test split after the fixed budget, for each ε (and without noise).

A second table runs the private step of one model on 1, 2, 4, 8 forced CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before jax is
imported, so each count is a subprocess) with the same global batch and seed, and
reports examples/s and the largest parameter difference to 1 device after k steps.

Data: there is no MNIST here, so ``mnist_cnn`` trains on scikit-learn's bundled
digits (8x8) upsampled x3 and padded to 28x28; ``wrn16_4`` and ``transformer`` use
synthetic, learnable data at their shapes (32x32x3 images, token sequences), labelled
as such in every output.

The noise seed is fixed so that runs are repeatable: this is a benchmark, not a
private release.

Example:
  >>> rows = run_bench(models=["mlp"], batch_sizes=[32], epsilons=[8.0], out_dir="/tmp/b",
  ...                  isolate=False, devices=[])  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxdp.keys import key_from_secret, new_secret

__all__ = [
    "BenchError",
    "MODELS",
    "references",
    "run_bench",
    "time_interleaved",
    "time_per_call",
]

CLIPPING_IMPLS = ("vmap", "ghost", "auto")

# name -> callable(model_name, batch, repeats) -> examples/s of that implementation's
# private step (or raises ImportError when its package is missing). Filled by whoever
# adds a reference implementation (jax_privacy, Opacus, optax DP ...). Entries are
# called in the process that times jaxdp (a fresh subprocess per configuration unless
# isolate=False), so register them at import time of this module.
# The built-in ones (jaxdp._bench_refs: jax_privacy's clipped_grad, optax's DP aggregator, Opacus)
# need the optional `bench` extra; without it their columns say n/a. A callable returns examples/s
# or a dict with "ex_per_s".
references: dict[str, Callable[[str, int, int], Any]] = {}


def _builtin_references() -> dict:
    from jaxdp._bench_refs import REFERENCES

    return dict(REFERENCES)


references.update(_builtin_references())


class BenchError(ValueError):
    """A bad benchmark option; the message names the value and the fix."""


# --------------------------------------------------------------------------- timing
def time_per_call(fn: Callable[[], Any], repeats: int, iters: int) -> float:
    """Median seconds per call over ``repeats`` blocks of ``iters`` calls (after one warm-up call)."""
    return time_interleaved({"fn": fn}, repeats, {"fn": iters})["fn"]


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, iters: dict[str, int]) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating blocks.

    Block r of every function runs before block r + 1 of any, so a slow spell of a
    shared machine hits all of them alike; each block is ``iters[name]`` calls.
    """
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters[name]):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / iters[name])
    return {name: statistics.median(t) for name, t in times.items()}


def _block_iters(fns: dict[str, Callable[[], Any]], block_s: float) -> dict[str, int]:
    """Calls per timing block so that a block takes about ``block_s``, from one timed call of each."""
    import jax

    iters = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        iters[name] = max(1, round(block_s / max(time.perf_counter() - t0, 1e-6)))
    return iters


# --------------------------------------------------------------------------- models and data
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: how to build it, its data, and its training budget."""

    build: Callable[[int], Any]  # seed -> nnx.Module
    data: Callable[[], Any]  # () -> jaxdp.data.Dataset
    data_label: str
    optimizer: tuple[str, float]  # (name, learning rate) for the accuracy runs
    quick_batches: tuple[int, ...]
    full_batches: tuple[int, ...]
    quick_epochs: int  # 0 = no accuracy run in --quick
    full_epochs: int


def _digits28():
    from jaxdp.data import Dataset, load

    d = load("digits")

    def resize(x):  # (n, 8, 8, 1) -> (n, 28, 28, 1): nearest x3, then 2 pixels of zero padding
        x = np.repeat(np.repeat(x, 3, axis=1), 3, axis=2)
        return np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))

    return Dataset("digits28", resize(d.x_train), d.y_train, resize(d.x_test), d.y_test, 10)


def _digits():
    from jaxdp.data import load

    return load("digits")


def _synthetic_images(n_train=2048, n_test=512, shape=(32, 32, 3), classes=10, seed=0):
    """Class templates (smooth random patterns) plus per-example noise: learnable, CIFAR-shaped."""
    from jaxdp.data import Dataset

    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(classes, 4, 4, shape[2]))
    templates = np.repeat(np.repeat(coarse, shape[0] // 4, axis=1), shape[1] // 4, axis=2)

    def split(n):
        y = rng.integers(0, classes, n).astype(np.int32)
        x = 0.5 * templates[y] + rng.normal(size=(n, *shape))
        return x.astype(np.float32), y

    x_tr, y_tr = split(n_train)
    x_te, y_te = split(n_test)
    return Dataset("synthetic_cifar_shape", x_tr, y_tr, x_te, y_te, classes)


# A vocabulary of 1,000: the embedding table is then most of the model, as in real token models,
# and its per-example gradients are what the vmap path pays for.
VOCAB, SEQ_LEN, TOKEN_CLASSES = 1000, 32, 4


def _synthetic_tokens(n_train=2048, n_test=512, seed=0):
    """Token sequences whose class sets how often 8 class-specific tokens appear: learnable by attention + pooling."""
    from jaxdp.data import Dataset

    rng = np.random.default_rng(seed)
    signature = rng.permutation(VOCAB)[: 8 * TOKEN_CLASSES].reshape(TOKEN_CLASSES, 8)

    def split(n):
        y = rng.integers(0, TOKEN_CLASSES, n).astype(np.int32)
        x = rng.integers(0, VOCAB, (n, SEQ_LEN))
        marked = rng.random((n, SEQ_LEN)) < 0.15
        x = np.where(marked, signature[y][np.arange(n)[:, None], rng.integers(0, 8, (n, SEQ_LEN))], x)
        return x.astype(np.int32), y

    x_tr, y_tr = split(n_train)
    x_te, y_te = split(n_test)
    return Dataset("synthetic_tokens", x_tr, y_tr, x_te, y_te, TOKEN_CLASSES)


def _build_mnist_cnn(seed):
    from flax import nnx

    from jaxdp.models import DPMnistCNN

    return DPMnistCNN((28, 28, 1), 10, rngs=nnx.Rngs(seed))


def _build_wrn(seed):
    from flax import nnx

    from jaxdp.models import WideResNet

    return WideResNet((32, 32, 3), 10, depth=16, width=4, rngs=nnx.Rngs(seed))


def _build_transformer(seed):
    from flax import nnx

    from jaxdp.models import TransformerClassifier

    return TransformerClassifier(VOCAB, TOKEN_CLASSES, max_len=SEQ_LEN, rngs=nnx.Rngs(seed))


def _build_mlp(seed):
    from flax import nnx

    from jaxdp.models import MLP

    return MLP(64, 10, hidden=(32,), rngs=nnx.Rngs(seed))


MODELS: dict[str, ModelSpec] = {
    "mnist_cnn": ModelSpec(
        _build_mnist_cnn,
        _digits28,
        "digits 8x8 upsampled to 28x28 (real; no MNIST here)",
        ("adam", 2e-3),
        quick_batches=(256,),
        full_batches=(128, 256, 512),
        quick_epochs=15,
        full_epochs=40,
    ),
    "wrn16_4": ModelSpec(
        _build_wrn,
        _synthetic_images,
        "synthetic 32x32x3, 10 classes",
        ("adam", 1e-3),
        quick_batches=(8,),
        full_batches=(16, 64),
        quick_epochs=0,  # a WRN-16-4 epoch takes minutes on 2 CPU cores: timing only in --quick
        full_epochs=2,
    ),
    "transformer": ModelSpec(
        _build_transformer,
        _synthetic_tokens,
        f"synthetic tokens (T={SEQ_LEN}, vocab {VOCAB}, {TOKEN_CLASSES} classes)",
        ("adam", 3e-3),
        quick_batches=(256,),
        full_batches=(64, 256, 1024),
        quick_epochs=4,
        full_epochs=15,
    ),
    # Not in the default grid: a tiny model for tests and smoke runs.
    "mlp": ModelSpec(
        _build_mlp,
        _digits,
        "digits 8x8 (real)",
        ("adam", 1e-2),
        quick_batches=(64,),
        full_batches=(64, 256),
        quick_epochs=3,
        full_epochs=20,
    ),
}
DEFAULT_MODELS = ("mnist_cnn", "wrn16_4", "transformer")
DEFAULT_EPSILONS = (1.0, 2.0, 4.0, 8.0)


# --------------------------------------------------------------------------- option checks
def _check_options(models, batch_sizes, epsilons, delta, accountant, clipping_impl, devices, epochs) -> None:
    from jaxdp.accounting._base import require_upper_bound

    for m in models:
        if m not in MODELS:
            raise BenchError(f"--models {m!r} is not a benchmarked model; choose from {', '.join(MODELS)}.")
    for b in batch_sizes or ():
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise BenchError(f"--batch-sizes {b!r} is invalid: need positive ints, e.g. --batch-sizes 64 128.")
    if not epsilons:
        raise BenchError("--epsilons is empty; give at least one target epsilon, e.g. --epsilons 1 2 4 8.")
    for e in epsilons:
        if not (isinstance(e, (int, float)) and math.isfinite(e) and e > 0):
            raise BenchError(f"--epsilons {e!r} is invalid: target epsilons must be finite numbers > 0, e.g. 1 2 4 8.")
    if not (isinstance(delta, float) and 0 < delta < 1):
        raise BenchError(f"--delta {delta!r} is invalid: delta must lie in (0, 1), e.g. 1e-5.")
    try:
        require_upper_bound(accountant)
    except ValueError as e:
        raise BenchError(f"--accountant: {e}") from None
    impls = list(clipping_impl) if isinstance(clipping_impl, list | tuple) else [clipping_impl]
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


def calibrate(
    epsilons: Sequence[float], delta: float, dataset_size: int, batch: int, epochs: int, accountant: str
) -> list[dict]:
    """σ per target ε for ``epochs`` of Poisson steps at q = batch / dataset_size, and the ε it spends."""
    from jaxdp.accounting import calibrate_noise_multiplier
    from jaxdp.plan import PrivacyPlan, steps_per_epoch

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


# --------------------------------------------------------------------------- measuring one configuration
def _peak_bytes() -> tuple[float, str]:
    """Process peak memory so far: device peak where the backend reports it, else host peak RSS."""
    import resource

    import jax

    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss * (1 if sys.platform == "darwin" else 1024)), "host peak RSS"


def _xla_bytes(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return math.nan
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _make_optimizer(spec: ModelSpec):
    from jaxdp.train import make_optimizer

    name, lr = spec.optimizer
    return make_optimizer(name, lr)


def measure_config(job: dict) -> dict:
    """Everything measured for one (model, batch): timing, memory, references, accuracy per σ.

    ``job`` holds model, batch, repeats, block_s, epochs, sigmas (list of calibration
    dicts), clipping_impls (timed side by side; the accuracy runs use the first),
    delta, accountant, seed.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxdp
    from jaxdp.train import TrainState, classification_loss, make_nonprivate_step, make_private_step

    spec = MODELS[job["model"]]
    batch, impls = job["batch"], job["clipping_impls"]
    impl = impls[0]  # the accuracy runs use the first
    dataset = spec.data()
    graphdef, params, rest = nnx.split(spec.build(job["seed"]), nnx.Param, ...)
    loss_fn = classification_loss(graphdef, rest)
    rng = np.random.default_rng(job["seed"])
    idx = rng.integers(0, len(dataset.x_train), batch)
    x, y = jnp.asarray(dataset.x_train[idx]), jnp.asarray(dataset.y_train[idx])
    mask = jnp.ones((batch,), jnp.float32)
    opt = _make_optimizer(spec)
    peak0, peak_kind = _peak_bytes()

    # Non-private step: compile (timed apart from running), run once, read the process peak.
    np_step = make_nonprivate_step(loss_fn, opt)
    np_state = [TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))]
    t0 = time.perf_counter()
    np_compiled = np_step.lower(np_state[0], x, y).compile()
    compile_np = time.perf_counter() - t0

    def run_nonprivate():
        np_state[0], loss = np_compiled(np_state[0], x, y)
        return loss

    jax.block_until_ready(run_nonprivate())
    peak_np, _ = _peak_bytes()

    # Private step per clipping implementation (σ does not change its cost; 1.0 here), each
    # compiled, run once and its process peak read, in the order given.
    plan = jaxdp.PrivacyPlan(
        dataset_size=len(dataset.x_train), batch_size=batch, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=1
    )
    runners, private = {"nonprivate": run_nonprivate}, []
    for impl_i in impls:
        tx, p_step, _ = make_private_step(
            plan, loss_fn, opt, noise_key=key_from_secret(new_secret()), clipping_impl=impl_i
        )
        p_state = [TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))]
        t0 = time.perf_counter()
        p_compiled = p_step.lower(p_state[0], None, x, y, mask).compile()
        compile_p = time.perf_counter() - t0

        def run_private(p_compiled=p_compiled, p_state=p_state):
            p_state[0], metrics = p_compiled(p_state[0], None, x, y, mask)
            return metrics["loss_sum"]

        jax.block_until_ready(run_private())
        peak_p, _ = _peak_bytes()
        runners[f"private:{impl_i}"] = run_private
        coverage = jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).ghost_coverage(params, x, y)
        path = impl_i if impl_i != "auto" else ("ghost" if coverage is None else "vmap")
        private.append(
            {
                "clipping_impl": impl_i,
                "path": path,
                "compile_s": compile_p,
                "xla_mb": _xla_bytes(p_compiled) / 2**20,
                "peak_mb_after": peak_p / 2**20,
                "ghost_refused_because": coverage,
            }
        )

    # Interleaved timing, blocks of about block_s seconds each.
    iters = _block_iters(runners, job["block_s"])
    t = time_interleaved(runners, job["repeats"], iters)
    for p in private:
        seconds = t[f"private:{p['clipping_impl']}"]
        p["ex_per_s"] = batch / seconds
        p["over_nonprivate"] = t["nonprivate"] / seconds
    first = private[0]
    row = {
        "model": job["model"],
        "data": spec.data_label,
        "params": int(sum(v.size for v in jax.tree_util.tree_leaves(params))),
        "batch": batch,
        "clipping_impl": impl,
        "dataset_size": len(dataset.x_train),
        "compile_s_nonprivate": compile_np,
        "compile_s_private": first["compile_s"],
        "nonprivate_ex_per_s": batch / t["nonprivate"],
        "private_ex_per_s": first["ex_per_s"],
        "private_over_nonprivate": first["over_nonprivate"],
        "xla_mb_nonprivate": _xla_bytes(np_compiled) / 2**20,
        "xla_mb_private": first["xla_mb"],
        "peak_kind": peak_kind,
        "peak_mb_start": peak0 / 2**20,
        "peak_mb_after_nonprivate": peak_np / 2**20,
        "peak_mb_after_private": first["peak_mb_after"],
        "private": private,
        "timing": "median of {} interleaved blocks ({} steps)".format(
            job["repeats"], " / ".join(str(iters[k]) for k in runners)
        ),
        "references": {},
    }
    for name, ref in references.items():
        try:
            got = ref(job["model"], batch, job["repeats"])
            ref_ex = float(got["ex_per_s"] if isinstance(got, dict) else got)
            row["references"][name] = {"ex_per_s": ref_ex, "jaxdp_over_ref": row["private_ex_per_s"] / ref_ex}
        except ImportError as e:
            row["references"][name] = {"error": f"not installed ({e})"}
        except (NotImplementedError, ValueError) as e:  # e.g. a model the reference has no twin of
            row["references"][name] = {"error": f"not available for {job['model']} ({e})"}

    epochs = job["epochs"]
    row["epochs"] = epochs
    row["accuracy"] = []
    if epochs:
        acc_np = _train_accuracy(spec, dataset, graphdef, params, rest, loss_fn, batch, epochs, None, impl, job)
        row["accuracy_nonprivate"] = acc_np
        for cal in job["sigmas"]:
            acc = _train_accuracy(spec, dataset, graphdef, params, rest, loss_fn, batch, epochs, cal, impl, job)
            row["accuracy"].append({**cal, "test_accuracy": acc})
    return row


def _train_accuracy(spec, dataset, graphdef, params, rest, loss_fn, batch, epochs, cal, impl, job) -> float:
    """Test accuracy after ``epochs`` of private (``cal`` = calibration) or non-private (None) training."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdp.plan import PrivacyPlan, steps_per_epoch
    from jaxdp.train import TrainState, _evaluate, make_nonprivate_step, make_private_step

    n = len(dataset.x_train)
    steps = epochs * steps_per_epoch(n, batch)
    opt = _make_optimizer(spec)
    x_train, y_train = dataset.x_train, dataset.y_train
    if cal is None:  # same number of steps of the ordinary step on shuffled batches of B
        step = make_nonprivate_step(loss_fn, opt)
        state = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))
        rng = np.random.default_rng(job["seed"] + 2)
        for _ in range(steps):
            idx = rng.choice(n, batch, replace=False)
            state, _ = step(state, x_train[idx], y_train[idx])
    else:
        plan = PrivacyPlan(
            dataset_size=n,
            batch_size=batch,
            l2_clip_norm=1.0,
            noise_multiplier=cal["sigma"],
            num_steps=steps,
            accountant=job["accountant"],
        )
        tx, step, accumulate = make_private_step(
            plan, loss_fn, opt, noise_key=key_from_secret(new_secret()), clipping_impl=impl
        )
        state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
        sampler = plan.sampler(seed=job["seed"] + 4)
        for _, chunks in sampler.steps(0, steps):
            acc = None
            for i, (idx, mask) in enumerate(chunks):
                if i < len(chunks) - 1:
                    acc, _ = accumulate(state, acc, x_train[idx], y_train[idx], mask)
                else:
                    state, _ = step(state, acc, x_train[idx], y_train[idx], mask)
    predict = jax.jit(lambda p, xb: jnp.argmax(nnx.merge(graphdef, p, rest)(xb), axis=-1))
    return _evaluate(predict, state.params, dataset.x_test, dataset.y_test, batch=256)


def scale_worker(job: dict) -> dict:
    """Private-step examples/s on this process's devices, and the params after k steps (saved to npz)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxdp
    from jaxdp import distributed
    from jaxdp.train import TrainState, classification_loss, make_private_step

    n = job["devices"]
    if len(jax.devices()) < n:
        raise RuntimeError(f"asked for {n} devices, jax sees {len(jax.devices())} ({jax.devices()}).")
    spec = MODELS[job["model"]]
    dataset = spec.data()
    graphdef, params, rest = nnx.split(spec.build(job["seed"]), nnx.Param, ...)
    loss_fn = classification_loss(graphdef, rest)
    batch = job["batch"]
    rng = np.random.default_rng(job["seed"])
    opt = _make_optimizer(spec)
    plan = jaxdp.PrivacyPlan(
        dataset_size=len(dataset.x_train), batch_size=batch, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=1
    )
    mesh = distributed.make_mesh(n)
    # One public key for every device count (synthetic data, nothing private): the runs must draw the same
    # noise for their parameters to be compared.
    tx, step, _ = make_private_step(
        plan, loss_fn, opt, noise_key=key_from_secret(job["seed"] + 3), mesh=mesh, clipping_impl=job["clipping_impl"]
    )
    state = [distributed.replicate(mesh, TrainState(params, tx.init(params), jnp.zeros((), jnp.int32)))]
    mask = np.ones((batch,), np.float32)
    batches = []
    for _ in range(job["steps"]):
        idx = rng.integers(0, len(dataset.x_train), batch)
        batches.append(distributed.shard_batch(mesh, (dataset.x_train[idx], dataset.y_train[idx], mask)))
    # Each step is waited for: with several steps in flight, the forced CPU devices' collectives
    # (the psum of the clipped sums) of different steps can hold all of XLA's CPU threads and
    # wait on each other until XLA aborts (seen here: "rendezvous ... only 1 of 2 arrived").
    for xb, yb, mb in batches:  # same seed, same batches, same noise key: the params must match 1 device
        state[0], m = step(state[0], None, xb, yb, mb)
        jax.block_until_ready(m["loss_sum"])
    leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(state[0].params)]
    np.savez(job["params_path"], *leaves)
    xb, yb, mb = batches[0]

    def run():
        state[0], m = step(state[0], None, xb, yb, mb)
        return jax.block_until_ready(m["loss_sum"])

    seconds = time_per_call(run, job["repeats"], _block_iters({"run": run}, job["block_s"])["run"])
    return {"devices": n, "platform": jax.devices()[0].platform, "ex_per_s": batch / seconds}


# --------------------------------------------------------------------------- subprocesses
def _run_subprocess(kind: str, job: dict, env_extra: dict | None = None) -> dict:
    """Run ``kind`` ("config" or "scale") in a fresh Python with this jaxdp on the path; return its JSON."""
    import jaxdp

    root = os.path.dirname(os.path.dirname(os.path.abspath(jaxdp.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(env_extra or {})
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        proc = subprocess.run(
            [sys.executable, "-m", "jaxdp.bench", kind, job_path, out_path],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(
                f"benchmark subprocess ({kind}, {job.get('model')}, batch {job.get('batch')}) failed with exit "
                f"code {proc.returncode}:\n{proc.stderr[-3000:]}"
            )
        with open(out_path) as f:
            return json.load(f)


def _scale_out(model, batch, devices, steps, repeats, block_s, clipping_impl, seed, progress_bar) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        params = {}
        for n in devices:
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
            rows.append(_run_subprocess("scale", job, {"XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}))
            with np.load(job["params_path"]) as f:
                params[n] = [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]
            progress_bar.update(1)
        base = params.get(1)
        for r in rows:
            r.update(model=model, batch=batch, steps=steps)
            if base is None:
                r["max_abs_param_diff_vs_1"] = math.nan
            else:
                p = params[r["devices"]]
                r["max_abs_param_diff_vs_1"] = max(float(np.max(np.abs(a - b))) for a, b in zip(p, base, strict=True))
            r["ex_per_s_over_1_device"] = r["ex_per_s"] / rows[0]["ex_per_s"] if rows[0]["devices"] == 1 else math.nan
    return rows


# --------------------------------------------------------------------------- the suite
def run_bench(
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    batch_sizes: Sequence[int] | None = None,
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
      models: names in :data:`MODELS` (default: mnist_cnn, wrn16_4, transformer).
      batch_sizes: the same batch sizes for every model; default each model's quick
        (or ``full``) batches.
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
      ``{"header", "rows", "scale", "files"}``.

    Raises:
      BenchError: a bad option, naming it and the fix.
    """
    models = list(models)
    if not models:
        raise BenchError(f"--models is empty; choose from {', '.join(MODELS)}.")
    devices = list(devices)
    batch_sizes = list(batch_sizes) if batch_sizes else None
    _check_options(models, batch_sizes, epsilons, delta, accountant, clipping_impl, devices, epochs)
    impls = list(clipping_impl) if isinstance(clipping_impl, list | tuple) else [clipping_impl]
    scale_model = scale_model or models[0]
    if scale_model not in MODELS:
        raise BenchError(f"--scale-model {scale_model!r} is not a benchmarked model; choose from {', '.join(MODELS)}.")
    repeats = repeats or (9 if full else 5)
    block_s = 1.0 if full else 0.3
    grid = []
    for m in models:
        spec = MODELS[m]
        for b in batch_sizes or (spec.full_batches if full else spec.quick_batches):
            e = epochs if epochs is not None else (spec.full_epochs if full else spec.quick_epochs)
            grid.append((m, b, e))
    scale_batch = max(b for m, b, _ in grid if m == scale_model) if scale_model in models else grid[0][1]
    if devices and scale_batch % math.lcm(*devices):
        raise BenchError(
            f"the scale-out table splits a global batch of {scale_batch} over --devices {devices}, which does not "
            f"divide evenly; use a batch size divisible by {math.lcm(*devices)}."
        )

    import jax
    from tqdm.auto import tqdm

    header = (
        f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{len(jax.devices())} device(s); {platform.machine()}, {os.cpu_count()} CPU cores; "
        f"delta={delta:g}, accountant={accountant}, clipping_impl={' / '.join(impls)}, C=1"
    )
    t_start = time.perf_counter()
    rows = []
    with tqdm(
        total=len(grid) + len(devices),
        desc="jaxdp bench",
        unit="config",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        for m, b, e in grid:
            spec = MODELS[m]
            bar.set_postfix(model=m, batch=b)
            n_train = len(spec.data().x_train)
            if b > n_train:
                raise BenchError(f"--batch-sizes {b} is larger than {m}'s training set ({n_train}); use <= {n_train}.")
            if delta > 1.0 / n_train:
                raise BenchError(f"--delta {delta:g} exceeds 1/N = 1/{n_train} for {m}; choose a smaller delta.")
            cal = calibrate(epsilons, delta, n_train, b, e, accountant)
            job = {
                "model": m,
                "batch": b,
                "repeats": repeats,
                "block_s": block_s,
                "epochs": e,
                "sigmas": cal,
                "clipping_impls": impls,
                "delta": delta,
                "accountant": accountant,
                "seed": seed,
            }
            t0 = time.perf_counter()
            row = _run_subprocess("config", job) if isolate else measure_config(job)
            row["wall_s"] = time.perf_counter() - t0
            row["calibration"] = cal
            row["sampling_rate"] = b / n_train
            row["isolated_process"] = isolate
            rows.append(row)
            bar.update(1)
        bar.set_postfix(model=scale_model, stage="devices")
        scale = (
            _scale_out(scale_model, scale_batch, devices, scale_steps, repeats, block_s, impls[0], seed, bar)
            if devices
            else []
        )
    elapsed = time.perf_counter() - t_start
    files = _write_outputs(out_dir, header, rows, scale, elapsed)
    print(render_markdown(header, rows, scale, elapsed))
    print("\nwrote " + ", ".join(files.values()))
    return {"header": header, "rows": rows, "scale": scale, "files": files, "elapsed_s": elapsed}


# --------------------------------------------------------------------------- outputs
def flat_rows(rows: list[dict]) -> list[dict]:
    """One record per (model, batch, clipping implementation, ε): throughput repeated (it does not depend on ε),
    accuracy per ε (trained with the first implementation: the clipped sum is the same)."""
    out = []
    for r in rows:
        acc_by_eps = {a["epsilon_target"]: a["test_accuracy"] for a in r["accuracy"]}
        for p, cal in ((p, cal) for p in r["private"] for cal in r["calibration"]):
            rec = {
                k: r[k]
                for k in (
                    "model",
                    "data",
                    "params",
                    "batch",
                    "clipping_impl",
                    "sampling_rate",
                    "epochs",
                    "compile_s_nonprivate",
                    "compile_s_private",
                    "nonprivate_ex_per_s",
                    "private_ex_per_s",
                    "private_over_nonprivate",
                    "xla_mb_nonprivate",
                    "xla_mb_private",
                    "peak_kind",
                    "peak_mb_after_nonprivate",
                    "peak_mb_after_private",
                )
            }
            rec.update(
                clipping_impl=p["clipping_impl"],
                clipping_path=p["path"],
                compile_s_private=p["compile_s"],
                private_ex_per_s=p["ex_per_s"],
                private_over_nonprivate=p["over_nonprivate"],
                xla_mb_private=p["xla_mb"],
                peak_mb_after_private=p["peak_mb_after"],
                accuracy_trained_with=r["clipping_impl"],
            )
            rec.update(cal)
            rec["test_accuracy"] = acc_by_eps.get(cal["epsilon_target"], math.nan)
            rec["test_accuracy_nonprivate"] = r.get("accuracy_nonprivate", math.nan)
            for name, ref in r["references"].items():
                rec[f"jaxdp/{name}"] = ref.get("jaxdp_over_ref", math.nan)
            out.append(rec)
    return out


def _fmt(v, spec=",.0f"):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render_markdown(header: str, rows: list[dict], scale: list[dict], elapsed: float | None = None) -> str:
    ref_names = sorted({name for r in rows for name in r["references"]})
    lines = [f"jaxdp bench: {header}", ""]
    lines.append(
        "Throughput (measured once per model and batch: sigma only scales the noise added once per step, so it "
        "does not depend on epsilon). The clipping implementations of a model are timed side by side with its "
        "non-private step in one process; 'auto (ghost)' means auto took the ghost path. Reference ratios are "
        "jaxdp's first implementation over the reference."
    )
    lines.append("")
    cols = [
        "model",
        "params",
        "batch",
        "clipping_impl",
        "compile s (np / p)",
        "non-private ex/s",
        "private ex/s",
        "private / non-private",
        "XLA step MB (np / p)",
        "peak MB after np / p",
        *[f"jaxdp/{n}" for n in ref_names],
    ]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        refs = []
        for n in ref_names:
            ref = r["references"].get(n, {})
            refs.append(_fmt(ref.get("jaxdp_over_ref"), ".2f") if "error" not in ref else "n/a")
        for i, p in enumerate(r["private"]):
            impl = p["clipping_impl"] + (f" ({p['path']})" if p["clipping_impl"] == "auto" else "")
            lines.append(
                f"| {r['model']} | {r['params']:,} | {r['batch']} | {impl} "
                f"| {r['compile_s_nonprivate']:.1f} / {p['compile_s']:.1f} "
                f"| {_fmt(r['nonprivate_ex_per_s'])} | {_fmt(p['ex_per_s'])} "
                f"| {p['over_nonprivate']:.2f} "
                f"| {_fmt(r['xla_mb_nonprivate'], ',.1f')} / {_fmt(p['xla_mb'], ',.1f')} "
                f"| {_fmt(r['peak_mb_after_nonprivate'])} / {_fmt(p['peak_mb_after'])} "
                + "".join(f"| {v if i == 0 else '–'} " for v in refs)
                + "|"
            )
    kinds = sorted({r["peak_kind"] for r in rows})
    lines.append("")
    lines.append(
        f"Memory: 'XLA step MB' is the compiled step's planned memory (arguments + outputs + temporaries); "
        f"'peak MB' is the process {' / '.join(kinds)} read after the non-private step ran, then after each private "
        "step ran, in the order listed (a process peak only grows, so each includes the ones before"
        + ("; each (model, batch) ran in a fresh process)." if all(r["isolated_process"] for r in rows) else ").")
    )
    lines += ["", "Accuracy after the fixed budget (test split)", ""]
    cols = ["model", "data", "batch", "q", "epochs", "eps target", "sigma", "eps spent", "test acc", "non-private acc"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        acc_by_eps = {a["epsilon_target"]: a["test_accuracy"] for a in r["accuracy"]}
        for cal in r["calibration"]:
            e = cal["epsilon_target"]
            acc = acc_by_eps.get(e)
            lines.append(
                f"| {r['model']} | {r['data']} | {r['batch']} | {r['sampling_rate']:.4f} | {r['epochs'] or '–'} "
                f"| {e:g} | {cal['sigma']:.3f} | {cal['epsilon_spent']:.3f} "
                f"| {_fmt(acc, '.3f') if acc is not None else 'not run'} "
                f"| {_fmt(r.get('accuracy_nonprivate'), '.3f') if 'accuracy_nonprivate' in r else 'not run'} |"
            )
    if scale:
        s0 = scale[0]
        lines += [
            "",
            f"Scale-out: private step of {s0['model']}, global batch {s0['batch']}, forced CPU devices "
            f"(--xla_force_host_platform_device_count, one subprocess per count; they share this machine's "
            f"{os.cpu_count()} cores; each step waited for before the next), same seed; param difference to 1 device "
            f"after {s0['steps']} steps",
            "",
            "| devices | ex/s | vs 1 device | max abs param diff vs 1 device |",
            "|---|---|---|---|",
        ]
        for s in scale:
            lines.append(
                f"| {s['devices']} | {_fmt(s['ex_per_s'])} | {_fmt(s['ex_per_s_over_1_device'], '.2f')} "
                f"| {_fmt(s['max_abs_param_diff_vs_1'], '.2e')} |"
            )
    if elapsed is not None:
        lines += ["", f"took {elapsed:.0f} s"]
    return "\n".join(lines)


def _write_outputs(out_dir: str, header: str, rows: list[dict], scale: list[dict], elapsed: float) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "csv": os.path.join(out_dir, "bench.csv"),
        "json": os.path.join(out_dir, "bench.json"),
        "md": os.path.join(out_dir, "bench.md"),
        "png": os.path.join(out_dir, "bench.png"),
    }
    flat = flat_rows(rows)
    fields = list(dict.fromkeys(k for rec in flat for k in rec))
    with open(files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)
    if scale:
        files["devices_csv"] = os.path.join(out_dir, "bench_devices.csv")
        with open(files["devices_csv"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(scale[0]))
            w.writeheader()
            w.writerows(scale)
    with open(files["json"], "w") as f:
        json.dump(
            _finite_or_none(
                {
                    "header": header,
                    "note": "throughput does not depend on epsilon (sigma only scales the noise); measured once per "
                    "(model, batch). Noise seed fixed: a benchmark, not a private release.",
                    "rows": rows,
                    "scale": scale,
                    "elapsed_s": elapsed,
                }
            ),
            f,
            indent=2,
            allow_nan=False,
        )
    with open(files["md"], "w") as f:
        f.write(render_markdown(header, rows, scale, elapsed) + "\n")
    _plot(files["png"], rows)
    return files


def _finite_or_none(obj):
    """NaN/inf become null, so the JSON is standard (``allow_nan=False``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj


def _plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        eps = [c["epsilon_target"] for c in r["calibration"]]
        label = f"{r['model']} B={r['batch']}"
        for j, p in enumerate(r["private"]):
            ax_t.plot(
                eps,
                [p["ex_per_s"]] * len(eps),
                ["o-", "s-.", "^:"][j % 3],
                color=color,
                label=f"{label} private ({p['clipping_impl']})",
            )
        ax_t.plot(eps, [r["nonprivate_ex_per_s"]] * len(eps), "--", color=color, label=f"{label} non-private")
        if r["accuracy"]:
            ax_a.plot(
                [a["epsilon_target"] for a in r["accuracy"]],
                [a["test_accuracy"] for a in r["accuracy"]],
                "o-",
                color=color,
                label=label,
            )
            if "accuracy_nonprivate" in r:
                ax_a.axhline(r["accuracy_nonprivate"], color=color, ls=":", lw=1)
    ticks = sorted({c["epsilon_target"] for r in rows for c in r["calibration"]})
    for ax in (ax_t, ax_a):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("target epsilon")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("examples / s")
    ax_t.set_title("throughput (independent of epsilon)")
    ax_a.set_ylabel("test accuracy")
    ax_a.set_title("accuracy after the fixed budget (dotted: no noise)")
    ax_t.legend(fontsize=7)
    if any(r["accuracy"] for r in rows):
        ax_a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _worker_main(argv: list[str]) -> int:
    kind, job_path, out_path = argv
    with open(job_path) as f:
        job = json.load(f)
    result = measure_config(job) if kind == "config" else scale_worker(job)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":  # the per-configuration subprocess: python -m jaxdp.bench {config|scale} JOB OUT
    sys.exit(_worker_main(sys.argv[1:]))
