"""The private training loop: wires plan, sampler, model, optimizer and mesh together.

The data path of one step::

    PoissonSampler.draw -> fixed-shape chunks + masks -> shard over "data"
      -> clipped_grad (vmap of grad, clip, mask, sum) -> + N(0, (σC)^2) once
      -> / expected batch size -> optax update

Jitted pieces are built by :func:`make_private_step` (usable on its own); the
loop (:func:`train`) only does host-side bookkeeping around them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxdp import data as data_lib
from jaxdp import distributed
from jaxdp.config import ConfigError
from jaxdp.models import check_dp_compatible, make_model
from jaxdp.plan import PrivacyPlan

__all__ = [
    "TrainState",
    "classification_loss",
    "make_optimizer",
    "make_nonprivate_step",
    "make_private_step",
    "train",
    "validate_config",
]


class TrainState(NamedTuple):
    """Everything a step updates: parameters, optimizer state (noise key inside), step."""

    params: Any
    opt_state: Any
    step: jax.Array


def classification_loss(graphdef: nnx.GraphDef, rest: Any) -> Callable[..., jax.Array]:
    """``loss(params, x, y)``: mean softmax cross-entropy of an NNX model's logits."""

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.0) -> optax.GradientTransformation:
    """The (public, non-private) optimizer chained after the privatizer."""
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ConfigError(f"optimizer.name={name!r} is not known; choose 'sgd' or 'adam'.")


def make_private_step(
    plan: PrivacyPlan,
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    noise_key: jax.Array | int,
    microbatch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """Build the jitted pieces of a DP-SGD step from a plan.

    Returns:
      ``(tx, step, accumulate)`` where ``tx = chain(plan.privatizer(key), optimizer)``;
      ``step(state, acc, x, y, mask) -> (state, metrics)`` adds the clipped sum of
      this chunk to ``acc`` (``None`` for a one-chunk draw), adds the noise once
      and updates; ``accumulate(params, acc, x, y, mask) -> (acc, metrics)`` is
      for the earlier chunks of a draw that spilled over one chunk. With a
      ``mesh``, each device clips its own shard of the batch and the sums are
      reduced across devices (:func:`jaxdp.distributed.data_parallel`).
    """
    grad_fn = plan.clipped_grad(loss_fn, microbatch_size=microbatch_size)
    if mesh is not None:
        grad_fn = distributed.data_parallel(grad_fn, mesh)
    tx = optax.chain(plan.privatizer(noise_key), optimizer)

    def chunk(params, acc, x, y, mask):
        g, aux = grad_fn(params, x, y, example_mask=mask)
        if acc is not None:
            g = jax.tree_util.tree_map(jnp.add, acc, g)
        metrics = {
            "loss_sum": jnp.sum(jnp.where(mask > 0, aux.loss, 0.0)),
            "examples": jnp.sum(mask),
            "clipped": aux.num_clipped,
            "nonfinite": aux.num_nonfinite,
        }
        return g, metrics

    @jax.jit
    def accumulate(params, acc, x, y, mask):
        return chunk(params, acc, x, y, mask)

    @jax.jit
    def step(state, acc, x, y, mask):
        g, metrics = chunk(state.params, acc, x, y, mask)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), metrics

    return tx, step, accumulate


def make_nonprivate_step(loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation):
    """The same model's ordinary jitted step (for throughput comparisons)."""

    @jax.jit
    def step(state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(state.params, x, y)
        updates, opt_state = optimizer.update(g, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), loss

    return step


def validate_config(config: ml_collections.ConfigDict, dataset_size: int | None = None) -> None:
    """Check values the plan does not (it checks the privacy ones); raise ConfigError naming the key."""

    def need(cond, key, value, expected):
        if not cond:
            raise ConfigError(f"{key}={value!r} is invalid: {expected}.")

    need(isinstance(config.epochs, int) and config.epochs >= 1, "epochs", config.epochs, "need an int >= 1")
    need(
        isinstance(config.batch_size, int) and config.batch_size >= 1,
        "batch_size",
        config.batch_size,
        "need a positive int (expected batch size)",
    )
    if dataset_size is not None and config.batch_size > dataset_size:
        raise ConfigError(
            f"batch_size={config.batch_size} is larger than the training set ({dataset_size} examples); "
            f"choose batch_size <= {dataset_size}."
        )
    clip = config.privacy.l2_clip_norm
    need(
        isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0,
        "privacy.l2_clip_norm",
        clip,
        "the clipping bound C must be a finite number > 0 (e.g. 1.0)",
    )
    sigma = config.privacy.noise_multiplier
    need(
        isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0,
        "privacy.noise_multiplier",
        sigma,
        "sigma must be a finite number >= 0",
    )
    delta = config.privacy.delta
    need(isinstance(delta, float) and 0 < delta < 1, "privacy.delta", delta, "delta must lie in (0, 1)")
    lr = config.optimizer.learning_rate
    need(isinstance(lr, (int, float)) and lr > 0, "optimizer.learning_rate", lr, "need a number > 0")
    mb = config.microbatch_size
    need(isinstance(mb, int) and mb >= 0, "microbatch_size", mb, "need an int >= 0 (0 = no microbatching)")
    pb = config.physical_batch_size
    need(isinstance(pb, int) and pb >= 0, "physical_batch_size", pb, "need an int >= 0 (0 = automatic)")


def _evaluate(predict, params, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> float:
    correct = 0
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        n = len(xb)
        if n < batch and len(x) > batch:  # keep one shape: pad the last batch
            xb = np.concatenate([xb, np.zeros((batch - n,) + xb.shape[1:], xb.dtype)])
        pred = np.asarray(predict(params, xb))[:n]
        correct += int(np.sum(pred == y[start : start + n]))
    return correct / len(x)


class _Run(NamedTuple):
    dataset: Any
    plan: PrivacyPlan
    steps_per_epoch: int
    graphdef: Any
    rest: Any
    mesh: Any
    sampler: Any
    state: TrainState
    step_fn: Any
    accumulate_fn: Any


def _setup(config: ml_collections.ConfigDict) -> _Run:
    """Everything before the first step. Bad values surface here as ConfigError."""
    distributed.initialize(
        config.distributed.coordinator_address, config.distributed.num_processes, config.distributed.process_id
    )
    dataset = data_lib.load(config.dataset)
    n_train = len(dataset.x_train)
    validate_config(config, n_train)
    steps_per_epoch = max(1, round(n_train / config.batch_size))
    num_steps = config.epochs * steps_per_epoch
    plan = PrivacyPlan(
        dataset_size=n_train,
        batch_size=config.batch_size,
        l2_clip_norm=float(config.privacy.l2_clip_norm),
        noise_multiplier=float(config.privacy.noise_multiplier),
        num_steps=num_steps,
        per_layer=bool(config.privacy.per_layer),
    )
    delta = config.privacy.delta
    if delta > 1.0 / n_train:
        print(
            f"warning: privacy.delta={delta} is larger than 1/N = 1/{n_train}; such a delta allows "
            "leaking a few examples outright. Use delta well below 1/N.",
            file=sys.stderr,
        )

    model = make_model(
        config.model.name,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        seed=config.seed,
        **config.model.kwargs.to_dict(),
    )
    check_dp_compatible(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = classification_loss(graphdef, rest)
    optimizer = make_optimizer(config.optimizer.name, config.optimizer.learning_rate, config.optimizer.momentum)
    mesh = distributed.make_mesh()
    tx, step_fn, accumulate_fn = make_private_step(
        plan,
        loss_fn,
        optimizer,
        noise_key=jax.random.key(config.seed + 1),
        microbatch_size=config.microbatch_size or None,
        mesh=mesh,
    )
    n_dev = mesh.devices.size
    sampler = plan.sampler(
        seed=config.seed + 2, physical_batch_size=config.physical_batch_size or None, multiple_of=n_dev
    )
    state = distributed.replicate(mesh, TrainState(params, tx.init(params), jnp.zeros((), jnp.int32)))

    return _Run(dataset, plan, steps_per_epoch, graphdef, rest, mesh, sampler, state, step_fn, accumulate_fn)


def train(config: ml_collections.ConfigDict, *, progress: bool = True) -> dict:
    """Run private training from a config; returns (and prints) the summary.

    Writes ``metrics.jsonl`` (one line per epoch) and ``summary.json`` under
    ``config.workdir``.
    """
    try:
        run = _setup(config)
    except ConfigError:
        raise
    except ValueError as e:  # a bad value caught by the plan, model, sampler or dataset
        raise ConfigError(str(e)) from e
    dataset, plan, steps_per_epoch = run.dataset, run.plan, run.steps_per_epoch
    graphdef, rest, mesh, sampler, state = run.graphdef, run.rest, run.mesh, run.sampler, run.state
    step_fn, accumulate_fn = run.step_fn, run.accumulate_fn
    n_train, n_dev = len(dataset.x_train), mesh.devices.size
    num_steps, delta = plan.num_steps, config.privacy.delta

    @jax.jit
    def predict(p, x):
        return jnp.argmax(nnx.merge(graphdef, p, rest)(x), axis=-1)

    workdir = config.workdir
    os.makedirs(workdir, exist_ok=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    print(
        f"jaxdp: {config.dataset} N={n_train} model={config.model.name} devices={n_dev} "
        f"| q={plan.sampling_rate:.4f} steps={num_steps} sigma={plan.noise_multiplier:.4f} "
        f"C={plan.l2_clip_norm} delta={delta:g} -> epsilon={plan.epsilon(delta):.3f} at the end "
        f"| physical batch {sampler.physical_batch_size}",
        flush=True,
    )
    from tqdm.auto import tqdm

    x_train, y_train = dataset.x_train, dataset.y_train
    t_start = time.perf_counter()
    steady_examples, steady_time = 0.0, 0.0
    history = []
    bar = tqdm(
        total=num_steps,
        desc="private training",
        unit="step",
        disable=not (progress and sys.stderr.isatty()),  # a bar only where one can be drawn
        file=sys.stderr,
        dynamic_ncols=True,
    )
    with open(metrics_path, "w") as log, bar:
        for epoch in range(1, config.epochs + 1):
            first = (epoch - 1) * steps_per_epoch
            t0 = time.perf_counter()
            epoch_metrics = []
            for _, chunks in sampler.steps(first, first + steps_per_epoch):
                acc = None
                for i, (idx, mask) in enumerate(chunks):
                    xb, yb, mb = distributed.shard_batch(mesh, (x_train[idx], y_train[idx], mask))
                    if i < len(chunks) - 1:
                        acc, m = accumulate_fn(state.params, acc, xb, yb, mb)
                    else:
                        state, m = step_fn(state, acc, xb, yb, mb)
                    epoch_metrics.append(m)
                bar.update(1)
            epoch_metrics = jax.device_get(epoch_metrics)  # waits for the epoch's steps
            elapsed = time.perf_counter() - t0
            totals = {k: float(sum(m[k] for m in epoch_metrics)) for k in epoch_metrics[0]}
            if epoch > 1 or config.epochs == 1:
                steady_examples += totals["examples"]
                steady_time += elapsed
            steps_done = epoch * steps_per_epoch
            record = {
                "epoch": epoch,
                "step": steps_done,
                "loss": totals["loss_sum"] / max(totals["examples"], 1.0),
                "train_accuracy": _evaluate(predict, state.params, x_train, y_train),
                "test_accuracy": _evaluate(predict, state.params, dataset.x_test, dataset.y_test),
                "epsilon": plan.epsilon(delta, steps_done),
                "delta": delta,
                "examples_per_sec": totals["examples"] / elapsed,
                "fraction_clipped": totals["clipped"] / max(totals["examples"], 1.0),
                "nonfinite_dropped": int(totals["nonfinite"]),
            }
            history.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(epoch=epoch, eps=f"{record['epsilon']:.3f}", test_acc=f"{record['test_accuracy']:.3f}")
            if progress:
                tqdm.write(
                    f"epoch {epoch:3d} | loss {record['loss']:.4f} | train acc {record['train_accuracy']:.4f} "
                    f"| test acc {record['test_accuracy']:.4f} | eps {record['epsilon']:.3f} "
                    f"| {record['examples_per_sec']:,.0f} ex/s",
                    file=sys.stdout,
                )
    last = history[-1]
    summary = {
        "dataset": config.dataset,
        "model": config.model.name,
        "test_accuracy": last["test_accuracy"],
        "train_accuracy": last["train_accuracy"],
        "epsilon": last["epsilon"],
        "delta": delta,
        "noise_multiplier": plan.noise_multiplier,
        "l2_clip_norm": plan.l2_clip_norm,
        "steps": num_steps,
        "examples_per_sec": steady_examples / steady_time if steady_time else last["examples_per_sec"],
        "nonfinite_dropped": sum(r["nonfinite_dropped"] for r in history),
        "devices": n_dev,
        "wall_time_s": time.perf_counter() - t_start,
        "workdir": workdir,
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary), flush=True)
    return summary
