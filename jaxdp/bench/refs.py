"""Reference DP-SGD implementations timed against jaxdp's private step (``pip install 'jaxdp[bench]'``).

Each reference runs one *full* private step on the same architecture, batch and
inputs as jaxdp: per-example gradients, clipping to C = 1, one Gaussian noise draw
(σ = 1), averaging, SGD. Only the clipping/noise implementation differs:

* ``jax_privacy``: ``jax_privacy.clipped_grad`` (sum of clipped per-example
  gradients) + ``jax_privacy.noise_addition.gaussian_privatizer`` + SGD, on our
  Flax model and our :func:`jaxdp.train.classification_loss`.
* ``optax``: ``jax.vmap(jax.grad(loss))`` + ``optax.contrib.differentially_private_aggregate``
  + SGD, again on our model and loss.
* ``opacus``: a PyTorch twin of the model (:mod:`jaxdp.bench.torch_ref`: same
  layers, shapes and parameter count; GroupNorm, weight-standardised convs) made
  private with Opacus's ``PrivacyEngine`` (hooks mode, flat clipping),
  ``torch.set_num_threads`` set to the cores JAX uses.
* ``opacus_ghost``: the same with ``grad_sample_mode="ghost"`` (Opacus's fast gradient
  clipping: norms from hooks, then a second backward pass of the rescaled loss).

The models are those of :data:`REFERENCE_MODELS` in :data:`jaxdp.bench.models.MODELS`
(the ones with a PyTorch twin), on :func:`jaxdp.bench.models.random_batch` inputs.
A reference is a callable ``(model_name, batch, repeats) -> dict`` with keys
``ex_per_s``, ``compile_s`` (first step, compilation included), ``params`` and
``notes``; :data:`REFERENCES` maps names to them, :func:`jaxdp_private` times
jaxdp's own step with the same signature. A missing package raises
``ImportError`` saying what to install. For side-by-side ratios build the
runners (:data:`BUILDERS`) and time their ``step`` with
:func:`jaxdp.bench.time_interleaved` (what ``benchmarks/bench_refs.py`` does).

None of this is needed by the library or its tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdp
from jaxdp.bench.models import MODELS, param_count, random_batch, split_model
from jaxdp.bench.timing import time_interleaved
from jaxdp.keys import key_from_secret

__all__ = [
    "BUILDERS",
    "REFERENCES",
    "REFERENCE_MODELS",
    "Runner",
    "build_jax_privacy",
    "build_jaxdp",
    "build_opacus",
    "build_optax",
    "jaxdp_private",
]

L2_CLIP = 1.0
NOISE_MULTIPLIER = 1.0
LEARNING_RATE = 0.1
#: The models with a PyTorch twin in :mod:`jaxdp.bench.torch_ref`: every reference runs on these.
REFERENCE_MODELS = ("mnist_cnn", "wrn16_4")
_INSTALL = "pip install 'jaxdp[bench]'  (or: pip install jax-privacy opacus torch)"


def _require(module: str, package: str):
    """Import ``module`` or raise an ImportError that names the package and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the '{package}' reference needs the package {package!r}, which is not installed ({e}). "
            f"Install the benchmark extra: {_INSTALL}. The library and its tests never need it."
        ) from e


def _check_model(model_name: str) -> None:
    if model_name in REFERENCE_MODELS:
        return
    if model_name == "transformer":
        raise NotImplementedError(
            "model_name='transformer' is not wired into the reference benchmark yet: it needs "
            "jaxdp.models.TransformerClassifier and a PyTorch twin for Opacus. Use 'mnist_cnn' or 'wrn16_4'."
        )
    why = "has no PyTorch twin for the references" if model_name in MODELS else "is not known"
    raise ValueError(f"model_name={model_name!r} {why}; choose one of {', '.join(REFERENCE_MODELS)}.")


def _problem(model_name: str, batch: int, seed: int):
    """The model's params and loss, and one random batch on the device: the same for every implementation."""
    _check_model(model_name)
    spec = MODELS[model_name]
    _, params, _, loss_fn = split_model(model_name, seed)
    x, y = (jnp.asarray(a) for a in random_batch(spec.input_shape, spec.num_classes, batch, seed))
    return params, loss_fn, x, y


@dataclasses.dataclass
class Runner:
    """One implementation, built and warmed up: ``step()`` runs one full private step.

    ``step`` returns something :func:`jax.block_until_ready` waits on (``None``
    for synchronous PyTorch). ``compile_s`` is the first step's wall time.
    """

    name: str
    step: Callable[[], Any]
    batch: int
    params: int
    compile_s: float
    notes: str = ""


def _first_call(step: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(step())
    return time.perf_counter() - t0


def _optax_runner(name: str, p_step, params, tx: optax.GradientTransformation, x, y, notes: str) -> Runner:
    """A peer's jitted ``p_step(params, opt_state, x, y) -> (params, opt_state, out)``, stepped on one fixed batch."""
    state = [params, tx.init(params)]

    def step():
        state[0], state[1], out = p_step(state[0], state[1], x, y)
        return out

    return Runner(name, step, len(x), param_count(params), _first_call(step), notes)


def build_jaxdp(model_name: str, batch: int, *, seed: int = 0) -> Runner:
    """jaxdp's private step exactly as ``jaxdp train`` runs it (:func:`jaxdp.run_private_step`)."""
    params, loss_fn, x, y = _problem(model_name, batch, seed)
    chunks = [(x, y, jnp.ones((batch,), jnp.float32))]
    plan = jaxdp.PrivacyPlan(
        dataset_size=max(60000, batch),
        batch_size=batch,
        l2_clip_norm=L2_CLIP,
        noise_multiplier=NOISE_MULTIPLIER,
        num_steps=1,
    )
    p_step = jaxdp.make_private_step(plan, loss_fn, optax.sgd(LEARNING_RATE), noise_key=key_from_secret(seed))
    state = [p_step.init(params)]

    def step():
        state[0], metrics = jaxdp.run_private_step(p_step, state[0], chunks)
        return metrics["loss_sum"]

    return Runner(
        "jaxdp", step, batch, param_count(params), _first_call(step), "run_private_step (returns loss, norms)"
    )


def build_jax_privacy(model_name: str, batch: int, *, seed: int = 0, with_aux: bool = False) -> Runner:
    """``jax_privacy.clipped_grad`` + ``gaussian_privatizer`` + SGD on our model and loss.

    ``with_aux`` also returns per-example losses and norms, as jaxdp's step does
    (off by default: its cheapest configuration is the fair reference).
    """
    jp = _require("jax_privacy", "jax-privacy")
    noise_addition = _require("jax_privacy.noise_addition", "jax-privacy")

    params, loss_fn, x, y = _problem(model_name, batch, seed)
    grad_fn = jp.clipped_grad(
        loss_fn, l2_clip_norm=L2_CLIP, batch_argnums=(1, 2), return_values=with_aux, return_grad_norms=with_aux
    )
    tx = optax.chain(
        noise_addition.gaussian_privatizer(stddev=NOISE_MULTIPLIER * L2_CLIP, prng_key=key_from_secret(seed)),
        optax.scale(1.0 / batch),
        optax.sgd(LEARNING_RATE),
    )

    @jax.jit
    def p_step(params, opt_state, x, y):
        if with_aux:
            g, aux = grad_fn(params, x, y)
            out = jnp.sum(aux.values)
        else:
            g = grad_fn(params, x, y)
            out = g
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, out

    notes = f"jax-privacy {getattr(jp, '__version__', '?')}: clipped_grad + gaussian_privatizer"
    return _optax_runner(
        "jax_privacy", p_step, params, tx, x, y, notes + (" (returns loss, norms)" if with_aux else "")
    )


def build_optax(model_name: str, batch: int, *, seed: int = 0) -> Runner:
    """``vmap(grad)`` per-example gradients + ``optax.contrib.differentially_private_aggregate`` + SGD."""
    from optax import contrib

    params, loss_fn, x, y = _problem(model_name, batch, seed)
    tx = optax.chain(
        contrib.differentially_private_aggregate(L2_CLIP, NOISE_MULTIPLIER, key=key_from_secret(seed)),
        optax.sgd(LEARNING_RATE),
    )
    one = jax.value_and_grad(lambda p, xi, yi: loss_fn(p, xi[None], yi[None]))

    @jax.jit
    def p_step(params, opt_state, x, y):
        losses, per_example = jax.vmap(one, in_axes=(None, 0, 0))(params, x, y)
        updates, opt_state = tx.update(per_example, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.sum(losses)

    notes = f"optax {optax.__version__}: vmap(grad) + contrib.differentially_private_aggregate"
    return _optax_runner("optax", p_step, params, tx, x, y, notes)


def build_opacus(
    model_name: str, batch: int, *, seed: int = 0, threads: int | None = None, mode: str = "hooks"
) -> Runner:
    """The PyTorch twin of the model made private by Opacus's ``PrivacyEngine`` (flat clipping).

    ``mode``: Opacus's ``grad_sample_mode``: ``"hooks"`` (per-sample gradients from hooks) or
    ``"ghost"`` (its fast gradient clipping: per-sample norms from hooks, then a second backward
    pass of the rescaled loss).
    """
    if mode not in ("hooks", "ghost"):
        raise ValueError(f"mode={mode!r}: Opacus's grad_sample_mode here is 'hooks' or 'ghost'.")
    torch = _require("torch", "torch")
    opacus = _require("opacus", "opacus")
    from jaxdp.bench import torch_ref

    _check_model(model_name)
    spec = MODELS[model_name]
    threads = threads or _jax_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = torch_ref.make(model_name)
    x_np, y_np = random_batch(spec.input_shape, spec.num_classes, batch, seed)
    x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
    y = torch.from_numpy(y_np.astype(np.int64))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    criterion = torch.nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # secure_mode=False (Opacus's default, its fast path) warns once at construction.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = opacus.PrivacyEngine()
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=L2_CLIP,
            poisson_sampling=False,  # we feed the same fixed batch; the step's work is unchanged
            grad_sample_mode=mode,
        )
    model, optimizer = made[0], made[1]
    if mode == "ghost":  # its criterion wraps the two backward passes
        criterion = made[2]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        with warnings.catch_warnings():
            # The inputs do not require grad, so torch notes its full backward hooks fire on module outputs only.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            loss.backward()
        optimizer.step()
        return None

    compile_s = _first_call(step)
    return Runner(
        "opacus" if mode == "hooks" else "opacus_ghost",
        step,
        batch,
        sum(p.numel() for p in model.parameters()),
        compile_s,
        f"opacus {opacus.__version__} ({mode}), torch {torch.__version__}, {threads} threads",
    )


def build_opacus_ghost(model_name: str, batch: int, *, seed: int = 0, threads: int | None = None) -> Runner:
    """Opacus with ``grad_sample_mode="ghost"`` (its fast gradient clipping), else as :func:`build_opacus`."""
    return build_opacus(model_name, batch, seed=seed, threads=threads, mode="ghost")


BUILDERS: dict[str, Callable[..., Runner]] = {
    "jaxdp": build_jaxdp,
    "jax_privacy": build_jax_privacy,
    "optax": build_optax,
    "opacus": build_opacus,
    "opacus_ghost": build_opacus_ghost,
}


def _jax_threads() -> int:
    """Cores XLA's CPU backend uses by default: all the process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _measure(builder: Callable[..., Runner]) -> Callable[[str, int, int], dict]:
    def measure(model_name: str, batch: int, repeats: int) -> dict:
        runner = builder(model_name, batch)
        t = time_interleaved({runner.name: runner.step}, repeats, warmup=False)[runner.name]  # built = warmed up
        return {
            "ex_per_s": batch / t.seconds,
            "compile_s": runner.compile_s,
            "params": runner.params,
            "notes": runner.notes,
        }

    measure.__name__ = measure.__qualname__ = f"measure_{builder.__name__.removeprefix('build_')}"
    measure.__doc__ = f"Examples/s of one full private step, median of ``repeats`` blocks. {builder.__doc__}"
    return measure


jaxdp_private = _measure(build_jaxdp)

REFERENCES: dict[str, Callable[[str, int, int], dict]] = {
    "jax_privacy": _measure(build_jax_privacy),
    "optax": _measure(build_optax),
    "opacus": _measure(build_opacus),
    "opacus_ghost": _measure(build_opacus_ghost),
}
