"""The private training loop: wires plan, sampler, model, optimizer and mesh together.

The data path of one step::

    PoissonSampler.draw -> fixed-shape chunks + masks -> shard over "data"
      -> clipped_grad (vmap of grad, clip, mask, sum) -> + N(0, (σC)^2) once
      -> / expected batch size -> optax update

Jitted pieces are built by :func:`make_private_step` (usable on its own); the
loop (:func:`train`) only does host-side bookkeeping around them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxdp import accounting, distributed, keys
from jaxdp import data as data_lib
from jaxdp.accounting._base import require_upper_bound
from jaxdp.clipping import CLIPPING_IMPLS, ExampleGradFn, gradient_norm_stats
from jaxdp.config import ConfigError
from jaxdp.data.augment import multiplicity_loss, random_crop_flip
from jaxdp.models import check_dp_compatible, make_model
from jaxdp.optimizers import dp_optimizer, keep_last_update
from jaxdp.plan import PrivacyPlan
from jaxdp.plan import steps_per_epoch as epoch_steps

__all__ = [
    "TrainCallback",
    "TrainingError",
    "TrainState",
    "build_model",
    "classification_loss",
    "config_optimizer",
    "make_optimizer",
    "make_nonprivate_step",
    "make_private_step",
    "train",
    "validate_config",
]


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged, checkpoint not written, inconsistent resume).

    The message says what happened, at which epoch and step, which checkpoint is
    the last good one, and what to change; the CLI prints it on one line (exit 1).
    """


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


def make_optimizer(
    name: str, learning_rate: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """The (public, non-private) optimizer chained after the privatizer.

    ``weight_decay`` adds ``weight_decay * params`` to the noisy gradient (a
    Gaussian prior; post-processing of public parameters, so privacy is unchanged).
    """
    if weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay={weight_decay!r} must be >= 0.")
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if name == "sgd":
        return optax.chain(*decay, optax.sgd(learning_rate, momentum=momentum or None))
    if name == "adam":
        return optax.chain(*decay, optax.adam(learning_rate))
    raise ConfigError(f"optimizer.name={name!r} is not known; choose 'sgd' or 'adam'.")


def config_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """:func:`make_optimizer` from a config's ``optimizer`` section."""
    o = config.optimizer
    return make_optimizer(o.name, o.learning_rate, o.momentum, o.get("weight_decay", 0.0))


def build_model(config: ml_collections.ConfigDict, dataset: Any) -> tuple[nnx.GraphDef, Any, Any]:
    """The config's model for ``dataset``, refused if it mixes examples (BatchNorm), as ``(graphdef, params, rest)``."""
    model = make_model(
        config.model.name,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        seed=config.seed,
        **config.model.kwargs.to_dict(),
    )
    check_dp_compatible(model)
    return nnx.split(model, nnx.Param, ...)


def make_private_step(
    plan: PrivacyPlan,
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    noise_key: jax.Array | int,
    microbatch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    example_grad: ExampleGradFn | None = None,
    perturb: Callable[[Any, Any], Any] | None = None,
    clipping_impl: str = "vmap",
):
    """Build the jitted pieces of a DP-SGD step from a plan.

    Args:
      clipping_impl: "vmap" | "ghost" | "auto", how per-example norms are found
        (:func:`jaxdp.clipped_grad`); performance only, same result.
      example_grad: a per-example gradient estimator used instead of the plain
        per-example gradient (:func:`jaxdp.clipped_grad`); it sees one example at
        a time, so the plan's sensitivity holds (e.g. BAM).
      perturb: ``perturb(params, prev) -> params`` where ``prev`` is the previous
        step's *privatised* gradient (zeros before the first step): the
        per-example gradients are evaluated at the returned point and the update
        is applied to ``params`` (e.g. DP-SAT's ascent). It is given public
        quantities only, so it is post-processing. ``prev`` is kept in the
        optimizer state (:func:`jaxdp.optimizers.keep_last_update`), so it is
        checkpointed with the run.

    Returns:
      ``(tx, step, accumulate)`` where ``tx = chain(plan.privatizer(key),
      conjugate_complex(), optimizer)`` (with ``keep_last_update()`` after the
      privatizer when ``perturb`` is set);
      ``step(state, acc, x, y, mask) -> (state, metrics)`` adds the clipped sum of
      this chunk to ``acc`` (``None`` for a one-chunk draw), adds the noise once
      and updates; ``accumulate(state, acc, x, y, mask) -> (acc, metrics)`` is
      for the earlier chunks of a draw that spilled over one chunk. Extra
      per-example arrays after ``mask`` (e.g. augmentation keys) are passed to
      ``loss_fn`` after ``y``. ``metrics["norms"]`` holds the per-example norms
      of what was clipped (NaN where masked; see
      :func:`jaxdp.gradient_norm_stats`). With a ``mesh``, each device clips its
      own shard of the batch and the sums are reduced across devices
      (:func:`jaxdp.distributed.data_parallel`).
    """
    grad_fn = plan.clipped_grad(
        loss_fn,
        microbatch_size=microbatch_size,
        return_norms=True,
        example_grad=example_grad,
        clipping_impl=clipping_impl,
    )
    if mesh is not None:
        grad_fn = distributed.data_parallel(grad_fn, mesh)
    privatizer = plan.privatizer(noise_key)
    if perturb is not None:
        if not callable(perturb):
            raise TypeError(f"perturb={perturb!r} is not callable; pass perturb(params, prev_private_grad) -> params.")
        privatizer = optax.chain(privatizer, keep_last_update())
    tx = dp_optimizer(privatizer, optimizer)  # complex leaves: see jaxdp.optimizers

    def grad_point(state):
        if perturb is None:
            return state.params
        return perturb(state.params, optax.tree.get(state.opt_state, "last_update"))

    def chunk(state, acc, x, y, mask, *extra):
        g, aux = grad_fn(grad_point(state), x, y, *extra, example_mask=mask)
        if acc is not None:
            g = jax.tree_util.tree_map(jnp.add, acc, g)
        norms = jnp.where(mask > 0, aux.norms, jnp.nan)
        if mesh is not None:  # gathered (B floats) so every host can read them, multi-host included
            norms = jax.lax.with_sharding_constraint(norms, distributed.replicated_sharding(mesh))
        metrics = {
            "loss_sum": jnp.sum(jnp.where(mask > 0, aux.loss, 0.0)),
            "examples": jnp.sum(mask),
            "clipped": aux.num_clipped,
            "nonfinite": aux.num_nonfinite,
            "norms": norms,
        }
        return g, metrics

    @jax.jit
    def accumulate(state, acc, x, y, mask, *extra):
        return chunk(state, acc, x, y, mask, *extra)

    @jax.jit
    def step(state, acc, x, y, mask, *extra):
        g, metrics = chunk(state, acc, x, y, mask, *extra)
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


def _clipping_impl(config: ml_collections.ConfigDict) -> str:
    """``config.clipping_impl``; configs that predate it get the vmap path."""
    return config.get("clipping_impl", "vmap")


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
        sigma is None or (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0),
        "privacy.noise_multiplier",
        sigma,
        "sigma must be None (calibrate to privacy.target_epsilon) or a finite number >= 0",
    )
    target = config.privacy.target_epsilon
    need(
        target is None or (isinstance(target, (int, float)) and math.isfinite(target) and target > 0),
        "privacy.target_epsilon",
        target,
        "the target must be None (no target) or a finite number > 0 (e.g. 3.0)",
    )
    try:  # the one δ rule (jaxdp.accounting.check_delta): δ ∈ (0, 1), and δ <= 1/N once N is known
        accounting.check_delta(config.privacy.delta, dataset_size=dataset_size)
    except ValueError as e:
        raise ConfigError(f"privacy.{e}") from None
    lr = config.optimizer.learning_rate
    need(isinstance(lr, (int, float)) and lr > 0, "optimizer.learning_rate", lr, "need a number > 0")
    seed = config.privacy.noise_seed
    need(
        seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**keys.SECRET_BITS),
        "privacy.noise_seed",
        seed,
        f"need None (secret, {keys.SECRET_BITS} bits from the OS: the default for real runs) "
        f"or an int in [0, 2**{keys.SECRET_BITS}) (tests only)",
    )
    k = config.augment.multiplicity
    need(isinstance(k, int) and k >= 0, "augment.multiplicity", k, "need an int >= 0 (0 = no augmentation)")
    mb = config.microbatch_size
    need(isinstance(mb, int) and mb >= 0, "microbatch_size", mb, "need an int >= 0 (0 = no microbatching)")
    pb = config.physical_batch_size
    need(isinstance(pb, int) and pb >= 0, "physical_batch_size", pb, "need an int >= 0 (0 = automatic)")
    impl = _clipping_impl(config)
    need(impl in CLIPPING_IMPLS, "clipping_impl", impl, f"need one of {CLIPPING_IMPLS} (performance only)")


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


def make_plan(config: ml_collections.ConfigDict, dataset_size: int, steps_per_epoch: int) -> PrivacyPlan:
    """The run's privacy plan: σ calibrated to ``privacy.target_epsilon``, or given and budget-capped.

    * ``noise_multiplier`` None, ``target_epsilon`` set: σ is the smallest that
      spends at most the target over all planned steps (printed).
    * both set: σ as given; if the target would be exceeded, the plan keeps only
      the steps that fit and the run stops there with a message.
    * ``target_epsilon`` None: σ as given (0 = no noise, no privacy), ε reported.
    """
    p = config.privacy
    planned = config.epochs * steps_per_epoch
    # privacy.bands = b > 1: banded matrix-factorization noise, which needs cyclic Poisson sampling
    # (b groups, per-group rate b*B/N); see PrivacyPlan.bands.
    bands = p.get("bands", 1)
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
        raise ConfigError(f"privacy.bands={bands!r} is invalid: need an int >= 1 (1 = DP-SGD, b > 1 = BandMF).")
    if bands > 1 and config.sampling != "poisson":
        raise ConfigError(
            f"privacy.bands={bands} needs sampling='poisson' (run as cyclic Poisson over {bands} groups); "
            f"got sampling={config.sampling!r}."
        )
    if bands * config.batch_size > dataset_size:
        raise ConfigError(
            f"privacy.bands={bands} x batch_size={config.batch_size} exceeds the training set ({dataset_size}); "
            f"use privacy.bands <= {dataset_size // config.batch_size} or a smaller batch_size."
        )
    sampling = "cyclic_poisson" if bands > 1 else config.sampling
    q = bands * config.batch_size / dataset_size
    delta = p.delta
    name = p.accountant
    try:  # unknown names and approximations (gdp) cannot back a run's guarantee
        require_upper_bound(name)
    except ValueError as e:
        raise ConfigError(f"privacy.{e}") from None
    target, sigma = p.target_epsilon, p.noise_multiplier
    steps = planned
    if config.sampling == "shuffle" and (target is not None or sigma != 0):
        raise ConfigError(
            "sampling='shuffle' is for non-private runs: shuffled fixed-size batches get no privacy accounting "
            "here. Set privacy.target_epsilon=None privacy.noise_multiplier=0.0, or keep sampling='poisson'."
        )
    if sigma is None:
        if target is None:
            raise ConfigError(
                "privacy.target_epsilon and privacy.noise_multiplier are both None; set a target epsilon "
                "(sigma is then calibrated) or a noise multiplier."
            )
        t0 = time.perf_counter()
        sigma = accounting.calibrate_noise_multiplier(
            target, delta, q, planned, accountant=name, sampling=sampling, bands=bands
        )
        print(
            f"jaxdp: calibrated sigma={sigma:.4f}: the smallest noise with epsilon <= {target} at delta={delta:g} "
            f"over {planned} steps (q={q:.4f}, {name}; took {time.perf_counter() - t0:.2f} s)",
            flush=True,
        )
    elif target is not None:
        if sigma == 0:
            raise ConfigError(
                f"privacy.noise_multiplier=0 adds no noise, so privacy.target_epsilon={target} cannot be met; "
                "set privacy.noise_multiplier=None to calibrate it, or privacy.target_epsilon=None for a "
                "non-private run."
            )
        steps = accounting.max_steps(
            target, delta, q, sigma, accountant=name, limit=planned, sampling=sampling, bands=bands
        )
        if steps == 0:
            raise ConfigError(
                f"privacy.noise_multiplier={sigma} spends more than privacy.target_epsilon={target} in a single "
                "step; raise the noise multiplier or the target."
            )
        if steps < planned:
            print(
                f"jaxdp: budget: sigma={sigma} reaches epsilon={target} after {steps} of the {planned} planned "
                "steps; the run will stop there.",
                flush=True,
            )
    return PrivacyPlan(
        dataset_size=dataset_size,
        batch_size=config.batch_size,
        l2_clip_norm=float(p.l2_clip_norm),
        noise_multiplier=float(sigma),
        num_steps=steps,
        per_layer=bool(p.per_layer),
        sampling=sampling,
        accountant=name,
        bands=bands,
    )


def privacy_seed(noise_seed: int | None) -> int:
    """The seed of the noise and of the Poisson draws: secret unless the config fixes it.

    The guarantee needs both to be unpredictable: anyone who can recompute the
    noise can subtract it, and anyone who knows which steps sampled an example
    removes the amplification by subsampling the accountant counted on. So by
    default the seed is 128 bits of the OS's entropy (:func:`jaxdp.keys.new_secret`)
    and is never printed or logged; the noise key is built from all of it
    (:func:`jaxdp.keys.key_from_secret`). ``privacy.noise_seed`` fixes it for tests
    and debugging, with a warning. Multi-host runs broadcast process 0's seed as
    32-bit words (:func:`jaxdp.keys.broadcast_secret`, never truncated) so every
    host draws the same batches and noise.
    """
    if noise_seed is None:
        seed = keys.new_secret()
    else:
        seed = int(noise_seed)
        print(
            f"warning: privacy.noise_seed={noise_seed} is set: the noise and the sampled batches can be recomputed "
            "by anyone who knows it, which voids the privacy guarantee. Use it for tests and debugging only.",
            file=sys.stderr,
        )
    return keys.broadcast_secret(seed)


def _tensorboard_writer(logdir: str):
    """A TensorBoard writer when ``tensorboardX`` is installed (the ``dev``/``tensorboard`` extras), else None."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir)


class TrainCallback:
    """Hooks into :func:`train` for work that only *reads* the run (post-processing).

    Subclass and override what you need. Callbacks see public parameters only,
    so nothing they do changes the privacy guarantee.
    """

    def on_start(self, *, predict_logits: Callable, dataset: Any, plan: PrivacyPlan) -> None:
        """Before the first step. ``predict_logits(params, x)`` is jitted."""

    def on_step(self, step: int, params: Any) -> None:
        """After noisy step ``step`` (1-based) with the updated parameters."""

    def on_end(self, params: Any, workdir: str) -> dict:
        """After the last step; returns extra entries for the summary."""
        return {}

    def state_template(self, params: Any) -> Any:
        """A pytree of arrays shaped like :meth:`state_dict` (``{}``: nothing to checkpoint)."""
        return {}

    def state_dict(self) -> Any:
        """The callback's state, saved in every checkpoint so a resumed run continues it."""
        return {}

    def load_state_dict(self, state: Any) -> None:
        """Restore what :meth:`state_dict` returned."""


def _last_good(checkpointer) -> str:
    latest = checkpointer.latest()
    if latest is None:
        return "there is no checkpoint yet (a rerun starts from the beginning)"
    return f"the last good checkpoint is epoch {latest} ({checkpointer.directory}/{latest}): continue with --resume"


@jax.jit
def _finite_leaves(params):
    return jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)), params)


def _check_finite(epoch, first, last_step, params, totals, config, checkpointer) -> None:
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
            f"training diverged in {where}: {what}. Nothing of this epoch was saved; {_last_good(checkpointer)}. "
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


def _save_or_explain(checkpointer, epoch: int, state: Any, meta: dict) -> None:
    """Save a checkpoint; a failed write (full disk, ...) stops the run naming the last good one."""
    try:
        checkpointer.save(epoch, state, meta)
    except OSError as e:
        raise TrainingError(
            f"could not write the checkpoint of epoch {epoch} under {checkpointer.directory}: {e}. The incomplete "
            f"write will be ignored; {_last_good(checkpointer)}. Fix: free disk space (or lower checkpoint.keep), "
            "then rerun."
        ) from e


def _check_resumed_steps(params_step: int, accountant, step_count: int, resume_from: int) -> None:
    """A resumed run must count every step its parameters have taken (never fewer)."""
    counted = accountant.steps if accountant is not None else params_step
    if params_step != step_count or counted != step_count:
        raise TrainingError(
            f"checkpoint {resume_from} is inconsistent: its parameters have taken {params_step} steps, its "
            f"accountant counted {counted}, and epoch {resume_from} of this config ends at step {step_count}. "
            "Resuming would misstate the privacy spent; resume with the config the run was started with, or "
            "start afresh in a new workdir."
        )


def _check_same_checkpoint_everywhere(latest: int | None, directory: str) -> None:
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


def _initialize_distributed(config: ml_collections.ConfigDict) -> None:
    d = config.distributed
    try:
        distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
    except ValueError as e:  # inconsistent num_processes / process_id: a config error, one line
        raise ConfigError(str(e)) from e


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
    secret_seed: int


def _setup(
    config: ml_collections.ConfigDict,
    secret_seed: int | None = None,
    example_grad: ExampleGradFn | None = None,
    perturb: Callable[[Any, Any], Any] | None = None,
) -> _Run:
    """Everything before the first step (after :func:`train` joined a multi-host run). Bad values surface here
    as ConfigError."""
    dataset = data_lib.load(config.dataset, config.data_dir or None)
    n_train = len(dataset.x_train)
    validate_config(config, n_train)
    steps_per_epoch = epoch_steps(n_train, config.batch_size)
    if config.sampling == "shuffle":
        steps_per_epoch = -(-n_train // config.batch_size)  # every example once per epoch
    plan = make_plan(config, n_train, steps_per_epoch)
    graphdef, params, rest = build_model(config, dataset)
    loss_fn = classification_loss(graphdef, rest)
    k = config.augment.multiplicity
    if k:
        # Augmentation multiplicity: each example's gradient averages K augmented copies before clipping.
        augment = functools.partial(random_crop_flip, pad=config.augment.crop_pad, flip=config.augment.flip)
        loss_fn = multiplicity_loss(loss_fn, multiplicity=k, augment=augment)
    if secret_seed is None:  # a resumed run passes the seed it saved
        secret_seed = privacy_seed(config.privacy.noise_seed)
    optimizer = config_optimizer(config)
    mesh = distributed.make_mesh()
    tx, step_fn, accumulate_fn = make_private_step(
        plan,
        loss_fn,
        optimizer,
        noise_key=keys.key_from_secret(secret_seed),
        microbatch_size=config.microbatch_size or None,
        mesh=mesh,
        example_grad=example_grad,
        perturb=perturb,
        clipping_impl=_clipping_impl(config),
    )
    n_dev = mesh.devices.size
    sampler = plan.sampler(
        seed=secret_seed + 1, physical_batch_size=config.physical_batch_size or None, multiple_of=n_dev
    )
    state = distributed.replicate(mesh, TrainState(params, tx.init(params), jnp.zeros((), jnp.int32)))

    return _Run(
        dataset, plan, steps_per_epoch, graphdef, rest, mesh, sampler, state, step_fn, accumulate_fn, secret_seed
    )


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
    checkpoints (:mod:`jaxdp.checkpoint`) under ``config.workdir``. With
    ``resume=True`` it continues from the latest checkpoint there and ends with
    exactly the parameters and ε of an uninterrupted run. ``callbacks``
    (:class:`TrainCallback`) observe the run. ``example_grad`` and ``perturb``
    change how each step's gradients are formed without changing the privacy
    plan (see :func:`make_private_step`; ``experiments/bam`` uses them).

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
    from jaxdp.checkpoint import Checkpointer

    # Before anything touches a JAX backend (orbax's manager asks for the process index).
    _initialize_distributed(config)
    if config.ema_decay:
        from jaxdp.ema import ParameterEMA

        callbacks = [*callbacks, ParameterEMA(config.ema_decay)]

    checkpointer = Checkpointer(os.path.join(config.workdir, "checkpoints"), keep=config.checkpoint.keep)
    resume_from = checkpointer.latest() if resume else None
    if resume and jax.process_count() > 1:
        _check_same_checkpoint_everywhere(resume_from, checkpointer.directory)
    if resume and resume_from is None:
        print(f"jaxdp: no checkpoint under {checkpointer.directory}; starting from the beginning.", flush=True)
    saved_meta = checkpointer.meta(resume_from) if resume_from is not None else None
    try:
        run = _setup(
            config,
            secret_seed=saved_meta["secret_seed"] if saved_meta else None,
            example_grad=example_grad,
            perturb=perturb,
        )
    except ConfigError:
        raise
    except ValueError as e:  # a bad value caught by the plan, model, sampler or dataset
        raise ConfigError(str(e)) from e
    dataset, plan, steps_per_epoch = run.dataset, run.plan, run.steps_per_epoch
    graphdef, rest, mesh, sampler, state = run.graphdef, run.rest, run.mesh, run.sampler, run.state
    step_fn, accumulate_fn = run.step_fn, run.accumulate_fn
    n_train, n_dev = len(dataset.x_train), mesh.devices.size
    num_steps, delta = plan.num_steps, config.privacy.delta

    logits_fn = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x))

    def predict(p, x):
        return jnp.argmax(logits_fn(p, x), axis=-1)

    workdir = config.workdir
    os.makedirs(workdir, exist_ok=True)
    # Multi-host: every process runs the same loop, process 0 alone writes the logs (orbax
    # coordinates the checkpoints itself); the others would race it on a shared workdir.
    primary = jax.process_index() == 0
    metrics_path = os.path.join(workdir, "metrics.jsonl") if primary else os.devnull
    print(
        f"jaxdp: {config.dataset} N={n_train} model={config.model.name} devices={n_dev} "
        f"| q={plan.sampling_rate:.4f} steps={num_steps} sigma={plan.noise_multiplier:.4f} "
        f"C={plan.l2_clip_norm} delta={delta:g} -> epsilon={plan.epsilon(delta):.3f} at the end "
        f"| physical batch {sampler.physical_batch_size} | clipping {_clipping_impl(config)}"
        + (f" | BandMF: {plan.bands} bands, cyclic Poisson (q per group)" if plan.bands > 1 else ""),
        flush=True,
    )
    from tqdm.auto import tqdm

    x_train, y_train = dataset.x_train, dataset.y_train
    t_start = time.perf_counter()
    steady_examples, steady_time = 0.0, 0.0
    history = []
    start_epoch = 1
    for cb in callbacks:
        cb.on_start(predict_logits=logits_fn, dataset=dataset, plan=plan)
    # Callbacks with state (EMA, posterior samples) are checkpointed with the run.
    stateful = {str(i): cb for i, cb in enumerate(callbacks) if cb.state_template(run.state.params)}
    if resume_from is not None:
        template = {
            "train": run.state,
            "callbacks": {k: cb.state_template(run.state.params) for k, cb in stateful.items()},
        }
        restored, meta = checkpointer.restore(resume_from, template)
        state = distributed.replicate(mesh, restored["train"])
        for k, cb in stateful.items():
            cb.load_state_dict(restored["callbacks"][k])
        history = meta["history"]
        start_epoch = meta["epoch"] + 1
        print(f"jaxdp: resumed from epoch {meta['epoch']} ({checkpointer.directory}/{resume_from})", flush=True)
    bar = tqdm(
        total=num_steps,
        desc="private training",
        unit="step",
        disable=not (progress and sys.stderr.isatty()),  # a bar only where one can be drawn
        file=sys.stderr,
        dynamic_ncols=True,
    )
    # The accountant is stepped once per noisy step, on the host, in the loop
    # that issues the steps: what it reports is what was run.
    accountant = plan.make_accountant() if plan.noise_multiplier > 0 else None
    step_count = 0
    planned_steps = config.epochs * steps_per_epoch
    num_epochs = -(-num_steps // steps_per_epoch)
    if start_epoch > 1:
        step_count = min((start_epoch - 1) * steps_per_epoch, num_steps)
        bar.update(step_count)
        if accountant is not None:
            accountant.load_state_dict(meta["accountant"])
        _check_resumed_steps(int(jax.device_get(state.step)), accountant, step_count, resume_from)
    tb = _tensorboard_writer(os.path.join(workdir, "tensorboard")) if primary else None
    with open(metrics_path, "w") as log, bar:
        for record in history:  # a resumed run rewrites the epochs it already has
            log.write(json.dumps(record) + "\n")
        for epoch in range(start_epoch, num_epochs + 1):
            first = (epoch - 1) * steps_per_epoch
            last_step = min(first + steps_per_epoch, num_steps)
            t0 = time.perf_counter()
            epoch_metrics = []
            for step_index, chunks in sampler.steps(first, last_step):
                acc = None
                for i, (idx, mask) in enumerate(chunks):
                    host = [x_train[idx], y_train[idx], mask]
                    if config.augment.multiplicity:
                        # Public augmentation randomness (privacy holds for any augmentation).
                        aug_rng = np.random.default_rng([config.seed, 7, step_index, i])
                        host.append(aug_rng.integers(0, 2**32, (len(idx), 2), dtype=np.uint32))
                    xb, yb, mb, *extra = distributed.shard_batch(mesh, tuple(host))
                    if i < len(chunks) - 1:
                        acc, m = accumulate_fn(state, acc, xb, yb, mb, *extra)
                    else:
                        state, m = step_fn(state, acc, xb, yb, mb, *extra)
                    epoch_metrics.append(m)
                if accountant is not None:
                    accountant.step()
                step_count += 1
                for cb in callbacks:
                    cb.on_step(step_count, state.params)
                bar.update(1)
            epoch_metrics = jax.device_get(epoch_metrics)  # waits for the epoch's steps
            elapsed = time.perf_counter() - t0
            norms = np.concatenate([m.pop("norms") for m in epoch_metrics])
            totals = {k: float(sum(m[k] for m in epoch_metrics)) for k in epoch_metrics[0]}
            # Before anything is logged or saved: NaN parameters never reach a checkpoint.
            _check_finite(epoch, first, last_step, state.params, totals, config, checkpointer)
            grad_stats = gradient_norm_stats(norms, np.isfinite(norms), l2_clip_norm=plan.l2_clip_norm)
            if plan.per_layer:  # max(0, ||g|| - C) bounds the bias of whole-gradient clipping only
                del grad_stats["clip_bias_bound"]
            if epoch > 1 or num_epochs == 1:
                steady_examples += totals["examples"]
                steady_time += elapsed
            record = {
                "epoch": epoch,
                "step": last_step,
                "loss": totals["loss_sum"] / max(totals["examples"], 1.0),
                "train_accuracy": _evaluate(predict, state.params, x_train, y_train),
                "test_accuracy": _evaluate(predict, state.params, dataset.x_test, dataset.y_test),
                "epsilon": accountant.epsilon(delta) if accountant is not None else math.inf,
                "delta": delta,
                "examples_per_sec": totals["examples"] / elapsed,
                "fraction_clipped": totals["clipped"] / max(totals["examples"], 1.0),
                "nonfinite_dropped": int(totals["nonfinite"]),
                **{k: float(v) for k, v in grad_stats.items() if k not in ("examples", "fraction_clipped")},
            }
            history.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if tb is not None:
                for key, value in record.items():
                    if key not in ("epoch", "step", "delta") and math.isfinite(value):
                        tb.add_scalar(key, value, record["step"])
                tb.flush()
            every = config.checkpoint.every_epochs
            if epoch == num_epochs or (every and epoch % every == 0):
                _save_or_explain(
                    checkpointer,
                    epoch,
                    {"train": state, "callbacks": {k: cb.state_dict() for k, cb in stateful.items()}},
                    {
                        "epoch": epoch,
                        "history": history,
                        "accountant": accountant.state_dict() if accountant is not None else None,
                        "secret_seed": run.secret_seed,
                    },
                )
            bar.set_postfix(epoch=epoch, eps=f"{record['epsilon']:.3f}", test_acc=f"{record['test_accuracy']:.3f}")
            if progress:
                tqdm.write(
                    f"epoch {epoch:3d} | loss {record['loss']:.4f} | train acc {record['train_accuracy']:.4f} "
                    f"| test acc {record['test_accuracy']:.4f} | eps {record['epsilon']:.3f} "
                    f"| {record['examples_per_sec']:,.0f} ex/s",
                    file=sys.stdout,
                )
    if num_steps < planned_steps:
        print(
            f"jaxdp: stopped after {num_steps} of {planned_steps} planned steps: one more step would spend more "
            f"than privacy.target_epsilon={config.privacy.target_epsilon}.",
            flush=True,
        )
    last = history[-1]
    risk = {}
    if accountant is not None:
        r = accounting.attack_risk(accountant, delta=delta)
        risk = {
            "mu_clt": r.mu_clt,
            "advantage": r.advantage,
            "tpr_at_fpr_0.01": r.tpr_at_fpr[0.01],
            "tpr_at_fpr_0.001": r.tpr_at_fpr[0.001],
        }
    extra = {}
    for cb in callbacks:
        extra.update(cb.on_end(state.params, workdir))
    summary = {
        "dataset": config.dataset,
        "model": config.model.name,
        "test_accuracy": last["test_accuracy"],
        "train_accuracy": last["train_accuracy"],
        "epsilon": last["epsilon"],
        "delta": delta,
        "target_epsilon": config.privacy.target_epsilon,
        "accountant": plan.accountant,
        "mechanism": plan.mechanism,
        "clipping_impl": _clipping_impl(config),
        "bands": plan.bands,
        "noise_multiplier": plan.noise_multiplier,
        "l2_clip_norm": plan.l2_clip_norm,
        "steps": num_steps,
        "planned_steps": planned_steps,
        "attack_risk": risk,
        # Computed on the private training data without noise: not covered by epsilon, do not publish.
        "not_covered_by_epsilon": ["loss", "train_accuracy", "fraction_clipped", "nonfinite_dropped"]
        + [k for k in last if k.startswith(("grad_norm_", "clip_bias_bound"))],
        "examples_per_sec": steady_examples / steady_time if steady_time else last["examples_per_sec"],
        "nonfinite_dropped": sum(r["nonfinite_dropped"] for r in history),
        "devices": n_dev,
        "wall_time_s": time.perf_counter() - t_start,
        "workdir": workdir,
        **extra,
    }
    checkpointer.close()
    if tb is not None:
        tb.close()
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary), flush=True)
    return summary
