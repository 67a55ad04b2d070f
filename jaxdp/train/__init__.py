"""``jaxdp train``: the training loop from a config, and what it is built from.

* :mod:`jaxdp.train.setup` — config checks, the plan (:meth:`jaxdp.PrivacyPlan.from_target`),
  model, optimizer and the secret seed;
* :mod:`jaxdp.train.loop` — :func:`train`, the loop around :func:`jaxdp.run_private_step`;
* :mod:`jaxdp.train.callbacks` — :class:`TrainCallback` and :class:`ParameterEMA`;
* :mod:`jaxdp.train.evaluation` — :func:`evaluate`;
* :mod:`jaxdp.train.guards` — what stops a run (:class:`TrainingError`);
* :mod:`jaxdp.train.checkpoint` — crash-safe orbax checkpoints.

The step itself (:class:`TrainState`, :func:`make_private_step`, :func:`run_private_step`)
lives in :mod:`jaxdp.step` and is re-exported here and from ``jaxdp``.
"""

from jaxdp.step import (
    PrivateStep,
    TrainState,
    init_state,
    make_nonprivate_step,
    make_private_step,
    run_private_step,
)
from jaxdp.train.callbacks import ParameterEMA, TrainCallback
from jaxdp.train.checkpoint import Checkpointer
from jaxdp.train.evaluation import evaluate
from jaxdp.train.guards import TrainingError
from jaxdp.train.loop import train
from jaxdp.train.setup import (
    build_model,
    classification_loss,
    config_optimizer,
    make_optimizer,
    make_plan,
    privacy_seed,
    setup_run,
    validate_config,
)

__all__ = [
    "Checkpointer",
    "ParameterEMA",
    "PrivateStep",
    "TrainCallback",
    "TrainState",
    "TrainingError",
    "build_model",
    "classification_loss",
    "config_optimizer",
    "evaluate",
    "init_state",
    "make_nonprivate_step",
    "make_optimizer",
    "make_plan",
    "make_private_step",
    "privacy_seed",
    "run_private_step",
    "setup_run",
    "train",
    "validate_config",
]
