"""One private step over a whole Poisson draw: clip every chunk, sum, add the noise once, update.

The data path of one step::

    sampler.steps() -> one draw = fixed-shape chunks (x, y, mask, ...)
      -> clipped_grad on each chunk (vmap/ghost: grad, clip, mask, sum), summed over the chunks
      -> + N(0, (σC)^2) once -> / expected batch size -> optax update -> accountant.step()

:func:`make_private_step` builds the jitted pieces from a :class:`jaxdp.PrivacyPlan`
and returns a :class:`PrivateStep`; :func:`run_private_step` runs one whole draw
(however many chunks it spilled into) and is the only chunk loop in jaxdp: the
training loop, the audit, the benchmarks and the experiments all call it. A user
writing their own loop calls it too (or :meth:`PrivateStep.clipped_sum` to feed
a Flax NNX ``nnx.Optimizer``; README "Your own loop").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdp import distributed
from jaxdp.clipping import ExampleGradFn
from jaxdp.optimizers import dp_optimizer, keep_last_update

if TYPE_CHECKING:
    from jaxdp.accounting import Accountant
    from jaxdp.plan import PrivacyPlan

__all__ = ["PrivateStep", "TrainState", "init_state", "make_nonprivate_step", "make_private_step", "run_private_step"]

#: The per-step metrics :func:`run_private_step` returns (all computed without noise: not covered by ε).
METRIC_KEYS = ("loss_sum", "examples", "clipped", "nonfinite", "norms")


class TrainState(NamedTuple):
    """Everything a step updates: parameters, optimizer state (noise key inside), step."""

    params: Any
    opt_state: Any
    step: jax.Array


def init_state(params: Any, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh | None = None) -> TrainState:
    """``TrainState(params, tx.init(params), 0)``, replicated over ``mesh`` when one is given."""
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    return state if mesh is None else distributed.replicate(mesh, state)


class PrivateStep:
    """The jitted pieces of a DP-SGD step, built by :func:`make_private_step`.

    Attributes:
      tx: ``chain(plan.privatizer(key), conjugate_complex(), optimizer)``: the
        noise is added in ``tx.update`` (its key lives in the optimizer state).
      mesh: the device mesh the batch is sharded over (None: one device).
      step_fn, accumulate_fn: the low-level jitted functions
        ``step_fn(state, acc, x, y, mask, *extra)`` and ``accumulate_fn(...)``;
        :func:`run_private_step` is the way to call them.
    """

    def __init__(self, tx, step_fn, accumulate_fn, mesh, perturbed: bool):
        self.tx = tx
        self.step_fn = step_fn
        self.accumulate_fn = accumulate_fn
        self.mesh = mesh
        self._perturbed = perturbed

    def init(self, params: Any) -> TrainState:
        """The state before the first step (:func:`init_state` with this step's ``tx`` and mesh)."""
        return init_state(params, self.tx, self.mesh)

    def _placed(self, chunk):
        if not isinstance(chunk, (tuple, list)) or len(chunk) < 3:
            raise TypeError(
                f"a chunk must be a tuple (x, y, mask, *extra) of per-example arrays; got {type(chunk).__name__}"
                + (f" of length {len(chunk)}" if isinstance(chunk, (tuple, list)) else "")
                + ". Build chunks from sampler.steps(): [(x[idx], y[idx], mask) for idx, mask in chunks]."
            )
        return tuple(chunk) if self.mesh is None else distributed.shard_batch(self.mesh, tuple(chunk))

    def clipped_sum(self, params: Any, chunks: Sequence[tuple]) -> tuple[Any, dict]:
        """The sum of the clipped per-example gradients of one whole draw, without noise.

        For loops that apply ``tx`` themselves, e.g. Flax NNX's
        ``nnx.Optimizer(model, step.tx, wrt=nnx.Param).update(model, g)``: the
        privatizer at the head of ``tx`` then adds the noise once and averages.
        Never apply the result with an optimizer that is not ``tx``: it has no noise.
        """
        if self._perturbed:
            raise ValueError(
                "clipped_sum: this step was built with perturb=, which reads the previous private gradient from "
                "the optimizer state; use run_private_step(step, state, chunks) instead."
            )
        chunks = _check_chunks(chunks)
        state = TrainState(params, None, jnp.zeros((), jnp.int32))
        acc, metrics = None, []
        for chunk in chunks:
            acc, m = self.accumulate_fn(state, acc, *self._placed(chunk))
            metrics.append(m)
        return acc, merge_metrics(metrics)


def _check_chunks(chunks) -> list:
    chunks = list(chunks)
    if not chunks:
        raise ValueError(
            "run_private_step got no chunks: a draw always has at least one (its padded examples carry mask 0)."
        )
    return chunks


def merge_metrics(metrics: Sequence[dict]) -> dict:
    """One draw's metrics from its chunks': counts summed, per-example norms concatenated."""
    if len(metrics) == 1:
        return metrics[0]
    merged = {k: sum(m[k] for m in metrics) for k in metrics[0] if k != "norms"}
    merged["norms"] = jnp.concatenate([m["norms"] for m in metrics])
    return merged


def run_private_step(
    step: PrivateStep, state: TrainState, chunks: Sequence[tuple], *, accountant: Accountant | None = None
) -> tuple[TrainState, dict]:
    """One private step over a whole Poisson draw; the only chunk loop in jaxdp.

    Args:
      step: from :func:`make_private_step`.
      state: the current :class:`TrainState` (``step.init(params)`` before the first step).
      chunks: the draw's fixed-shape chunks, each ``(x, y, mask, *extra)`` of
        per-example arrays (NumPy or JAX): e.g. ``[(x[idx], y[idx], mask) for
        idx, mask in chunks]`` for one ``(step_index, chunks)`` of
        ``sampler.steps(...)``. With a mesh, each chunk is sharded over it.
      accountant: stepped once after the noisy update, so what it reports is what ran.

    Returns:
      ``(state, metrics)``: ``metrics`` has ``loss_sum``, ``examples``,
      ``clipped``, ``nonfinite`` summed over the draw and ``norms``, the
      per-example norms (NaN where masked). None of them is covered by ε.
    """
    chunks = _check_chunks(chunks)
    acc, metrics = None, []
    for chunk in chunks[:-1]:
        acc, m = step.accumulate_fn(state, acc, *step._placed(chunk))
        metrics.append(m)
    state, m = step.step_fn(state, acc, *step._placed(chunks[-1]))
    metrics.append(m)
    if accountant is not None:
        accountant.step()
    return state, merge_metrics(metrics)


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
) -> PrivateStep:
    """Build the jitted pieces of a DP-SGD step from a plan.

    Args:
      noise_key: a PRNG key, or a secret int (:func:`jaxdp.key_from_secret`;
        draw one with :func:`jaxdp.new_secret`).
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
      a :class:`PrivateStep`; run it with :func:`run_private_step`. Extra
      per-example arrays after ``mask`` in a chunk (e.g. augmentation keys) are
      passed to ``loss_fn`` after ``y``. With a ``mesh``, each device clips its
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

    return PrivateStep(tx, step, accumulate, mesh, perturbed=perturb is not None)


def make_nonprivate_step(loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation):
    """The same model's ordinary jitted step (for throughput comparisons): ``step(state, x, y) -> (state, loss)``."""

    @jax.jit
    def step(state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(state.params, x, y)
        updates, opt_state = optimizer.update(g, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), loss

    return step
