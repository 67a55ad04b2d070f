"""Flax NNX front end: clipped gradients of an NNX module, and one private step with ``nnx.Optimizer``.

Import it as ``from jaxdp import nnx as dpnnx`` (or ``import jaxdp.nnx``); Flax's own
``nnx`` stays ``from flax import nnx``. Everything here is built on the functional
primitives (:func:`jaxdp.clipped_grad`, :func:`jaxdp.make_private_step`) through
``nnx.split`` / ``nnx.merge``; nothing is clipped, noised or accounted twice.

* :func:`value_and_clipped_grad` is the private counterpart of
  ``nnx.value_and_grad(loss_fn, has_aux=...)``: ``loss_fn(model, *batch)`` is the
  ordinary batch loss of the Flax NNX MNIST tutorial, and the gradient it returns
  is the *sum* of the per-example gradients, each clipped to L2 norm C, as an
  ``nnx.State`` of the model's ``nnx.Param``\\ s (``optimizer.update(model, grads)``).
* :func:`make_private_step` and :func:`private_step` run one private step over a
  whole Poisson draw with an ``nnx.Optimizer``: every chunk of the draw is clipped
  and summed, the noise is added once (by the privatizer at the head of
  ``step.tx``), the optimizer is applied once and the accountant stepped once.

Non-``Param`` state (``wrt`` decides what is a parameter): it is **read-only**.
Each example's loss is evaluated on its own (a batch of one), so a change ``loss_fn``
makes to shared state cannot be written back without mixing examples. Every example
sees the model's non-``Param`` state as it is at the call; a ``loss_fn`` that changes
any of it (an RNG stream drawn by ``nnx.Dropout``, BatchNorm running statistics,
``sow``-ed intermediates) raises ``ValueError`` naming the variable. BatchNorm is
refused up front (:func:`jaxdp.models.check_dp_compatible`: it mixes examples; use
GroupNorm or LayerNorm). For dropout, put a key per example in the batch and call the
layer with ``rngs=nnx.Rngs(dropout=key)``, or switch it off (``model.eval()``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxdp import step as steplib
from jaxdp.clipping import ClippedGradAux, ExampleGradFn, batch_argnums, clipped_grad
from jaxdp.models import check_dp_compatible

if TYPE_CHECKING:
    from jaxdp.accounting import Accountant
    from jaxdp.plan import PrivacyPlan

__all__ = ["PrivateStep", "ValueAndClippedGradFn", "make_private_step", "private_step", "value_and_clipped_grad"]


def _check_module(model: Any, where: str) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"{where}: the first argument must be a Flax NNX module (nnx.Module), got {type(model).__name__}. "
            "For a params pytree use jaxdp.clipped_grad(loss_fn(params, *batch), ...)."
        )
    check_dp_compatible(model)


def _path(keypath) -> str:
    parts = []
    for k in keypath:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(name))
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts) or "<root>"


def _merged(graphdef: nnx.GraphDef, params: Any, rest: Any) -> nnx.Module:
    # copy=True: whatever loss_fn writes into the copy cannot leak a tracer into ``rest``.
    return nnx.merge(graphdef, params, rest, copy=True)


def _check_read_only(model: nnx.Module, wrt: Any, rest: Any) -> None:
    """Raise if evaluating the loss changed (or added) any non-``wrt`` state of ``model``."""
    _, _, after = nnx.split(model, wrt, ...)
    before = dict(jax.tree_util.tree_flatten_with_path(rest)[0])
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(after)[0]:
        if before.get(keypath, None) is not leaf:
            raise ValueError(
                f"loss_fn changed the model's non-parameter state '{_path(keypath)}' "
                f"({'added' if keypath not in before else 'updated'} while evaluating one example's loss). "
                "Each example's gradient is taken on its own, so shared state cannot be updated without mixing "
                "examples: non-Param state is read-only in jaxdp.nnx. For dropout, pass a key per example in "
                "the batch and call the layer with rngs=nnx.Rngs(dropout=key), or call model.eval(); "
                "BatchNorm statistics cannot be private (use nnx.GroupNorm or nnx.LayerNorm)."
            )


def _same_value(a: Any, b: Any) -> bool:
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    return bool(jnp.all(a == b))


def _example_axis(x: Any) -> Any:
    """A per-example aux leaf ``(B, 1, ...)`` (a batch of one per example) as ``(B, ...)``."""
    x = jnp.asarray(x)
    return x.reshape(x.shape[:1] + x.shape[2:]) if x.ndim >= 2 and x.shape[1] == 1 else x


class ValueAndClippedGradFn:
    """Callable returned by :func:`value_and_clipped_grad`; knows its own sensitivity.

    Call it as ``fn(model, *batch, example_mask=None)``; it returns
    ``(value, grads, aux)`` (see :func:`value_and_clipped_grad`).
    """

    def __init__(self, loss_fn: Callable[..., Any], *, wrt: Any, **options: Any):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn={loss_fn!r} is not callable; pass loss_fn(model, *batch).")
        self.loss_fn = loss_fn
        self.wrt = wrt
        self.has_aux = bool(options["has_aux"])
        self._batch_argnums = options.pop("batch_argnums")
        self._options = options
        self._fns: dict = {}
        # Checks every option now (clip norm, microbatch size, clipping_impl, ...), with jaxdp.clipped_grad's messages.
        self.l2_clip_norm = clipped_grad(loss_fn, batch_argnums=None, **options).l2_clip_norm

    @property
    def l2_sensitivity(self) -> float:
        """L2 sensitivity of the returned gradient sum under add/remove-one adjacency (= C)."""
        return self.l2_clip_norm

    def _fn(self, graphdef: nnx.GraphDef, num_args: int):
        key = (graphdef, num_args)
        if key not in self._fns:
            nums = batch_argnums(self._batch_argnums, num_args)  # the user's numbering: model = 0, batch from 1
            loss_fn, wrt = self.loss_fn, self.wrt

            def functional_loss(params, rest, *batch):  # rest (non-Param state) is argument 1, never batched
                model = _merged(graphdef, params, rest)
                out = loss_fn(model, *batch)
                _check_read_only(model, wrt, rest)
                return out

            self._fns[key] = clipped_grad(functional_loss, batch_argnums=tuple(n + 1 for n in nums), **self._options)
        return self._fns[key]

    def __call__(
        self, model: nnx.Module, *batch: Any, example_mask: Any = None
    ) -> tuple[Any, nnx.State, ClippedGradAux]:
        _check_module(model, "value_and_clipped_grad")
        if not batch:
            raise TypeError("the clipped gradient function needs a batch: call fn(model, *batch).")
        graphdef, params, rest = nnx.split(model, self.wrt, ...)
        grads, aux = self._fn(graphdef, len(batch))(params, rest, *batch, example_mask=example_mask)
        real = jnp.ones(aux.loss.shape, bool) if example_mask is None else jnp.asarray(example_mask) > 0
        count = jnp.sum(real)
        loss = jnp.sum(jnp.where(real, aux.loss, 0.0)) / jnp.maximum(count, 1)
        value = (loss, jax.tree_util.tree_map(_example_axis, aux.aux)) if self.has_aux else loss
        return value, grads, aux


def value_and_clipped_grad(
    loss_fn: Callable[..., Any],
    *,
    l2_clip_norm: float,
    has_aux: bool = False,
    batch_argnums: int | Sequence[int] | None = None,
    microbatch_size: int | None = None,
    return_norms: bool = False,
    per_layer: bool = False,
    example_grad: ExampleGradFn | None = None,
    clipping_impl: str = "vmap",
    wrt: Any = nnx.Param,
) -> ValueAndClippedGradFn:
    """The private counterpart of ``nnx.value_and_grad``: the sum of per-example clipped gradients of an NNX module.

    ``loss_fn(model, *batch)`` is your ordinary batch loss of a Flax NNX module
    (leading axis of every batch leaf = examples), e.g. the MNIST tutorial's
    ``loss_fn(model, batch) -> (loss, logits)``. The returned function splits the
    model (``nnx.split(model, wrt, ...)``), hands the parameters to
    :func:`jaxdp.clipped_grad` (which evaluates ``loss_fn`` on every example as a
    batch of one, clips each example's gradient to L2 norm ``l2_clip_norm`` and
    sums), and returns the sum as an ``nnx.State`` of the model's parameters, ready
    for ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)`` when ``tx``
    starts with a privatizer (:func:`jaxdp.privatize`, ``plan.privatizer(key)``). It
    works inside ``nnx.jit`` and never changes ``model``.

    Args:
      loss_fn: ``loss_fn(model, *batch) -> scalar`` (``(scalar, aux)`` with ``has_aux=True``).
      l2_clip_norm, batch_argnums, microbatch_size, return_norms, per_layer,
        example_grad, clipping_impl: as :func:`jaxdp.clipped_grad`;
        ``batch_argnums`` counts ``loss_fn``'s arguments with the model as 0.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      wrt: the ``nnx`` filter of the variables to differentiate (``nnx.Param``,
        as ``nnx.Optimizer(..., wrt=nnx.Param)``); all other state is read-only.

    Returns:
      ``fn(model, *batch, example_mask=None) -> (value, grads, aux)``:

      * ``value``: ``loss``, or ``(loss, loss_aux)`` with ``has_aux``; ``loss`` is the
        mean of the per-example losses over the examples with ``example_mask > 0``
        (the batch loss of the real examples for a loss that averages; 0 when there
        are none) and ``loss_aux`` is ``loss_fn``'s aux per example, the batch-of-one
        axis merged into the example axis (logits come back ``(batch, classes)``);
        weight it with the mask (``nnx.metrics`` take ``mask=``). Neither is covered
        by ε: they are computed from the private batch without noise.
      * ``grads``: ``nnx.State`` of the ``wrt`` variables, the sum of the clipped
        per-example gradients (sensitivity ``fn.l2_sensitivity`` = C).
      * ``aux``: :class:`jaxdp.ClippedGradAux` (per-example ``loss`` and ``norms``,
        ``num_clipped``, ``num_nonfinite``; ``aux.aux`` unmerged).

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``; ``loss_fn`` not callable.
      ValueError: the model has BatchNorm; ``loss_fn`` changed non-``wrt`` state
        (an RNG stream, statistics); and every error of :func:`jaxdp.clipped_grad`.

    Guarantees: those of :func:`jaxdp.clipped_grad` (each example's clipped gradient
    has norm ``<= C``; an example with mask 0 contributes exactly zero, whatever its
    data; a non-finite gradient is dropped and counted).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from jaxdp import nnx as dpnnx
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> def loss_fn(model, x, y):
      ...     return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
      >>> grad_fn = dpnnx.value_and_clipped_grad(loss_fn, l2_clip_norm=1.0)
      >>> loss, grads, aux = grad_fn(model, jnp.ones((4, 3)), jnp.zeros(4, jnp.int32))
      >>> sorted(grads.keys()), int(aux.num_clipped) <= 4
      (['bias', 'kernel'], True)
    """
    return ValueAndClippedGradFn(
        loss_fn,
        wrt=wrt,
        l2_clip_norm=l2_clip_norm,
        has_aux=has_aux,
        batch_argnums=batch_argnums,
        microbatch_size=microbatch_size,
        return_norms=return_norms,
        per_layer=per_layer,
        example_grad=example_grad,
        clipping_impl=clipping_impl,
    )


class PrivateStep:
    """One private step of an NNX model, built by :func:`make_private_step`; run it with :func:`private_step`.

    Attributes:
      tx: the transform to build the optimizer with,
        ``nnx.Optimizer(model, step.tx, wrt=step.wrt)``: the privatizer at its head
        adds the noise once per step, then your optimizer runs.
      functional: the :class:`jaxdp.PrivateStep` underneath (over
        ``nnx.state(model, wrt)``), for :func:`jaxdp.run_private_step` users.
      wrt: the filter of the trained variables.
    """

    def __init__(self, functional: steplib.PrivateStep, graphdef: nnx.GraphDef, rest: Any, wrt: Any):
        self.functional = functional
        self.tx = functional.tx
        self.wrt = wrt
        self._graphdef = graphdef
        self._rest = rest
        # The one nnx.Optimizer this step serves (a weak reference): step.tx's init always returns the
        # step's noise key, so a second optimizer on it would draw the same noise again.
        self._optimizer: weakref.ref | None = None

    def check_model(self, model: nnx.Module) -> None:
        """Raise unless ``model`` has the structure and non-parameter state the step was built with."""
        _check_module(model, "private_step")
        graphdef, _, rest = nnx.split(model, self.wrt, ...)
        if graphdef != self._graphdef:
            raise ValueError(
                "private_step: the model's structure or static attributes differ from the model "
                "make_private_step was built with (another model, or model.eval() still on?). Call "
                "model.train() to go back, or build a step for this model with dpnnx.make_private_step."
            )
        before = jax.tree_util.tree_flatten_with_path(self._rest)[0]
        now = jax.tree_util.tree_flatten_with_path(rest)[0]
        for (path, a), (_, b) in zip(before, now, strict=True):
            if a is not b and not _same_value(a, b):
                raise ValueError(
                    f"private_step: the model's non-parameter state '{_path(path)}' changed since make_private_step; "
                    "a private step treats it as read-only (it is compiled into the step). Build the step again "
                    "with dpnnx.make_private_step after changing it."
                )

    def chunk(self, chunk: Sequence[Any]) -> tuple:
        """One NNX chunk ``(*batch, mask)`` in the layout :func:`jaxdp.run_private_step` takes."""
        if not isinstance(chunk, (tuple, list)) or len(chunk) < 2:
            raise TypeError(
                f"a chunk must be a tuple (*batch, mask): loss_fn's arguments after the model, then the 0/1 mask; "
                f"got {type(chunk).__name__}"
                + (f" of length {len(chunk)}" if isinstance(chunk, (tuple, list)) else "")
                + ". Build chunks from sampler.steps(): [(x[idx], y[idx], mask) for idx, mask in chunks]."
            )
        *batch, mask = chunk
        return (tuple(batch), mask, mask)  # jaxdp's (x, y, mask): x = the batch, y unused


def make_private_step(
    plan: PrivacyPlan,
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    noise_key: jax.Array | int,
    has_aux: bool = False,
    microbatch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    example_grad: ExampleGradFn | None = None,
    clipping_impl: str = "vmap",
    wrt: Any = nnx.Param,
) -> PrivateStep:
    """:func:`jaxdp.make_private_step` for a Flax NNX model and its ``loss_fn(model, *batch)``.

    Args:
      plan: the :class:`jaxdp.PrivacyPlan` (clip norm, σ, expected batch size).
      loss_fn: ``loss_fn(model, *batch) -> scalar`` (``(scalar, aux)`` with
        ``has_aux=True``; the aux is ignored here).
      model: the ``nnx.Module`` to train; its structure and non-``wrt`` state are
        compiled into the step (read-only; :func:`private_step` checks them).
      optimizer: any optax optimizer, applied after the noise.
      noise_key, microbatch_size, mesh, example_grad, clipping_impl: as
        :func:`jaxdp.make_private_step`.
      wrt: the filter of the trained variables (``nnx.Param``).

    Returns:
      a :class:`PrivateStep`; build ``nnx.Optimizer(model, step.tx, wrt=nnx.Param)``
      and call :func:`private_step` once per Poisson draw.
    """
    _check_module(model, "make_private_step")
    graphdef, _, rest = nnx.split(model, wrt, ...)
    rest = jax.tree_util.tree_map(lambda leaf: leaf, rest)  # new Variables: later writes to the model stay out

    def functional_loss(params, batch, _mask):  # the chunk (batch, mask, mask) of PrivateStep.chunk
        model = _merged(graphdef, params, rest)
        out = loss_fn(model, *batch)
        _check_read_only(model, wrt, rest)
        return out[0] if has_aux else out

    functional = steplib.make_private_step(
        plan,
        functional_loss,
        optimizer,
        noise_key=noise_key,
        microbatch_size=microbatch_size,
        mesh=mesh,
        example_grad=example_grad,
        clipping_impl=clipping_impl,
    )
    return PrivateStep(functional, graphdef, rest, wrt)


@nnx.jit
def _apply(optimizer: nnx.Optimizer, model: nnx.Module, grads: nnx.State) -> None:
    optimizer.update(model, grads)


def private_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    step: PrivateStep,
    chunks: Sequence[Sequence[Any]],
    *,
    accountant: Accountant | None = None,
) -> dict:
    """One private step over a whole Poisson draw, in place on ``model`` and ``optimizer``.

    Every chunk is clipped and summed (:meth:`jaxdp.PrivateStep.clipped_sum`), then
    ``optimizer.update(model, grads)`` runs once: the privatizer at the head of
    ``step.tx`` adds N(0, (σC)²) once and divides by the expected batch size, your
    optimizer follows. The accountant, if given, is stepped once afterwards. Same
    result as :func:`jaxdp.run_private_step` on ``nnx.state(model, nnx.Param)``.

    Args:
      model: the module ``step`` was built with (same structure, same non-parameter state).
      optimizer: ``nnx.Optimizer(model, step.tx, wrt=step.wrt)``; any other
        transform is refused (it would add no noise).
      step: from :func:`make_private_step`.
      chunks: the draw's fixed-shape chunks, each ``(*batch, mask)``: ``loss_fn``'s
        arguments after the model, then the 0/1 example mask, e.g.
        ``[(x[idx], y[idx], mask) for idx, mask in chunks]`` for one
        ``(step_index, chunks)`` of ``sampler.steps(...)``.
      accountant: stepped once per call, after the noisy update.

    Returns:
      the draw's metrics, as :func:`jaxdp.run_private_step`'s (``loss_sum``,
      ``examples``, ``clipped``, ``nonfinite``, ``norms``; none covered by ε).
    """
    if not isinstance(step, PrivateStep):
        raise TypeError(
            f"step must come from jaxdp.nnx.make_private_step, got {type(step).__name__}; for a "
            "jaxdp.PrivateStep over a params pytree use jaxdp.run_private_step(step, state, chunks)."
        )
    if not isinstance(optimizer, nnx.Optimizer) or optimizer.tx is not step.tx:
        raise ValueError(
            "private_step: the optimizer was not built with step.tx, so its update would add no noise; "
            "build it as nnx.Optimizer(model, step.tx, wrt=nnx.Param)."
        )
    served = step._optimizer() if step._optimizer is not None else None
    if served is None:
        step._optimizer = weakref.ref(optimizer)
    elif served is not optimizer:
        raise ValueError(
            "private_step: a second nnx.Optimizer on this step's tx starts from the same noise key, so its "
            "updates would repeat the first optimizer's noise (which an observer can cancel); keep one optimizer "
            "per step, or build a new step with make_private_step(..., noise_key=jaxdp.new_secret())."
        )
    step.check_model(model)
    chunks = [step.chunk(c) for c in chunks]
    grads, metrics = step.functional.clipped_sum(nnx.state(model, step.wrt), chunks)
    _apply(optimizer, model, grads)
    if accountant is not None:
        accountant.step()
    return metrics
