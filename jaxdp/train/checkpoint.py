"""Crash-safe checkpoints with orbax: everything a resumed run needs to end bit-identical.

Saved every ``checkpoint.every_epochs`` epochs and at the end, under
``workdir/checkpoints/<epoch>``: parameters, optimizer state (the noise key
included), the step, the accountant state, the metrics so far, the run's
secret seed (the Poisson draws are a function of it) and its config (a
``--resume`` with another config is refused, naming the keys; see
:data:`jaxdp.train.loop.RESUMABLE_KEYS`). Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a write
interrupted by a crash is never picked up as a valid checkpoint.

**Checkpoints are private material**: they hold the secret noise seed and key;
whoever has them can recompute the noise. Keep them with the private data.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, template):
    # Each key comes back with its own implementation (the template's), not JAX's default.
    return jax.tree_util.tree_map(
        lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x, tree, template
    )


@contextlib.contextmanager
def _interrupt_after():
    """Hold a Ctrl-C (SIGINT) back until the block is done, then raise it: a checkpoint write is never cut off
    half way by it (orbax's commit threads would die with pages of tracebacks). Only where Python's own
    handler is installed, in the main thread; a save takes a fraction of a second."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class Checkpointer:
    """Save and restore a run's state with an orbax ``CheckpointManager`` (last ``keep`` kept)."""

    def __init__(self, directory: str, *, keep: int = 3):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"checkpoint.keep={keep!r} must be an int >= 1.")
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, epoch: int, state: Any, meta: dict) -> None:
        """Write the checkpoint for ``epoch`` and wait until it is committed (a Ctrl-C meanwhile waits for it)."""
        host = jax.device_get(_keys_to_data(state))
        host = jax.tree_util.tree_map(np.asarray, host)
        with _interrupt_after():
            self.manager.save(
                epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta))
            )
            self.manager.wait_until_finished()

    def meta(self, epoch: int) -> dict:
        return self.manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, epoch: int, template: Any) -> tuple[Any, dict]:
        """Restore ``(state, meta)``; ``template`` is a state of the same structure (fresh init)."""
        target = jax.tree_util.tree_map(np.asarray, jax.device_get(_keys_to_data(template)))
        out = self.manager.restore(
            epoch,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return _data_to_keys(out["state"], template), out["meta"]

    def close(self) -> None:
        self.manager.close()
