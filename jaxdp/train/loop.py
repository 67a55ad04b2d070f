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
import re
import shutil
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

__all__ = ["RESUMABLE_KEYS", "RUN_FILES", "train"]


def _tensorboard_writer(logdir: str, purge_step: int | None = None):
    """A TensorBoard writer when ``tensorboardX`` is installed (the ``dev``/``tensorboard`` extras), else None.

    ``purge_step`` (a resumed run: the first step it trains): TensorBoard hides the events of the
    interrupted run at that step and after, which the resumed run logs again.
    """
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir, purge_step=purge_step)


# What a run writes under its workdir; --overwrite deletes exactly these (other files stay).
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard")

# Config keys a --resume may change: they do not change the privacy mechanism, the data, the model or the
# optimizer state. ``epochs`` only where sigma stays the same (a fixed privacy.noise_multiplier), and never below
# the checkpoint's epoch. Every other difference from the checkpoint's config is refused.
RESUMABLE_KEYS = (
    "epochs",
    "optimizer.learning_rate",
    "checkpoint.*",
    "workdir",
    "data_dir",
    "data_memory_mb",
    "data_prefetch",
    "physical_batch_size",
    "microbatch_size",
    "clipping_impl",
    "distributed.*",
)


def _committed_checkpoints(directory: str) -> list[int]:
    """Epochs of the checkpoints orbax committed under ``directory`` (an unfinished write has a suffix)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _held_run(workdir: str) -> list[str]:
    """What of a finished or interrupted run ``workdir`` holds: checkpoints, metrics rows, a summary.

    Leftovers that record nothing (an empty metrics.jsonl, tensorboard events of a run stopped in its first
    epoch, an unfinished checkpoint write) are not a run.
    """
    held = []
    ckpts = _committed_checkpoints(os.path.join(workdir, "checkpoints"))
    if ckpts:
        held.append(f"checkpoints of epochs {', '.join(map(str, ckpts))}")
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics):
        with open(metrics) as f:
            rows = sum(1 for line in f if line.strip())
        held.append(f"metrics.jsonl with {rows} epoch{'s' if rows != 1 else ''}")
    if os.path.exists(os.path.join(workdir, "summary.json")):
        held.append("summary.json")
    return held


# What jaxdp itself writes inside checkpoints/ (orbax: ``<epoch>`` and its unfinished ``<epoch>.orbax-...``)
# and tensorboard/ (tensorboardX's event files): --overwrite deletes those folders only when they hold nothing else.
_OWN_ENTRIES = {
    "checkpoints": re.compile(r"^\d+(\..*)?$"),
    "tensorboard": re.compile(r"^events\.out\.tfevents\."),
}


def _foreign_entries(workdir: str) -> list[str]:
    """Entries of checkpoints/ and tensorboard/ that jaxdp did not write (--overwrite refuses to delete them)."""
    foreign = []
    for name, own in _OWN_ENTRIES.items():
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            foreign += [os.path.join(path, e) for e in sorted(os.listdir(path)) if not own.match(e)]
    return foreign


def _clear_run(workdir: str) -> list[str]:
    """``--overwrite``: delete the previous run's files (:data:`RUN_FILES`) and nothing else; returns their names.

    Only a workdir that holds a run (:func:`_held_run`) is cleared, and the caller has checked
    :func:`_foreign_entries`: a folder of the user's that happens to be called ``checkpoints`` is never deleted.
    """
    if not _held_run(workdir):
        return []
    deleted = []
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        deleted.append(name)
    return deleted


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first (what a run would create)."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_if_empty(created: list[str]) -> None:
    """Remove the directories this run created (deepest first), each only if it is still empty."""
    for path in created:
        try:
            os.rmdir(path)  # fails on a directory with anything in it: never deletes a file
        except OSError:
            pass


def _flat_config(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_json(config: ml_collections.ConfigDict) -> dict:
    """The config as JSON values (tuples become lists), as saved in every checkpoint."""
    return json.loads(config.to_json_best_effort())


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def _check_resume_config(saved: dict | None, config: ml_collections.ConfigDict, meta: dict, where: str) -> None:
    """A resumed run keeps the checkpoint's config, but for :data:`RESUMABLE_KEYS`: else one line naming the keys."""
    if saved is None:  # a checkpoint written before configs were saved: the accountant check still applies
        return
    old, new = _flat_config(saved), _flat_config(_config_json(config))
    absent = "<absent>"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, absent) != new.get(k, absent)]
    refused = [k for k in changed if not _resumable(k)]
    fix = (
        "resume with the values the run was started with, or start afresh with --overwrite (deletes the run) "
        "or a new workdir=DIR"
    )
    if refused:
        diffs = ", ".join(f"{k} {old.get(k, absent)!r} -> {new.get(k, absent)!r}" for k in refused)
        raise ConfigError(
            f"--resume: the config differs from the one {where} was trained with: {diffs}. A resumed run may "
            f"change only {', '.join(RESUMABLE_KEYS)}; {fix}."
        )
    if "epochs" in changed:
        before, after = old["epochs"], new["epochs"]
        if after < meta["epoch"]:
            raise ConfigError(
                f"--resume: epochs {before!r} -> {after!r} is below the epoch of {where}; resume with "
                f"epochs >= {meta['epoch']}, or start afresh with --overwrite."
            )
        privacy = config.privacy
        if privacy.get("bands", 1) > 1:
            # BandMF's noise coefficients are optimised for the planned number of steps: a longer plan gives other
            # coefficients, and the steps across the switch would have sensitivity above C (columns of norm > 1).
            raise ConfigError(
                f"--resume: epochs {before!r} -> {after!r} would change the BandMF noise coefficients "
                f"(privacy.bands={privacy.bands}), which are optimised for the planned steps, and {where} was "
                f"trained with the old ones; resume with epochs={before!r}."
            )
        if privacy.noise_multiplier is None and privacy.target_epsilon is not None:
            raise ConfigError(
                f"--resume: epochs {before!r} -> {after!r} would change sigma: it is calibrated to "
                f"privacy.target_epsilon={privacy.target_epsilon} over the planned steps, and {where} was "
                f"trained with the old sigma. Resume with epochs={before!r}; only a run with a fixed "
                "privacy.noise_multiplier (and privacy.target_epsilon=None) can be extended."
            )


def _check_resume_sigma(saved_accountant: dict | None, plan, where: str) -> None:
    """The plan's sigma must be the one the checkpoint's steps were accounted with (else ε would be wrong)."""
    if saved_accountant is None or plan.noise_multiplier <= 0:
        return
    saved = saved_accountant.get("noise_multiplier")
    if saved != plan.noise_multiplier:
        raise ConfigError(
            f"--resume: this config gives sigma={plan.noise_multiplier!r} but {where} was trained with "
            f"sigma={saved!r}; resume with the config the run was started with, or start afresh with "
            "--overwrite or a new workdir=DIR."
        )


def _throughput(history: list[dict]) -> float:
    """Examples/s of recorded epochs, the first (compilation) left out where there are others."""
    rates = [r["examples_per_sec"] for r in history]
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


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
            try:
                self.accountant.load_state_dict(meta["accountant"])
            except ValueError as e:  # another mechanism than this config's: a config error, before any step
                raise ConfigError(
                    f"--resume: checkpoint {resume_from} ({self.checkpointer.directory}) does not fit this config: "
                    f"{e} Resume with the config the run was started with, or start afresh with --overwrite."
                ) from e
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
        # The first epoch of this call includes the compilation: left out of the throughput where there are others.
        if epoch > self.start_epoch or self.start_epoch == self.num_epochs:
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
                    # What --resume compares its config with (RESUMABLE_KEYS may differ).
                    "config": _config_json(self.config),
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


def _callback_results(callbacks, params, workdir: str) -> dict:
    """Every callback's ``on_end`` entries; their ``not_covered_by_epsilon`` lists are joined, not replaced."""
    extra, not_covered = {}, []
    for cb in callbacks:
        out = dict(cb.on_end(params, workdir))
        not_covered += list(out.pop("not_covered_by_epsilon", ()))
        extra.update(out)
    return {**extra, "not_covered_by_epsilon": not_covered}


def _summary(config, loop: _Loop, extra: dict, wall_time_s: float) -> dict:
    plan, history = loop.run.plan, loop.history
    last = history[-1]
    delta = config.privacy.delta
    not_covered = extra.get("not_covered_by_epsilon", ())
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
        "model_dtype": config.model.get("dtype", "float32"),
        "bands": plan.bands,
        "noise_multiplier": plan.noise_multiplier,
        "l2_clip_norm": plan.l2_clip_norm,
        "steps": plan.num_steps,
        "planned_steps": config.epochs * loop.run.steps_per_epoch,
        "attack_risk": _attack_risk(loop.accountant, delta),
        # Computed on the private training data without noise: not covered by epsilon, do not publish.
        "not_covered_by_epsilon": ["loss", "train_accuracy", "fraction_clipped", "nonfinite_dropped"]
        + [k for k in last if k.startswith(("grad_norm_", "clip_bias_bound"))]
        + list(not_covered),  # and what the callbacks computed from the training data
        # Of the epochs this call trained; a resume that trained nothing keeps the recorded epochs' throughput.
        "examples_per_sec": loop.steady_examples / loop.steady_time if loop.steady_time else _throughput(history),
        "nonfinite_dropped": sum(r["nonfinite_dropped"] for r in history),
        "devices": loop.run.mesh.devices.size,
        "wall_time_s": wall_time_s,
        "workdir": config.workdir,
        **{k: v for k, v in extra.items() if k != "not_covered_by_epsilon"},
    }


def _nothing_to_train(config, loop: _Loop, checkpointer: Checkpointer, resume_from: int, primary: bool) -> dict:
    """A resume of a run that is already at its last step: say so; keep its summary (and its throughput)."""
    path = os.path.join(config.workdir, "summary.json")
    kept = os.path.exists(path)
    print(
        f"jaxdp: nothing to train: checkpoint {resume_from} is at the last step ({loop.step_count} of "
        f"{loop.run.plan.num_steps}); "
        + ("summary.json is unchanged." if kept else "writing the summary.json the interrupted run did not."),
        flush=True,
    )
    if kept:
        with open(path) as f:
            summary = json.load(f)
    else:
        summary = _summary(config, loop, _callback_results(loop.callbacks, loop.state.params, config.workdir), 0.0)
        if primary:
            with open(path, "w") as f:
                json.dump(summary, f, indent=2)
    checkpointer.close()
    print(json.dumps(summary), flush=True)
    return summary


def train(
    config: ml_collections.ConfigDict,
    *,
    progress: bool = True,
    callbacks: Sequence[TrainCallback] = (),
    resume: bool = False,
    overwrite: bool = False,
    example_grad: ExampleGradFn | None = None,
    perturb: Callable[[Any, Any], Any] | None = None,
) -> dict:
    """Run private training from a config; returns (and prints) the summary.

    Writes ``metrics.jsonl`` (one line per epoch, also printed), ``summary.json``,
    orbax checkpoints (:mod:`jaxdp.train.checkpoint`) and, with ``tensorboardX``,
    TensorBoard events under ``config.workdir``. ``progress`` draws a progress bar
    on stderr when stderr is a terminal (the epoch lines are printed either way).
    ``callbacks`` (:class:`jaxdp.train.TrainCallback`) observe the run. ``example_grad``
    and ``perturb`` change how each step's gradients are formed without changing the
    privacy plan (see :func:`jaxdp.make_private_step`; ``experiments/bam`` uses them).

    A workdir that holds a run (checkpoints, metrics rows or a summary) is never
    written over: that is a :class:`ConfigError` unless ``resume`` or ``overwrite``
    (``jaxdp train --resume`` / ``--overwrite``) says what to do with it.

    * ``resume=True`` continues from the latest checkpoint there and ends with
      exactly the parameters and ε of an uninterrupted run. The config may differ
      from the checkpoint's only in :data:`RESUMABLE_KEYS` (``epochs`` only to extend
      a run whose sigma stays the same); other differences are refused, naming them.
      The epochs after the checkpoint that the interrupted run had logged are logged
      once: ``metrics.jsonl`` is rewritten from the checkpoint's history and
      TensorBoard purges them. A run already at its last step trains nothing and
      keeps its ``summary.json``.
    * ``overwrite=True`` deletes the previous run's :data:`RUN_FILES` (checkpoints,
      metrics.jsonl, summary.json, tensorboard events; nothing else), once the config
      has been checked and before the first step.

    A run that fails before its first step (a bad value, bad data) removes the
    directories it created, each only if it is still empty.

    Each epoch's record also has clipping diagnostics of the per-example
    gradients that were clipped (:func:`jaxdp.gradient_norm_stats`): their mean
    and 10/50/90% quantiles and, for whole-gradient clipping, the bias bound
    ``mean max(0, ||g_i|| - C)``, pooled over the epoch's examples. Like the
    loss, they are computed without noise and are not covered by ε.

    Raises:
      ConfigError: a bad value, a workdir holding a run (without ``resume`` or
        ``overwrite``), or a resume whose config does not fit the checkpoint;
        before the first step.
      TrainingError: the run diverged (NaN/inf parameters or loss; nothing of that
        epoch is saved), a checkpoint could not be written (e.g. a full disk), or
        a checkpoint to resume from counts fewer steps than its parameters took.
        The message names the epoch, the last good checkpoint and the fix.
    """
    # Before anything touches a JAX backend (orbax's manager asks for the process index).
    initialize_distributed(config)
    if resume and overwrite:
        raise ConfigError(
            "--resume and --overwrite exclude each other: --resume continues the run in workdir, --overwrite "
            "deletes it and starts afresh; pass one of them."
        )
    workdir = config.workdir
    held = _held_run(workdir)
    if held and not (resume or overwrite):
        raise ConfigError(
            f"workdir {workdir!r} holds a run ({'; '.join(held)}); continue it with --resume, replace it with "
            "--overwrite (deletes its checkpoints, metrics.jsonl, summary.json and tensorboard events), or pass a "
            "fresh workdir=DIR."
        )
    foreign = _foreign_entries(workdir) if held and overwrite else []
    if foreign:
        raise ConfigError(
            f"--overwrite would delete files jaxdp did not write: {', '.join(foreign[:3])}"
            f"{f' and {len(foreign) - 3} more' if len(foreign) > 3 else ''}; move them out of workdir {workdir!r}, "
            "or pass a fresh workdir=DIR."
        )
    if config.ema_decay:
        callbacks = [*callbacks, ParameterEMA(config.ema_decay)]
    # Multi-host: every process runs the same loop, process 0 alone writes the logs (orbax
    # coordinates the checkpoints itself); the others would race it on a shared workdir.
    primary = jax.process_index() == 0
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    created = _missing_dirs(checkpoint_dir)  # removed again, where still empty, when the run fails
    checkpointer, resume_from, saved_meta, where = None, None, None, ""
    try:
        if resume:
            checkpointer = Checkpointer(checkpoint_dir, keep=config.checkpoint.keep)
            resume_from = checkpointer.latest()
            if jax.process_count() > 1:
                check_same_checkpoint_everywhere(resume_from, checkpointer.directory)
            if resume_from is None:
                print(f"jaxdp: no checkpoint under {checkpointer.directory}; starting from the beginning.", flush=True)
            else:
                saved_meta = checkpointer.meta(resume_from)
                where = f"checkpoint {resume_from} ({checkpointer.directory}/{resume_from})"
                _check_resume_config(saved_meta.get("config"), config, saved_meta, where)
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
        if saved_meta is not None:
            _check_resume_sigma(saved_meta.get("accountant"), run.plan, where)
    except BaseException:
        if checkpointer is not None:
            checkpointer.close()
        _remove_if_empty(created)
        raise

    try:
        if overwrite:
            if primary:
                deleted = _clear_run(workdir)
                if deleted:
                    print(
                        f"jaxdp: --overwrite: deleted {', '.join(deleted)} of the previous run in "
                        f"{os.path.abspath(workdir)}",
                        flush=True,
                    )
            if jax.process_count() > 1:  # the others start once process 0 has cleared the shared workdir
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("jaxdp train --overwrite")
        if checkpointer is None:
            checkpointer = Checkpointer(checkpoint_dir, keep=config.checkpoint.keep)
        os.makedirs(workdir, exist_ok=True)
        metrics_path = os.path.join(workdir, "metrics.jsonl") if primary else os.devnull
        print(_header(config, run), flush=True)
        from tqdm.auto import tqdm

        t_start = time.perf_counter()
        loop = _Loop(config, run, callbacks, checkpointer)
        loop.start()
        if resume_from is not None:
            loop.resume(resume_from)
            if loop.start_epoch > loop.num_epochs:
                return _nothing_to_train(config, loop, checkpointer, resume_from, primary)
        bar = tqdm(
            total=run.plan.num_steps,
            initial=loop.step_count,
            desc="private training",
            unit="step",
            disable=not (progress and sys.stderr.isatty()),  # a bar only where one can be drawn
            file=sys.stderr,
            dynamic_ncols=True,
        )
        # A resumed run trains again the steps after its checkpoint, which the interrupted run may have logged.
        purge_step = loop.step_count + 1 if resume else None
        tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"), purge_step) if primary else None
        with open(metrics_path, "w") as log, bar:
            for record in loop.history:  # a resumed run rewrites the epochs up to its checkpoint, and drops the rest
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
                split = "val" if loop.run.dataset.eval_split == "validation" else "test"
                tqdm.write(  # printed with or without the bar: --no-progress hides the bar only
                    f"epoch {epoch:3d} | loss {record['loss']:.4f} | train acc {record['train_accuracy']:.4f} "
                    f"| {split} acc {record['test_accuracy']:.4f} | eps {record['epsilon']:.3f} "
                    f"| {record['examples_per_sec']:,.0f} ex/s",
                    file=sys.stdout,
                )
                sys.stdout.flush()  # each line as it comes, also into a pipe (| tee) or a file
        planned_steps = config.epochs * run.steps_per_epoch
        if run.plan.num_steps < planned_steps:
            print(
                f"jaxdp: stopped after {run.plan.num_steps} of {planned_steps} planned steps: one more step would spend "
                f"more than privacy.target_epsilon={config.privacy.target_epsilon}.",
                flush=True,
            )
        extra = _callback_results(loop.callbacks, loop.state.params, workdir)
        summary = _summary(config, loop, extra, time.perf_counter() - t_start)
        checkpointer.close()
        if tb is not None:
            tb.close()
        if primary:
            with open(os.path.join(workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        print(json.dumps(summary), flush=True)
        return summary
    except BaseException:  # e.g. Ctrl-C or a closed stdout before anything was written: no empty dirs left
        _remove_if_empty(created)
        raise
