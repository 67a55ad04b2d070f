"""The vmap path: every example's gradient materialised (``jax.vmap`` of ``jax.grad``), then clipped by :mod:`.core`.

Works for any model, and for a per-example gradient estimator (:data:`ExampleGradFn`).
The loss of one example (:func:`example_loss`, ``loss_fn`` on a batch of one) is
defined here; the ghost path traces the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxdp.clipping.core import ChunkSum, clip_factors, scaled_sum, sq_norm_and_bound

PyTree = Any

__all__ = ["ExampleGradFn", "chunk", "example_grads", "example_loss"]

#: A per-example gradient estimator: ``example_grad(value_and_grad, params) ->
#: ((loss, aux), grad)``. ``value_and_grad(p) -> ((loss, aux), grad)`` evaluates
#: the loss of *one* example at any parameters ``p``; the estimator may call it as
#: often as it likes (e.g. BAM: once at ``params``, once at an ascent point), but it
#: is never given another example, so what it returns is a function of that one
#: example and the clipped sum keeps sensitivity C.
ExampleGradFn = Callable[[Callable[[PyTree], tuple[tuple[jax.Array, Any], PyTree]], PyTree], Any]


def example_loss(
    loss_fn: Callable[..., Any], batched_nums: Sequence[int], *, has_aux: bool
) -> Callable[..., tuple[jax.Array, Any]]:
    """``(p, *args) -> (loss, aux)``: ``loss_fn`` on one example.

    ``args`` are the call's arguments with the batched ones (``batched_nums``, 1-based)
    holding one example without its example axis; each is given back its axis, so
    ``loss_fn`` sees a batch of one. Checks what ``loss_fn`` returns (a real scalar, and
    a ``(loss, aux)`` pair when ``has_aux``).
    """

    def loss_on_one(p, *args):
        call_args = [
            jax.tree_util.tree_map(lambda v: v[None], a) if (i + 1) in batched_nums else a for i, a in enumerate(args)
        ]
        out = loss_fn(p, *call_args)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    "has_aux=True but loss_fn did not return a (loss, aux) pair; return (loss, aux) or set has_aux=False."
                )
            loss, aux = out
        else:
            loss, aux = out, None
        loss = jnp.asarray(loss)
        if jnp.iscomplexobj(loss):
            raise TypeError(
                f"loss_fn returned a complex loss (dtype {loss.dtype}); gradients, clipping and noise need a "
                "real loss. Complex inputs into a real model give complex logits: use a complex model "
                "ending in a real output (e.g. jaxdp.models.ComplexCNN) or feed real features (magnitude, "
                "or real and imaginary parts as channels)."
            )
        if loss.shape not in ((), (1,)):
            raise ValueError(
                f"loss_fn returned shape {loss.shape} on a batch of one example; it must return "
                "a scalar (e.g. the mean loss over the batch)."
            )
        return jnp.reshape(loss, ()), aux

    return loss_on_one


def _one_example(loss_of_one, params, args, example_grad):
    """Loss, aux and gradient of one example (``example_grad``'s estimate when one is set)."""
    value_and_grad = jax.value_and_grad(lambda p: loss_of_one(p, *args), has_aux=True)
    if example_grad is None:
        (loss, aux), grad = value_and_grad(params)
        return loss, aux, grad
    (loss, aux), grad = example_grad(value_and_grad, params)
    want, got = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(grad)
    if want != got:
        raise TypeError(
            f"example_grad returned a gradient with structure {got}, but params have structure {want}; "
            "it must return ((loss, aux), grad) with grad shaped like params."
        )
    return loss, aux, grad


def example_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batched_nums: Sequence[int],
    args: Sequence[Any],
    *,
    has_aux: bool,
    example_grad: ExampleGradFn | None = None,
) -> tuple[jax.Array, Any, PyTree]:
    """``(loss, aux, grads)`` of every example: ``vmap`` over the batched arguments of one example's gradient.

    ``grads`` has the structure of ``params`` with a leading example axis.
    """
    loss_of_one = example_loss(loss_fn, batched_nums, has_aux=has_aux)
    in_axes = (None, *[0 if (i + 1) in batched_nums else None for i in range(len(args))])

    def one(p, *a):
        return _one_example(loss_of_one, p, a, example_grad)

    return jax.vmap(one, in_axes=in_axes)(params, *args)


def chunk(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batched_nums: Sequence[int],
    args: Sequence[Any],
    mask: jax.Array,
    *,
    has_aux: bool,
    example_grad: ExampleGradFn | None,
    l2_clip_norm: float,
    per_layer: bool,
) -> ChunkSum:
    """One chunk of examples on the vmap path: their gradients, clipped (:func:`.core.clip_factors`) and summed."""
    loss, aux, grads = example_grads(loss_fn, params, batched_nums, args, has_aux=has_aux, example_grad=example_grad)
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    # The factor allows for the rounding of each norm's own sum of squares and, for low-precision gradients,
    # for the norm and the sum seeing different roundings.
    leaf_sq, leaf_bound = (list(v) for v in zip(*(sq_norm_and_bound(leaf) for leaf in leaves), strict=True))
    factors, keep, norms, stats = clip_factors(
        leaf_sq, mask, l2_clip_norm=l2_clip_norm, per_layer=per_layer, leaf_bound=leaf_bound
    )
    summed = [scaled_sum(leaf, f, keep, jnp.isfinite(sq)) for leaf, f, sq in zip(leaves, factors, leaf_sq, strict=True)]
    return ChunkSum(jax.tree_util.tree_unflatten(treedef, summed), loss, aux, norms, stats)
