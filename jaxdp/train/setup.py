"""Everything before the first step of ``jaxdp train``: config checks, the plan, the model, the optimizer, the seed.

Config values reach the privacy rules of :mod:`jaxdp.rules` under their config
names (``privacy.l2_clip_norm``); the other values are checked here. Bad values
surface as :class:`jaxdp.config.ConfigError` before anything is trained.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxdp import data as data_lib
from jaxdp import distributed, keys, rules
from jaxdp.clipping import CLIPPING_IMPLS, ExampleGradFn
from jaxdp.config import ConfigError
from jaxdp.data.augment import multiplicity_loss, random_crop_flip
from jaxdp.models import check_dp_compatible, make_model
from jaxdp.plan import PrivacyPlan, steps_per_epoch
from jaxdp.step import PrivateStep, TrainState, make_private_step

__all__ = [
    "Run",
    "build_model",
    "classification_loss",
    "clipping_impl",
    "config_optimizer",
    "initialize_distributed",
    "make_optimizer",
    "make_plan",
    "privacy_seed",
    "run_steps_per_epoch",
    "setup_run",
    "validate_config",
]


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _check_model_dtype(dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"model.dtype={dtype!r} is invalid: need one of {', '.join(COMPUTE_DTYPES)} (the dtype the model computes "
            "in; parameters, the clipped sum and the noise stay float32)."
        )


def classification_loss(graphdef: nnx.GraphDef, rest: Any, dtype: str | None = None) -> Callable[..., jax.Array]:
    """``loss(params, x, y)``: mean softmax cross-entropy of an NNX model's logits.

    ``dtype`` (a config's ``model.dtype``; None or ``"float32"``: as the parameters are): mixed precision. The
    model computes in ``"bfloat16"`` or ``"float16"``: its floating parameters, state and inputs are cast to it
    on the way in, and the logits back to float32 for the loss. The parameters, their per-example
    gradients' norms, the clipped sum, the noise and the optimizer stay float32 (both clipping paths form
    them in float32: see :mod:`jaxdp.clipping.ghost`, "mixed precision").
    """
    if dtype is not None:
        _check_model_dtype(dtype)
    low = None if dtype in (None, "float32") else jnp.dtype(dtype)

    def cast(v):
        return v.astype(low) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v

    def loss_fn(params, x, y):
        if low is not None:
            params, state, x = jax.tree_util.tree_map(cast, (params, rest, x))
        else:
            state = rest
        logits = nnx.merge(graphdef, params, state)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()

    return loss_fn


def make_optimizer(
    name: str,
    learning_rate: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    lr_boundaries: tuple = (),
    lr_scales: tuple = (),
) -> optax.GradientTransformation:
    """The (public, non-private) optimizer chained after the privatizer.

    ``weight_decay`` adds ``weight_decay * params`` to the noisy gradient (a
    Gaussian prior; post-processing of public parameters, so privacy is unchanged).
    ``lr_boundaries`` / ``lr_scales``: a piecewise-constant step size, multiplied by
    ``lr_scales[i]`` after step ``lr_boundaries[i]`` (cumulative, as
    ``optax.piecewise_constant_schedule``); e.g. ``(600,)`` and ``(0.25,)`` trains
    600 steps at ``learning_rate`` and the rest at a quarter of it. The schedule is
    public: privacy is unchanged.
    """
    if weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay={weight_decay!r} must be >= 0.")
    lr_boundaries, lr_scales = tuple(lr_boundaries or ()), tuple(lr_scales or ())
    if len(lr_boundaries) != len(lr_scales):
        raise ConfigError(
            f"optimizer.lr_boundaries={lr_boundaries!r} and optimizer.lr_scales={lr_scales!r} must have the same "
            "length: one scale per boundary step."
        )
    if any(not isinstance(b, int) or b < 1 for b in lr_boundaries) or list(lr_boundaries) != sorted(set(lr_boundaries)):
        raise ConfigError(f"optimizer.lr_boundaries={lr_boundaries!r} is invalid: need increasing step ints >= 1.")
    if any(not isinstance(s, (int, float)) or not s > 0 for s in lr_scales):
        raise ConfigError(f"optimizer.lr_scales={lr_scales!r} is invalid: need numbers > 0.")
    lr = (
        optax.piecewise_constant_schedule(learning_rate, dict(zip(lr_boundaries, map(float, lr_scales), strict=True)))
        if lr_boundaries
        else learning_rate
    )
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if name == "sgd":
        return optax.chain(*decay, optax.sgd(lr, momentum=momentum or None))
    if name == "adam":
        return optax.chain(*decay, optax.adam(lr))
    if name == "nadam":  # Adam with Nesterov momentum (the BAM authors' optimiser)
        return optax.chain(*decay, optax.nadam(lr))
    raise ConfigError(f"optimizer.name={name!r} is not known; choose 'sgd', 'adam' or 'nadam'.")


def config_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """:func:`make_optimizer` from a config's ``optimizer`` section."""
    o = config.optimizer
    return make_optimizer(
        o.name,
        o.learning_rate,
        o.momentum,
        o.get("weight_decay", 0.0),
        tuple(o.get("lr_boundaries", ())),
        tuple(o.get("lr_scales", ())),
    )


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


def _check_model_takes_data(config: ml_collections.ConfigDict, dataset: Any, params: Any) -> None:
    """Refuse complex features for a model whose parameters are all real (it would fail inside the first step).

    The data itself was checked when it was loaded (:func:`jaxdp.data.validate`); this is the one check that
    needs the model too.
    """
    if not np.issubdtype(np.dtype(dataset.x_train.dtype), np.complexfloating):
        return
    if any(np.iscomplexobj(leaf) for leaf in jax.tree_util.tree_leaves(params)):
        return
    raise ConfigError(
        f"dataset={config.dataset!r} has {np.dtype(dataset.x_train.dtype)} (complex) features but model.name="
        f"{config.model.name!r} has real parameters; use model.name='complex_cnn', or give the real and imaginary "
        "parts as two real channels (see experiments/complex_valued)."
    )


def clipping_impl(config: ml_collections.ConfigDict) -> str:
    """``config.clipping_impl``; configs that predate it get the vmap path."""
    return config.get("clipping_impl", "vmap")


def _config_rule(check, *args, **kwargs):
    """Run a :mod:`jaxdp.rules` check; its ValueError (which names the config key) becomes a ConfigError."""
    try:
        return check(*args, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_config(config: ml_collections.ConfigDict, dataset_size: int | None = None) -> None:
    """Check a config's values; raise ConfigError naming the key. The privacy ones go through :mod:`jaxdp.rules`."""

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
    p = config.privacy
    _config_rule(rules.check_clip_norm, p.l2_clip_norm, "privacy.l2_clip_norm")
    if p.noise_multiplier is not None:  # None: calibrated to privacy.target_epsilon
        _config_rule(rules.check_noise_multiplier, p.noise_multiplier, "privacy.noise_multiplier")
    _config_rule(rules.check_target_epsilon, p.target_epsilon, "privacy.target_epsilon")
    _config_rule(rules.check_delta, p.delta, dataset_size=dataset_size, name="privacy.delta")
    _config_rule(rules.check_bands, p.get("bands", 1), "privacy.bands")
    lr = config.optimizer.learning_rate
    need(isinstance(lr, (int, float)) and lr > 0, "optimizer.learning_rate", lr, "need a number > 0")
    config_optimizer(config)  # the schedule's keys (optimizer.lr_boundaries / lr_scales) name themselves
    if p.noise_seed is not None:  # the secret rule (jaxdp.keys.check_secret), said for a config
        try:
            keys.check_secret(p.noise_seed, "privacy.noise_seed")
        except ValueError:
            raise ConfigError(
                f"privacy.noise_seed={p.noise_seed!r} is invalid: need None (a secret of {keys.SECRET_BITS} bits "
                f"from the OS: the default for real runs) or an int in [0, 2**{keys.SECRET_BITS}) (tests only)."
            ) from None
    k = config.augment.multiplicity
    need(isinstance(k, int) and k >= 0, "augment.multiplicity", k, "need an int >= 0 (0 = no augmentation)")
    mb = config.microbatch_size
    need(isinstance(mb, int) and mb >= 0, "microbatch_size", mb, "need an int >= 0 (0 = no microbatching)")
    pb = config.physical_batch_size
    need(isinstance(pb, int) and pb >= 0, "physical_batch_size", pb, "need an int >= 0 (0 = automatic)")
    mem = config.get("data_memory_mb", 0)
    need(isinstance(mem, (int, float)) and mem >= 0, "data_memory_mb", mem, "need a number >= 0 (0 = no limit)")
    pf = config.get("data_prefetch", 0)
    need(isinstance(pf, int) and pf >= 0, "data_prefetch", pf, "need an int >= 0 (0 = gather in the loop)")
    vs = config.get("validation_size", 0)
    need(isinstance(vs, int) and vs >= 0, "validation_size", vs, "need an int >= 0 (0 = evaluate on the test set)")
    impl = clipping_impl(config)
    need(impl in CLIPPING_IMPLS, "clipping_impl", impl, f"need one of {CLIPPING_IMPLS} (performance only)")
    _check_model_dtype(config.model.get("dtype", "float32"))


def run_steps_per_epoch(config: ml_collections.ConfigDict, dataset_size: int) -> int:
    """Noisy steps per epoch: N / B for Poisson sampling; every example once per epoch for shuffle."""
    if config.sampling == "shuffle":
        return -(-dataset_size // config.batch_size)
    return steps_per_epoch(dataset_size, config.batch_size)


def make_plan(config: ml_collections.ConfigDict, dataset_size: int, steps_per_epoch: int) -> PrivacyPlan:
    """The run's privacy plan (:meth:`jaxdp.PrivacyPlan.from_target` over ``epochs x steps_per_epoch`` steps)."""
    p = config.privacy
    return _config_rule(
        PrivacyPlan.from_target,
        dataset_size=dataset_size,
        batch_size=config.batch_size,
        l2_clip_norm=p.l2_clip_norm,
        planned_steps=config.epochs * steps_per_epoch,
        delta=p.delta,
        target_epsilon=p.target_epsilon,
        noise_multiplier=p.noise_multiplier,
        per_layer=bool(p.per_layer),
        sampling=config.sampling,
        accountant=p.accountant,
        bands=p.get("bands", 1),
        prefix="privacy.",
        verbose=True,
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


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Join a multi-host run when ``config.distributed`` says so (before anything touches a JAX backend)."""
    d = config.distributed
    try:
        distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
    except ValueError as e:  # inconsistent num_processes / process_id: a config error, one line
        raise ConfigError(str(e)) from e


class Run(NamedTuple):
    """What :func:`setup` builds: the data, the plan and the pieces of the step, before the first step."""

    dataset: Any
    plan: PrivacyPlan
    steps_per_epoch: int
    graphdef: Any
    rest: Any
    mesh: Any
    sampler: Any
    state: TrainState
    step: PrivateStep
    secret_seed: int


FEATURES = ("", "scattering")


def _features(config: ml_collections.ConfigDict, dataset):
    """``config.features``: a fixed, data-independent transform of every image (computed once, cached)."""
    if config.features not in FEATURES:
        raise ConfigError(f"features={config.features!r} is invalid: need one of {FEATURES} ('' = the pixels).")
    from jaxdp.data.scattering import scattered

    cache = os.path.join(config.data_dir or os.path.expanduser("~/tensorflow_datasets"), "jaxdp_features")
    if not isinstance(dataset.x_train, np.ndarray):
        raise ConfigError(
            f"features={config.features!r} needs the images in memory, but {config.dataset} is read from disk (it "
            f"is larger than data_memory_mb={config.data_memory_mb}); raise data_memory_mb."
        )
    return scattered(dataset, J=config.get("scattering_J", 2), L=config.get("scattering_L", 8), cache_dir=cache)


def setup_run(
    config: ml_collections.ConfigDict,
    secret_seed: int | None = None,
    example_grad: ExampleGradFn | None = None,
    perturb: Callable[[Any, Any], Any] | None = None,
) -> Run:
    """Everything before the first step (after :func:`jaxdp.train.train` joined a multi-host run). Bad values
    surface here as ConfigError."""
    validate_config(config)  # the keys' values first; then, once the data is known, against its size
    # load() checks the data once (shapes, dtypes, labels in 0..K-1, NaN/inf, empty splits): a DataError, one line.
    dataset = data_lib.load(config.dataset, config.data_dir or None, memory_mb=config.get("data_memory_mb") or None)
    if config.get("features"):
        dataset = _features(config, dataset)
    if config.get("validation_size"):
        try:
            dataset = data_lib.holdout(dataset, config.validation_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    n_train = len(dataset.x_train)
    validate_config(config, n_train)
    epoch_steps = run_steps_per_epoch(config, n_train)
    plan = make_plan(config, n_train, epoch_steps)
    graphdef, params, rest = build_model(config, dataset)
    _check_model_takes_data(config, dataset, params)
    loss_fn = classification_loss(graphdef, rest, config.model.get("dtype"))
    k = config.augment.multiplicity
    if k:
        # Augmentation multiplicity: each example's gradient averages K augmented copies before clipping.
        augment = functools.partial(random_crop_flip, pad=config.augment.crop_pad, flip=config.augment.flip)
        loss_fn = multiplicity_loss(loss_fn, multiplicity=k, augment=augment)
    if secret_seed is None:  # a resumed run passes the seed it saved
        secret_seed = privacy_seed(config.privacy.noise_seed)
    mesh = distributed.make_mesh()
    step = make_private_step(
        plan,
        loss_fn,
        config_optimizer(config),
        noise_key=keys.key_from_secret(secret_seed),
        microbatch_size=config.microbatch_size or None,
        mesh=mesh,
        example_grad=example_grad,
        perturb=perturb,
        clipping_impl=clipping_impl(config),
    )
    sampler = plan.sampler(
        seed=secret_seed + 1, physical_batch_size=config.physical_batch_size or None, multiple_of=mesh.devices.size
    )
    return Run(dataset, plan, epoch_steps, graphdef, rest, mesh, sampler, step.init(params), step, secret_seed)
