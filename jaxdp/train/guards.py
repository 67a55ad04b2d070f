"""What stops a run, with a message that says what to do: divergence, a failed checkpoint write, an
inconsistent resume. Each is checked before anything of the bad epoch is logged or saved."""

from __future__ import annotations

import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "TrainingError",
    "check_finite",
    "check_resumed_steps",
    "check_same_checkpoint_everywhere",
    "last_good",
    "save_or_explain",
]


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged, checkpoint not written, inconsistent resume).

    The message says what happened, at which epoch and step, which checkpoint is
    the last good one, and what to change; the CLI prints it on one line (exit 1).
    """


def last_good(checkpointer) -> str:
    latest = checkpointer.latest()
    if latest is None:
        return "there is no checkpoint yet (rerun with --overwrite to start from the beginning)"
    return f"the last good checkpoint is epoch {latest} ({checkpointer.directory}/{latest}): continue with --resume"


@jax.jit
def _finite_leaves(params):
    return jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)), params)


def check_finite(epoch, first, last_step, params, totals, config, checkpointer) -> None:
    """Stop a diverged run with a message, before its parameters are logged or checkpointed.

    Diverged: a parameter is NaN/inf, or the loss is non-finite and not because a
    few examples were dropped (their NaN/inf gradients are left out of the sum and
    counted: a warning, the run goes on).
    """
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(_finite_leaves(params)))[0]
    bad = [jax.tree_util.keystr(path) for path, ok in flat if not ok]
    loss = totals["loss_sum"] / max(totals["examples"], 1.0)
    dropped, examples = int(totals["nonfinite"]), int(totals["examples"])
    where = f"epoch {epoch} (steps {first + 1}-{last_step})"
    if bad or (not math.isfinite(loss) and (dropped == 0 or 2 * dropped >= examples)):
        what = (
            f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} became NaN/inf"
            if bad
            else f"the loss is {loss} ({dropped} of {examples} examples had a NaN/inf gradient)"
        )
        raise TrainingError(
            f"training diverged in {where}: {what}. Nothing of this epoch was saved; {last_good(checkpointer)}. "
            f"Likely fix: lower optimizer.learning_rate (now {config.optimizer.learning_rate}) or "
            f"privacy.l2_clip_norm (now {config.privacy.l2_clip_norm}), or check the data for NaN/inf."
        )
    if dropped:
        print(
            f"warning: {where}: {dropped} of {examples} examples had a NaN/inf gradient and were dropped from the "
            "sum (they add exactly zero, so privacy is unaffected); check the data for NaN/inf, or lower "
            "optimizer.learning_rate if the count grows.",
            file=sys.stderr,
        )


def save_or_explain(checkpointer, epoch: int, state: Any, meta: dict) -> None:
    """Save a checkpoint; a failed write (full disk, ...) stops the run naming the last good one."""
    try:
        checkpointer.save(epoch, state, meta)
    except OSError as e:
        raise TrainingError(
            f"could not write the checkpoint of epoch {epoch} under {checkpointer.directory}: {e}. The incomplete "
            f"write will be ignored; {last_good(checkpointer)}. Fix: free disk space (or lower checkpoint.keep), "
            "then rerun."
        ) from e


def check_resumed_steps(params_step: int, accountant, step_count: int, resume_from: int) -> None:
    """A resumed run must count every step its parameters have taken (never fewer)."""
    counted = accountant.steps if accountant is not None else params_step
    if params_step != step_count or counted != step_count:
        raise TrainingError(
            f"checkpoint {resume_from} is inconsistent: its parameters have taken {params_step} steps, its "
            f"accountant counted {counted}, and epoch {resume_from} of this config ends at step {step_count}. "
            "Resuming would misstate the privacy spent; resume with the config the run was started with, or "
            "start afresh in a new workdir."
        )


def check_same_checkpoint_everywhere(latest: int | None, directory: str) -> None:
    """Multi-host resume: every process must find the same latest checkpoint, or they would
    start from different steps (and wait on each other forever)."""
    from jax.experimental import multihost_utils

    seen = multihost_utils.process_allgather(np.int64(-1 if latest is None else latest)).tolist()
    if len(set(seen)) > 1:
        found = ", ".join(f"process {i}: {'none' if e < 0 else f'epoch {e}'}" for i, e in enumerate(seen))
        raise TrainingError(
            f"--resume: the processes see different latest checkpoints under {directory} ({found}). "
            "Checkpoints are written once, for all processes: a multi-host run needs a workdir that every "
            "host shares (e.g. an NFS mount), given as the same path on each."
        )
