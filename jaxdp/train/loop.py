"""``jaxdp train``: the loop around :func:`jaxdp.run_private_step`, host-side bookkeeping only.

The data path of one step (the jitted pieces are in :mod:`jaxdp.step`)::

    PoissonSampler.draw -> fixed-shape chunks + masks -> shard over "data"
      -> clipped_grad (vmap of grad, clip, mask, sum) -> + N(0, (σC)^2) once
      -> / expected batch size -> optax update -> accountant.step()

:func:`train` is setup (:func:`jaxdp.train.setup.setup_run`), an optional resume,
one :func:`_run_epoch` per epoch (steps, then the epoch's record, checks and
checkpoint), and the summary.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxdp import accounting, distributed
from jaxdp.clipping import ExampleGradFn, gradient_norm_stats
from jaxdp.config import ConfigError
from jaxdp.data.prefetch import prefetch
from jaxdp.step import run_private_step
from jaxdp.train.callbacks import ParameterEMA, TrainCallback
from jaxdp.train.checkpoint import Checkpointer
from jaxdp.train.evaluation import evaluate
from jaxdp.train.guards import (
    check_finite,
    check_resumed_steps,
    check_same_checkpoint_everywhere,
    save_or_explain,
)
from jaxdp.train.setup import Run, clipping_impl, initialize_distributed, setup_run

__all__ = ["train"]


def _tensorboard_writer(logdir: str):
    """A TensorBoard writer when ``tensorboardX`` is installed (the ``dev``/``tensorboard`` extras), else None."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir)


def _draw_chunks(config, dataset, step_index: int, chunks) -> list[tuple]:
    """The host arrays of one draw's chunks: ``(x, y, mask)`` and, with augmentation, per-example keys."""
    out = []
    for i, (idx, mask) in enumerate(chunks):
        host = [dataset.x_train[idx], dataset.y_train[idx], mask]
        if config.augment.multiplicity:
            # Public augmentation randomness (privacy holds for any augmentation).
            aug_rng = np.random.default_rng([config.seed, 7, step_index, i])
            host.append(aug_rng.integers(0, 2**32, (len(idx), 2), dtype=np.uint32))
        out.append(tuple(host))
    return out


class _Loop:
    """The mutable state of one :func:`train` call between epochs."""

    def __init__(self, config, run: Run, callbacks, checkpointer):
        self.config, self.run, self.callbacks, self.checkpointer = config, run, list(callbacks), checkpointer
        self.state = run.state
        self.history: list[dict] = []
        self.start_epoch = 1
        plan = run.plan
        # The accountant is stepped once per noisy step, on the host, in the loop
        # that issues the steps: what it reports is what was run.
        self.accountant = plan.make_accountant() if plan.noise_multiplier > 0 else None
        self.num_epochs = -(-plan.num_steps // run.steps_per_epoch)
        self.step_count = 0
        self.steady_examples, self.steady_time = 0.0, 0.0
        logits_fn = jax.jit(lambda p, x: nnx.merge(run.graphdef, p, run.rest)(x))
        self.logits_fn = logits_fn
        self.predict = lambda p, x: jnp.argmax(logits_fn(p, x), axis=-1)
        self.stateful: dict = {}

    def start(self) -> None:
        """The callbacks' ``on_start``; then those with state (EMA, posterior samples) are checkpointed with the
        run (a callback may only know its state's shape once it has seen the data)."""
        for cb in self.callbacks:
            cb.on_start(predict_logits=self.logits_fn, dataset=self.run.dataset, plan=self.run.plan)
        params = self.run.state.params
        self.stateful = {str(i): cb for i, cb in enumerate(self.callbacks) if cb.state_template(params)}

    def resume(self, resume_from: int) -> None:
        """Continue from checkpoint ``resume_from``: state, callbacks, history and the accountant."""
        run = self.run
        template = {
            "train": run.state,
            "callbacks": {k: cb.state_template(run.state.params) for k, cb in self.stateful.items()},
        }
        restored, meta = self.checkpointer.restore(resume_from, template)
        self.state = distributed.replicate(run.mesh, restored["train"])
        for k, cb in self.stateful.items():
            cb.load_state_dict(restored["callbacks"][k])
        self.history = meta["history"]
        self.start_epoch = meta["epoch"] + 1
        print(f"jaxdp: resumed from epoch {meta['epoch']} ({self.checkpointer.directory}/{resume_from})", flush=True)
        self.step_count = min((self.start_epoch - 1) * run.steps_per_epoch, run.plan.num_steps)
        if self.accountant is not None:
            self.accountant.load_state_dict(meta["accountant"])
        check_resumed_steps(int(jax.device_get(self.state.step)), self.accountant, self.step_count, resume_from)

    def run_epoch(self, epoch: int, bar) -> dict:
        """The epoch's noisy steps, then its record (checked finite before anything is logged or saved)."""
        run, config = self.run, self.config
        first = (epoch - 1) * run.steps_per_epoch
        last_step = min(first + run.steps_per_epoch, run.plan.num_steps)
        t0 = time.perf_counter()
        epoch_metrics = []
        # The next draws are gathered (from memory or the array_record files) by a thread while a step runs.
        draws = (
            _draw_chunks(config, run.dataset, step_index, chunks)
            for step_index, chunks in run.sampler.steps(first, last_step)
        )
        for host_chunks in prefetch(draws, config.get("data_prefetch", 0)):
            self.state, metrics = run_private_step(run.step, self.state, host_chunks, accountant=self.accountant)
            epoch_metrics.append(metrics)
            self.step_count += 1
            for cb in self.callbacks:
                cb.on_step(self.step_count, self.state.params)
            bar.update(1)
        epoch_metrics = jax.device_get(epoch_metrics)  # waits for the epoch's steps
        elapsed = time.perf_counter() - t0
        norms = np.concatenate([np.atleast_1d(m.pop("norms")) for m in epoch_metrics])
        totals = {k: float(sum(m[k] for m in epoch_metrics)) for k in epoch_metrics[0]}
        # Before anything is logged or saved: NaN parameters never reach a checkpoint.
        check_finite(epoch, first, last_step, self.state.params, totals, config, self.checkpointer)
        if epoch > 1 or self.num_epochs == 1:
            self.steady_examples += totals["examples"]
            self.steady_time += elapsed
        return self._record(epoch, last_step, totals, norms, elapsed)

    def _record(self, epoch, last_step, totals, norms, elapsed) -> dict:
        plan, dataset = self.run.plan, self.run.dataset
        delta = self.config.privacy.delta
        grad_stats = gradient_norm_stats(norms, np.isfinite(norms), l2_clip_norm=plan.l2_clip_norm)
        if plan.per_layer:  # max(0, ||g|| - C) bounds the bias of whole-gradient clipping only
            del grad_stats["clip_bias_bound"]
        examples = max(totals["examples"], 1.0)
        return {
            "epoch": epoch,
            "step": last_step,
            "loss": totals["loss_sum"] / examples,
            "train_accuracy": evaluate(self.predict, self.state.params, dataset.x_train, dataset.y_train),
            "test_accuracy": evaluate(self.predict, self.state.params, dataset.x_test, dataset.y_test),
            "epsilon": self.accountant.epsilon(delta) if self.accountant is not None else math.inf,
            "delta": delta,
            "examples_per_sec": totals["examples"] / elapsed,
            "fraction_clipped": totals["clipped"] / examples,
            "nonfinite_dropped": int(totals["nonfinite"]),
            **{k: float(v) for k, v in grad_stats.items() if k not in ("examples", "fraction_clipped")},
        }

    def checkpoint(self, epoch: int) -> None:
        every = self.config.checkpoint.every_epochs
        if epoch == self.num_epochs or (every and epoch % every == 0):
            save_or_explain(
                self.checkpointer,
                epoch,
                {"train": self.state, "callbacks": {k: cb.state_dict() for k, cb in self.stateful.items()}},
                {
                    "epoch": epoch,
                    "history": self.history,
                    "accountant": self.accountant.state_dict() if self.accountant is not None else None,
                    "secret_seed": self.run.secret_seed,
                },
            )


def _header(config, run: Run) -> str:
    plan = run.plan
    return (
        f"jaxdp: {config.dataset} N={len(run.dataset.x_train)} model={config.model.name} "
        + (f"validation={len(run.dataset.y_test)} held out of train " if run.dataset.eval_split != "test" else "")
        + f"devices={run.mesh.devices.size} | q={plan.sampling_rate:.4f} steps={plan.num_steps} "
        f"sigma={plan.noise_multiplier:.4f} C={plan.l2_clip_norm} delta={config.privacy.delta:g} -> "
        f"epsilon={plan.epsilon(config.privacy.delta):.3f} at the end "
        f"| physical batch {run.sampler.physical_batch_size} | clipping {clipping_impl(config)}"
        + (f" | BandMF: {plan.bands} bands, cyclic Poisson (q per group)" if plan.bands > 1 else "")
    )


def _attack_risk(accountant, delta: float) -> dict:
    if accountant is None:
        return {}
    r = accounting.attack_risk(accountant, delta=delta)
    return {
        "mu_clt": r.mu_clt,
        "advantage": r.advantage,
        "tpr_at_fpr_0.01": r.tpr_at_fpr[0.01],
        "tpr_at_fpr_0.001": r.tpr_at_fpr[0.001],
    }


def _summary(config, loop: _Loop, extra: dict, wall_time_s: float) -> dict:
    plan, history = loop.run.plan, loop.history
    last = history[-1]
    delta = config.privacy.delta
    return {
        "dataset": config.dataset,
        "model": config.model.name,
        "test_accuracy": last["test_accuracy"],
        # "validation" when config.validation_size held out part of the training set: test_accuracy is then the
        # accuracy on that held-out part, and the test set was not read.
        "evaluated_on": loop.run.dataset.eval_split,
        "train_accuracy": last["train_accuracy"],
        "epsilon": last["epsilon"],
        "delta": delta,
        "target_epsilon": config.privacy.target_epsilon,
        "accountant": plan.accountant,
        "mechanism": plan.mechanism,
        "clipping_impl": clipping_impl(config),
        "bands": plan.bands,
        "noise_multiplier": plan.noise_multiplier,
        "l2_clip_norm": plan.l2_clip_norm,
        "steps": plan.num_steps,
        "planned_steps": config.epochs * loop.run.steps_per_epoch,
        "attack_risk": _attack_risk(loop.accountant, delta),
        # Computed on the private training data without noise: not covered by epsilon, do not publish.
        "not_covered_by_epsilon": ["loss", "train_accuracy", "fraction_clipped", "nonfinite_dropped"]
        + [k for k in last if k.startswith(("grad_norm_", "clip_bias_bound"))],
        "examples_per_sec": loop.steady_examples / loop.steady_time if loop.steady_time else last["examples_per_sec"],
        "nonfinite_dropped": sum(r["nonfinite_dropped"] for r in history),
        "devices": loop.run.mesh.devices.size,
        "wall_time_s": wall_time_s,
        "workdir": config.workdir,
        **extra,
    }


def train(
    config: ml_collections.ConfigDict,
    *,
    progress: bool = True,
    callbacks: Sequence[TrainCallback] = (),
    resume: bool = False,
    example_grad: ExampleGradFn | None = None,
    perturb: Callable[[Any, Any], Any] | None = None,
) -> dict:
    """Run private training from a config; returns (and prints) the summary.

    Writes ``metrics.jsonl`` (one line per epoch), ``summary.json`` and orbax
    checkpoints (:mod:`jaxdp.train.checkpoint`) under ``config.workdir``. With
    ``resume=True`` it continues from the latest checkpoint there and ends with
    exactly the parameters and ε of an uninterrupted run. ``callbacks``
    (:class:`jaxdp.train.TrainCallback`) observe the run. ``example_grad`` and
    ``perturb`` change how each step's gradients are formed without changing the
    privacy plan (see :func:`jaxdp.make_private_step`; ``experiments/bam`` uses them).

    Each epoch's record also has clipping diagnostics of the per-example
    gradients that were clipped (:func:`jaxdp.gradient_norm_stats`): their mean
    and 10/50/90% quantiles and, for whole-gradient clipping, the bias bound
    ``mean max(0, ||g_i|| - C)``, pooled over the epoch's examples. Like the
    loss, they are computed without noise and are not covered by ε.

    Raises:
      ConfigError: a bad value, before the first step.
      TrainingError: the run diverged (NaN/inf parameters or loss; nothing of that
        epoch is saved), a checkpoint could not be written (e.g. a full disk), or
        a checkpoint to resume from counts fewer steps than its parameters took.
        The message names the epoch, the last good checkpoint and the fix.
    """
    # Before anything touches a JAX backend (orbax's manager asks for the process index).
    initialize_distributed(config)
    if config.ema_decay:
        callbacks = [*callbacks, ParameterEMA(config.ema_decay)]

    checkpointer = Checkpointer(os.path.join(config.workdir, "checkpoints"), keep=config.checkpoint.keep)
    resume_from = checkpointer.latest() if resume else None
    if resume and jax.process_count() > 1:
        check_same_checkpoint_everywhere(resume_from, checkpointer.directory)
    if resume and resume_from is None:
        print(f"jaxdp: no checkpoint under {checkpointer.directory}; starting from the beginning.", flush=True)
    saved_meta = checkpointer.meta(resume_from) if resume_from is not None else None
    try:
        run = setup_run(
            config,
            secret_seed=saved_meta["secret_seed"] if saved_meta else None,
            example_grad=example_grad,
            perturb=perturb,
        )
    except ConfigError:
        raise
    except ValueError as e:  # a bad value caught by the plan, model, sampler or dataset
        raise ConfigError(str(e)) from e

    workdir = config.workdir
    os.makedirs(workdir, exist_ok=True)
    # Multi-host: every process runs the same loop, process 0 alone writes the logs (orbax
    # coordinates the checkpoints itself); the others would race it on a shared workdir.
    primary = jax.process_index() == 0
    metrics_path = os.path.join(workdir, "metrics.jsonl") if primary else os.devnull
    print(_header(config, run), flush=True)
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    loop = _Loop(config, run, callbacks, checkpointer)
    loop.start()
    bar = tqdm(
        total=run.plan.num_steps,
        desc="private training",
        unit="step",
        disable=not (progress and sys.stderr.isatty()),  # a bar only where one can be drawn
        file=sys.stderr,
        dynamic_ncols=True,
    )
    if resume_from is not None:
        loop.resume(resume_from)
        bar.update(loop.step_count)
    tb = _tensorboard_writer(os.path.join(workdir, "tensorboard")) if primary else None
    with open(metrics_path, "w") as log, bar:
        for record in loop.history:  # a resumed run rewrites the epochs it already has
            log.write(json.dumps(record) + "\n")
        for epoch in range(loop.start_epoch, loop.num_epochs + 1):
            record = loop.run_epoch(epoch, bar)
            loop.history.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if tb is not None:
                for key, value in record.items():
                    if key not in ("epoch", "step", "delta") and math.isfinite(value):
                        tb.add_scalar(key, value, record["step"])
                tb.flush()
            loop.checkpoint(epoch)
            bar.set_postfix(epoch=epoch, eps=f"{record['epsilon']:.3f}", test_acc=f"{record['test_accuracy']:.3f}")
            if progress:
                tqdm.write(
                    f"epoch {epoch:3d} | loss {record['loss']:.4f} | train acc {record['train_accuracy']:.4f} "
                    f"| {'val' if loop.run.dataset.eval_split == 'validation' else 'test'} acc {record['test_accuracy']:.4f} | eps {record['epsilon']:.3f} "
                    f"| {record['examples_per_sec']:,.0f} ex/s",
                    file=sys.stdout,
                )
    planned_steps = config.epochs * run.steps_per_epoch
    if run.plan.num_steps < planned_steps:
        print(
            f"jaxdp: stopped after {run.plan.num_steps} of {planned_steps} planned steps: one more step would spend "
            f"more than privacy.target_epsilon={config.privacy.target_epsilon}.",
            flush=True,
        )
    extra = {}
    for cb in loop.callbacks:
        extra.update(cb.on_end(loop.state.params, workdir))
    summary = _summary(config, loop, extra, time.perf_counter() - t_start)
    checkpointer.close()
    if tb is not None:
        tb.close()
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary), flush=True)
    return summary
