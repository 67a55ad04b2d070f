"""Callbacks: work that only reads the run (post-processing, free of privacy cost), e.g. the parameter EMA."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxdp.train.evaluation import evaluate

if TYPE_CHECKING:
    from jaxdp.plan import PrivacyPlan

__all__ = ["ParameterEMA", "TrainCallback"]


class TrainCallback:
    """Hooks into :func:`jaxdp.train.train` for work that only *reads* the run (post-processing).

    Subclass and override what you need. Callbacks see public parameters only,
    so nothing they do changes the privacy guarantee.
    """

    def on_start(self, *, predict_logits: Callable, dataset: Any, plan: PrivacyPlan) -> None:
        """Before the first step. ``predict_logits(params, x)`` is jitted."""

    def on_step(self, step: int, params: Any) -> None:
        """After noisy step ``step`` (1-based) with the updated parameters."""

    def on_end(self, params: Any, workdir: str) -> dict:
        """After the last step; returns extra entries for the summary.

        A callback that computed something from the private training data without noise (a
        diagnostic) lists those keys under ``"not_covered_by_epsilon"``: they join the summary's
        list of the same name instead of replacing it.
        """
        return {}

    def state_template(self, params: Any) -> Any:
        """A pytree of arrays shaped like :meth:`state_dict` (``{}``: nothing to checkpoint)."""
        return {}

    def state_dict(self) -> Any:
        """The callback's state, saved in every checkpoint so a resumed run continues it."""
        return {}

    def load_state_dict(self, state: Any) -> None:
        """Restore what :meth:`state_dict` returned."""


class ParameterEMA(TrainCallback):
    """``ema ← decay·ema + (1 − decay)·params`` after every step (on device); reports test accuracy of the EMA.

    The EMA only reads the already-private parameters, so it costs no privacy.
    Its state is saved in every checkpoint, so a resumed run continues the same average.
    """

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay!r} must lie in (0, 1) (e.g. 0.999); 0 turns the EMA off.")
        self.decay = decay
        self.ema = None
        self._update = jax.jit(lambda e, p: jax.tree_util.tree_map(lambda a, b: decay * a + (1 - decay) * b, e, p))

    def on_start(self, *, predict_logits, dataset, plan) -> None:
        self._logits = predict_logits
        self._x, self._y = dataset.x_test, dataset.y_test

    def on_step(self, step: int, params: Any) -> None:
        self.ema = params if self.ema is None else self._update(self.ema, params)

    def state_template(self, params: Any) -> Any:
        return {"ema": params}

    def state_dict(self) -> Any:
        return {"ema": self.ema}

    def load_state_dict(self, state: Any) -> None:
        self.ema = state["ema"]

    def on_end(self, params: Any, workdir: str) -> dict:
        def predict(p, x):
            return jnp.argmax(self._logits(p, x), axis=-1)

        return {"ema_test_accuracy": evaluate(predict, self.ema, self._x, self._y), "ema_decay": self.decay}
