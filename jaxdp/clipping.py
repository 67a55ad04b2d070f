"""Clipped per-example gradients: ``vmap`` of ``grad``, clipped, masked, summed.

The one function users need is :func:`clipped_grad`. It turns an ordinary batch
loss ``loss_fn(params, *batch)`` into a function that returns the **sum** of the
per-example gradients, each clipped to L2 norm at most ``l2_clip_norm``. The
result has L2 sensitivity ``l2_clip_norm`` under add/remove-one adjacency, which
is what :func:`jaxdp.privatize` adds noise for.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdp import _ghost
from jaxdp._ghost import GhostUnsupported

PyTree = Any

#: The clipping implementations :func:`clipped_grad` accepts (see its docstring).
CLIPPING_IMPLS = ("vmap", "ghost", "auto")


_log = logging.getLogger("jaxdp")


__all__ = [
    "CLIPPING_IMPLS",
    "ClippedGradAux",
    "ClippedGradFn",
    "ExampleGradFn",
    "GhostUnsupported",
    "clipped_grad",
    "gradient_norm_stats",
    "per_example_norms",
]

#: A per-example gradient estimator: ``example_grad(value_and_grad, params) ->
#: ((loss, aux), grad)``. ``value_and_grad(p) -> ((loss, aux), grad)`` evaluates
#: the loss of *one* example at any parameters ``p``; the estimator may call it as
#: often as it likes (e.g. BAM: once at ``params``, once at an ascent point), but it
#: is never given another example, so what it returns is a function of that one
#: example and the clipped sum keeps sensitivity C.
ExampleGradFn = Callable[[Callable[[PyTree], tuple[tuple[jax.Array, Any], PyTree]], PyTree], Any]


class ClippedGradAux(NamedTuple):
    """What :func:`clipped_grad` reports beside the clipped sum.

    Attributes:
      loss: per-example loss values, shape ``(batch,)`` (masked examples included,
        as computed; weight them with the mask yourself).
      norms: per-example gradient L2 norms *before* clipping, shape ``(batch,)``,
        or ``None`` unless ``return_norms=True``. Non-finite gradients report
        ``inf`` or ``nan`` here.
      aux: the per-example auxiliary output of ``loss_fn`` (leading axis = batch)
        when ``has_aux=True``, else ``None``.
      num_clipped: number of unmasked examples whose gradient was scaled down.
      num_nonfinite: number of unmasked examples whose gradient had a NaN or inf;
        they are dropped from the sum (they contribute exactly zero).
    """

    loss: jax.Array
    norms: jax.Array | None
    aux: Any
    num_clipped: jax.Array
    num_nonfinite: jax.Array


def _check_clip_norm(l2_clip_norm: float) -> float:
    try:
        value = float(l2_clip_norm)
    except (TypeError, ValueError):
        raise TypeError(
            f"l2_clip_norm={l2_clip_norm!r} must be a Python number (the clipping bound C); pass e.g. l2_clip_norm=1.0."
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"l2_clip_norm={l2_clip_norm!r} is not a finite positive number. The clipping "
            "bound C sets the sensitivity of the gradient sum, so it must satisfy 0 < C < inf; "
            "pass e.g. l2_clip_norm=1.0."
        )
    return value


def _sq_norm_per_example(leaf: jax.Array) -> jax.Array:
    """Squared L2 norm of each example's slice of ``leaf`` (complex: |re|^2 + |im|^2)."""
    leaf = jnp.abs(leaf) if jnp.iscomplexobj(leaf) else leaf
    leaf = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
    return jnp.sum(jnp.square(leaf), axis=tuple(range(1, leaf.ndim)))


def _scaled_sum(per_example: jax.Array, factor: jax.Array, keep: jax.Array) -> jax.Array:
    """``sum_i factor_i * g_i`` over the kept examples of a (B, ...) leaf."""
    # Scale and sum in at least float32: in bfloat16 the rounding of
    # g * (C / ||g||) can land above C (measured: 1.0028 for C = 1).
    per_example = per_example.astype(jnp.promote_types(per_example.dtype, jnp.float32))
    w = jnp.where(keep, factor, 0.0).astype(per_example.real.dtype)
    shape = (-1,) + (1,) * (per_example.ndim - 1)
    # `where` (not a multiply) so a NaN/inf gradient of a dropped example
    # contributes exactly zero instead of NaN.
    contrib = jnp.where(keep.reshape(shape), per_example * w.reshape(shape), jnp.zeros((), per_example.dtype))
    return jnp.sum(contrib, axis=0)


def per_example_norms(per_example_grads: PyTree) -> jax.Array:
    """L2 norm of each example's gradient over all leaves of a batched pytree.

    Args:
      per_example_grads: pytree whose leaves have a leading example axis.

    Returns:
      ``(batch,)`` float array. Complex leaves count real and imaginary parts.
    """
    leaves = jax.tree_util.tree_leaves(per_example_grads)
    if not leaves:
        raise ValueError("per_example_grads has no leaves: there is nothing to take the norm of.")
    return jnp.sqrt(sum(_sq_norm_per_example(leaf) for leaf in leaves))


def _normalise_argnums(batch_argnums: int | Sequence[int] | None, num_args: int) -> tuple[int, ...]:
    if batch_argnums is None:
        return tuple(range(1, num_args + 1))
    nums = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
    for n in nums:
        if not isinstance(n, int) or n < 1 or n > num_args:
            raise ValueError(
                f"batch_argnums={batch_argnums!r} names argument {n!r}, but loss_fn was called "
                f"with params plus {num_args} argument(s): valid batch argnums are 1..{num_args} "
                "(0 is params, which is never batched)."
            )
    return nums


class ClippedGradFn:
    """Callable returned by :func:`clipped_grad`; knows its own sensitivity.

    Call it as ``fn(params, *batch, example_mask=None)``; it returns
    ``(grad_sum, aux)`` where ``grad_sum`` has the structure of ``params`` and
    ``aux`` is a :class:`ClippedGradAux`.
    """

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        *,
        l2_clip_norm: float,
        batch_argnums: int | Sequence[int] | None,
        has_aux: bool,
        microbatch_size: int | None,
        return_norms: bool,
        per_layer: bool,
        example_grad: ExampleGradFn | None = None,
        clipping_impl: str = "vmap",
    ):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn={loss_fn!r} is not callable; pass loss_fn(params, *batch).")
        self.loss_fn = loss_fn
        self.l2_clip_norm = _check_clip_norm(l2_clip_norm)
        if microbatch_size is not None and (
            not isinstance(microbatch_size, int) or isinstance(microbatch_size, bool) or microbatch_size < 1
        ):
            raise ValueError(
                f"microbatch_size={microbatch_size!r} must be a positive int (examples per chunk) "
                "or None to process the whole batch at once."
            )
        self.batch_argnums = batch_argnums
        self.has_aux = bool(has_aux)
        self.microbatch_size = microbatch_size
        self.return_norms = bool(return_norms)
        self.per_layer = bool(per_layer)
        if example_grad is not None and not callable(example_grad):
            raise TypeError(
                f"example_grad={example_grad!r} is not callable; pass example_grad(value_and_grad, params) -> "
                "((loss, aux), grad), or None for the plain per-example gradient."
            )
        self.example_grad = example_grad
        if clipping_impl not in CLIPPING_IMPLS:
            raise ValueError(
                f"clipping_impl={clipping_impl!r} is not one of {CLIPPING_IMPLS}: 'vmap' materialises per-example "
                "gradients (any model), 'ghost' takes per-example norms without them (dense, conv, embedding, "
                "bias and scale parameters), 'auto' uses ghost where every parameter is covered, else vmap."
            )
        if clipping_impl == "ghost" and example_grad is not None:
            raise ValueError(
                "clipping_impl='ghost' cannot clip a custom example_grad estimator (its gradient is not a single "
                "backward pass); use clipping_impl='vmap' or 'auto' (which uses vmap for it)."
            )
        self.clipping_impl = clipping_impl
        self._fallback_said = False

    @property
    def l2_sensitivity(self) -> float:
        """L2 sensitivity of the returned sum under add/remove-one adjacency (= C)."""
        return self.l2_clip_norm

    # -- one example -------------------------------------------------------
    def _loss_on_one(self, batched_nums, args):
        """``p -> (loss, aux)`` of ``loss_fn`` on one example (``args``' batched entries without their example axis)."""

        def loss_on_one(p):
            call_args = [
                jax.tree_util.tree_map(lambda v: v[None], a) if (i + 1) in batched_nums else a
                for i, a in enumerate(args)
            ]
            out = self.loss_fn(p, *call_args)
            if self.has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        "has_aux=True but loss_fn did not return a (loss, aux) pair; return "
                        "(loss, aux) or set has_aux=False."
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

    def _single_example(self, params, batched_nums, args):
        """Loss, aux and gradient of ``loss_fn`` on one example (a batch of one)."""
        value_and_grad = jax.value_and_grad(self._loss_on_one(batched_nums, args), has_aux=True)
        if self.example_grad is None:
            (loss, aux), grad = value_and_grad(params)
            return loss, aux, grad
        (loss, aux), grad = self.example_grad(value_and_grad, params)
        want, got = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(grad)
        if want != got:
            raise TypeError(
                f"example_grad returned a gradient with structure {got}, but params have structure {want}; "
                "it must return ((loss, aux), grad) with grad shaped like params."
            )
        return loss, aux, grad

    def per_example_grads(self, params: PyTree, *batch: Any) -> tuple[PyTree, jax.Array]:
        """The per-example gradients this function clips, before clipping (for inspection and tests).

        Returns ``(grads, loss)``: ``grads`` has the structure of ``params`` with a
        leading example axis (the output of ``example_grad`` when one is set), and
        ``loss`` is the per-example loss. Materialises every example's gradient:
        use it on small batches.
        """
        loss, _, grads = self._per_example(params, _normalise_argnums(self.batch_argnums, len(batch)), batch)
        return grads, loss

    def _per_example(self, params, batched_nums, args):
        """``(loss, aux, grads)`` of every example, ``vmap`` of :meth:`_single_example`."""
        in_axes = (None, *[0 if (i + 1) in batched_nums else None for i in range(len(args))])

        def one(p, *a):
            return self._single_example(p, batched_nums, a)

        return jax.vmap(one, in_axes=in_axes)(params, *args)

    # -- one chunk of examples --------------------------------------------
    def _weights(self, leaf_sq, mask, leaf_bound=None):
        """Clip factors per leaf, the kept examples, the norms and the counters, from per-leaf squared norms.

        ``leaf_bound`` (ghost path): upper bounds of the squared norms under rounding, used for
        the factors (the reported norms stay the estimates ``leaf_sq``).
        """
        leaf_bound = leaf_sq if leaf_bound is None else leaf_bound
        total_sq, total_bound = sum(leaf_sq), sum(leaf_bound)
        # A closed-form estimate whose terms cancel can round below zero: that example is finite
        # (its bound, not the estimate, sets the factor), never dropped as NaN.
        norms = jnp.sqrt(jnp.maximum(total_sq, 0.0))
        bound = jnp.sqrt(jnp.maximum(total_bound, 0.0))
        clip = self.l2_clip_norm
        finite = jnp.isfinite(total_sq) & jnp.isfinite(total_bound)
        if self.per_layer:
            # Each of the K leaves gets budget C / sqrt(K): the total stays <= C.
            budget = clip / math.sqrt(len(leaf_sq))
            factors = [jnp.minimum(1.0, budget / jnp.maximum(jnp.sqrt(jnp.maximum(s, 0.0)), 1e-30)) for s in leaf_bound]
            clipped_any = sum((f < 1.0).astype(jnp.int32) for f in factors) > 0
        else:
            factor = jnp.minimum(1.0, clip / jnp.maximum(bound, 1e-30))
            factors = [factor] * len(leaf_sq)
            clipped_any = factor < 1.0
        keep = finite & (mask > 0)
        unmasked = mask > 0
        stats = (
            jnp.sum(clipped_any & finite & unmasked).astype(jnp.int32),
            jnp.sum(~finite & unmasked).astype(jnp.int32),
        )
        return factors, keep, norms, stats

    def _chunk(self, params, batched_nums, args, mask, plan=None):
        if plan is not None:
            return self._ghost_chunk(params, batched_nums, args, mask, plan)
        loss, aux, grads = self._per_example(params, batched_nums, args)
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        factors, keep, norms, stats = self._weights([_sq_norm_per_example(leaf) for leaf in leaves], mask)
        summed = [_scaled_sum(leaf, f, keep) for leaf, f in zip(leaves, factors, strict=True)]
        grad_sum = jax.tree_util.tree_unflatten(treedef, summed)
        return grad_sum, loss, aux, norms, stats

    # -- ghost clipping ----------------------------------------------------
    def _ghost_plan(self, params, batched_nums, args):
        """The analysed one-example loss for the ghost path, or None to use vmap (``auto``, not covered)."""
        if self.clipping_impl == "vmap":
            return None
        if self.example_grad is not None:  # 'ghost' refused it in __init__
            reason = "a custom example_grad estimator is set"
        else:
            try:
                plan = self._analyse(batched_nums, params, args)
                if self.clipping_impl == "auto":
                    self._trace_ghost(plan, batched_nums, params, args)
                return plan
            except _ghost.GhostUnsupported as e:
                if self.clipping_impl == "ghost":
                    raise
                reason = str(e)
        if not self._fallback_said:
            self._fallback_said = True
            _log.warning("clipping_impl='auto': using the vmap path because %s", reason)
        return None

    def ghost_coverage(self, params: PyTree, *batch: Any) -> str | None:
        """``None`` when ``clipping_impl="ghost"`` covers this loss, else why not (what ``"auto"`` would log).

        Only traces (abstractly); nothing is computed.
        """
        if self.example_grad is not None:
            return "a custom example_grad estimator is set"
        batched_nums = _normalise_argnums(self.batch_argnums, len(batch))
        try:
            self._trace_ghost(self._analyse(batched_nums, params, batch), batched_nums, params, batch)
        except _ghost.GhostUnsupported as e:
            return str(e)
        return None

    def _trace_ghost(self, plan, batched_nums, params, args):
        """``auto``: trace the whole ghost chunk abstractly; a failure is a reason to use vmap, not an error."""

        def abstract(v):
            return jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) if hasattr(v, "shape") else v

        size = jax.tree_util.tree_leaves(args[batched_nums[0] - 1])[0].shape[0]
        try:
            jax.eval_shape(
                lambda p, a: self._ghost_chunk(p, batched_nums, a, jnp.ones((size,), jnp.float32), plan),
                jax.tree_util.tree_map(abstract, params),
                jax.tree_util.tree_map(abstract, list(args)),
            )
        except Exception as e:  # anything: auto must never fail where vmap works
            raise _ghost.GhostUnsupported(f"the ghost path did not trace ({type(e).__name__}: {e})") from e

    def _analyse(self, batched_nums, params, args):
        """The one-example loss traced and its parameter uses checked (:func:`jaxdp._ghost.analyse`)."""
        one = [
            jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v)[1:], jnp.result_type(v)), a)
            if (i + 1) in batched_nums
            else a
            for i, a in enumerate(args)
        ]
        return _ghost.analyse(lambda p, *a: self._loss_on_one(batched_nums, a)(p), params, one)

    def _ghost_chunk(self, params, batched_nums, args, mask, plan):
        closed, sites, out_tree = plan
        names = _ghost.leaf_names(params)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        size = mask.shape[0]
        in_axes = (0, *[0 if (i + 1) in batched_nums else None for i in range(len(args))])

        def one(probes, *a):
            outs, operands = _ghost.run_with_probes(closed, sites, names, leaves + jax.tree_util.tree_leaves(a), probes)
            loss, aux = jax.tree_util.tree_unflatten(out_tree, outs)
            return loss, aux, operands

        def total(probes):
            loss, aux, operands = jax.vmap(one, in_axes=in_axes)(probes, *args)
            return jnp.sum(loss.astype(jnp.float32)), (loss, aux, operands)

        probes = [jnp.zeros((size, *s.out_shape), s.out_dtype) for s in sites]
        _, vjp_fn, (loss, aux, operands) = jax.vjp(total, probes, has_aux=True)
        (cotangents,) = vjp_fn(jnp.ones((), jnp.float32))

        leaf_sq = [jnp.zeros((size,), jnp.float32) for _ in leaves]
        leaf_bound = list(leaf_sq)
        materialised, fallbacks = {}, {}
        for k, site in enumerate(sites):
            sq, bound, per_ex, fallback = _ghost.site_norms(site, leaves[site.leaf], operands[k], cotangents[k], mask)
            leaf_sq[site.leaf], leaf_bound[site.leaf] = sq, bound
            if per_ex is not None:
                materialised[k] = per_ex
            if fallback is not None:
                fallbacks[k] = fallback
        factors, keep, norms, stats = self._weights(leaf_sq, mask, leaf_bound)

        def kept(x):
            # `where` (not a multiply): a dropped example's NaN/inf contributes exactly zero.
            return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))

        def weighted_backward(k, site, w):
            g = cotangents[k]
            g_w = kept(g * w.astype(jnp.promote_types(g.dtype, jnp.float32)).reshape((-1,) + (1,) * (g.ndim - 1)))
            return _ghost.site_weighted_sum(site, leaves[site.leaf], [kept(o) for o in operands[k]], g_w)

        summed = [jnp.zeros(leaf.shape, jnp.promote_types(leaf.dtype, jnp.float32)) for leaf in leaves]
        for k, site in enumerate(sites):
            if k in materialised:  # the gradients whose norms were taken, scaled and summed (as on the vmap path)
                total_k = _scaled_sum(materialised[k], factors[site.leaf], keep)
            elif k in fallbacks:  # norms from each example's own X^T G when fb.use: then sum those products
                w, fb = jnp.where(keep, factors[site.leaf], 0.0), fallbacks[k]
                total_k = jax.lax.cond(
                    fb.use,
                    functools.partial(fb.weighted_sum, w, keep),
                    functools.partial(weighted_backward, k, site, w),
                )
            else:
                total_k = weighted_backward(k, site, jnp.where(keep, factors[site.leaf], 0.0))
            summed[site.leaf] = total_k.astype(summed[site.leaf].dtype)
        grad_sum = jax.tree_util.tree_unflatten(treedef, summed)
        return grad_sum, loss, aux, norms, stats

    def __call__(self, params: PyTree, *batch: Any, example_mask: Any = None):
        if not batch:
            raise TypeError("the clipped gradient function needs a batch: call fn(params, *batch).")
        batched_nums = _normalise_argnums(self.batch_argnums, len(batch))
        sizes = {leaf.shape[0] for n in batched_nums for leaf in jax.tree_util.tree_leaves(batch[n - 1])}
        if len(sizes) != 1:
            raise ValueError(
                f"batched arguments {batched_nums} have different leading (example) sizes {sorted(sizes)}; "
                "every batched argument needs the same number of examples."
            )
        (size,) = sizes
        if example_mask is None:
            mask = jnp.ones((size,), jnp.float32)
        else:
            mask = jnp.asarray(example_mask)
            if mask.shape != (size,):
                raise ValueError(
                    f"example_mask has shape {mask.shape}, expected ({size},): one 0/1 weight per example."
                )
        plan = self._ghost_plan(params, batched_nums, batch)
        if self.microbatch_size is None or self.microbatch_size >= size:
            grad_sum, loss, aux, norms, (n_clip, n_bad) = self._chunk(params, batched_nums, batch, mask, plan)
        else:
            grad_sum, loss, aux, norms, (n_clip, n_bad) = self._scan(params, batched_nums, batch, mask, size, plan)
        return grad_sum, ClippedGradAux(
            loss=loss,
            norms=norms if self.return_norms else None,
            aux=aux,
            num_clipped=n_clip,
            num_nonfinite=n_bad,
        )

    def _scan(self, params, batched_nums, batch, mask, size, plan=None):
        m = self.microbatch_size
        chunks = -(-size // m)
        pad = chunks * m - size

        def split(x):
            # Pad with copies of the first example (masked out below), then chunk.
            if pad:
                x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)], axis=0)
            return x.reshape((chunks, m) + x.shape[1:])

        args = list(batch)
        for n in batched_nums:
            args[n - 1] = jax.tree_util.tree_map(split, args[n - 1])
        mask_c = jnp.concatenate([mask, jnp.zeros((pad,), mask.dtype)]).reshape(chunks, m)

        def body(acc, xs):
            chunk_batched, chunk_mask = xs
            chunk_args = list(args)
            for n, v in zip(batched_nums, chunk_batched, strict=True):
                chunk_args[n - 1] = v
            g, loss, aux, norms, stats = self._chunk(params, batched_nums, chunk_args, chunk_mask, plan)
            acc = jax.tree_util.tree_map(jnp.add, acc, g)
            return acc, (loss, aux, norms, stats)

        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
        xs = (tuple(args[n - 1] for n in batched_nums), mask_c)
        grad_sum, (loss, aux, norms, stats) = jax.lax.scan(body, zeros, xs)

        def unchunk(x):
            return x.reshape((chunks * m,) + x.shape[2:])[:size]

        loss, aux, norms = jax.tree_util.tree_map(unchunk, (loss, aux, norms))
        stats = tuple(jnp.sum(s) for s in stats)
        return grad_sum, loss, aux, norms, stats


def clipped_grad(
    loss_fn: Callable[..., Any],
    *,
    l2_clip_norm: float,
    batch_argnums: int | Sequence[int] | None = None,
    has_aux: bool = False,
    microbatch_size: int | None = None,
    return_norms: bool = False,
    per_layer: bool = False,
    example_grad: ExampleGradFn | None = None,
    clipping_impl: str = "vmap",
) -> ClippedGradFn:
    """Sum of per-example clipped gradients of an ordinary batch loss.

    ``loss_fn(params, *batch)`` is your usual loss over a batch whose leading axis
    is examples. The returned function evaluates it on every example as a batch of
    one (``jax.vmap`` of ``jax.grad``), clips each example's gradient to L2 norm at
    most ``l2_clip_norm`` and returns the sum over examples. It is pure and
    ``jax.jit``-able; ``params`` may be any pytree (Flax NNX ``State``, Equinox
    modules, dicts).

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar`` (or ``(scalar, aux)`` with
        ``has_aux=True``).
      l2_clip_norm: the clipping bound C, a finite number > 0.
      batch_argnums: which positional arguments after ``params`` carry the
        example axis (1-based, as in ``loss_fn``'s signature). ``None`` (default)
        means all of them; the others are passed unbatched to every example.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; per-example ``aux`` is returned.
      microbatch_size: process the batch in chunks of this many examples inside
        ``lax.scan`` to bound memory. Same result to float tolerance. A batch that
        is not a multiple is padded internally with masked examples.
      return_norms: also return per-example gradient norms before clipping.
      per_layer: clip each parameter leaf separately to ``C / sqrt(K)`` for K
        leaves, so the whole per-example gradient still has norm ``<= C``.
      example_grad: a per-example gradient estimator (:data:`ExampleGradFn`) used
        instead of the plain gradient, e.g. Bias-Aware Minimisation's
        finite-difference gradient (``experiments/bam``). It is handed one
        example's ``value_and_grad(p)`` and nothing else, so whatever it returns
        depends on that example only: it is clipped like any gradient and the
        sensitivity stays C.
      clipping_impl: how the per-example norms are found; the result is the same
        (to float tolerance) either way. ``"vmap"`` (default) materialises every
        example's gradient: any model. ``"ghost"`` takes the norms from each
        layer's inputs and output gradients without per-example gradients of the
        whole model (dense, convolution, embedding, bias and scale parameters;
        see ``jaxdp/_ghost.py``) and raises :class:`GhostUnsupported` naming the
        parameter a model uses otherwise (shared weights, weight standardisation,
        low precision, ``example_grad``). ``"auto"``: ghost where every parameter
        is covered, else vmap, saying why once (a warning on the ``jaxdp`` logger).

    Returns:
      ``fn(params, *batch, example_mask=None) -> (grad_sum, ClippedGradAux)``.
      ``fn.l2_sensitivity`` is C.

    Raises:
      ValueError/TypeError: for a clip norm that is not finite and positive, a bad
        ``microbatch_size``, or inconsistent batch sizes / mask shapes.

    Guarantees:
      * every example's clipped gradient has L2 norm ``<= C`` (up to float rounding);
      * an example with ``example_mask == 0`` contributes exactly zero, whatever
        its data (NaN included);
      * an example whose gradient has a NaN or inf is dropped (contributes zero)
        and counted in ``aux.num_nonfinite``;
      * a zero gradient stays zero (no division by zero);
      * the sum is returned in at least float32 (bfloat16/float16 parameters
        get float32 sums), so rounding cannot push a clipped gradient above C.

    Masks: an example counts when ``example_mask > 0`` (use 0/1 weights).

    Example:
      >>> import jax.numpy as jnp, jaxdp
      >>> def loss(w, x, y):
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0)
      >>> g, aux = fn(jnp.zeros(3), jnp.ones((4, 3)), jnp.ones(4))
      >>> bool(jnp.linalg.norm(g) <= 4.0 + 1e-5)
      True
    """
    return ClippedGradFn(
        loss_fn,
        l2_clip_norm=l2_clip_norm,
        batch_argnums=batch_argnums,
        has_aux=has_aux,
        microbatch_size=microbatch_size,
        return_norms=return_norms,
        per_layer=per_layer,
        example_grad=example_grad,
        clipping_impl=clipping_impl,
    )


def gradient_norm_stats(
    norms: Any, example_mask: Any, *, l2_clip_norm: float, quantiles: Sequence[float] = (0.1, 0.5, 0.9)
) -> dict[str, jax.Array]:
    """Clipping diagnostics of one step (or of many pooled): norm statistics and the clipping bias bound.

    Clipping example i changes its gradient by exactly ``max(0, ||g_i|| - C)`` in
    norm, so the clipped mean is at most ``mean_i max(0, ||g_i|| - C)`` away from
    the unclipped mean (the *bias bound*, Knolle et al. 2023). Works under
    ``jax.jit`` and on NumPy arrays.

    Args:
      norms: per-example gradient norms before clipping, e.g. ``aux.norms`` of a
        :func:`clipped_grad` built with ``return_norms=True``.
      example_mask: 0/1 per example; masked and non-finite norms are left out.
      l2_clip_norm: the clipping bound C.
      quantiles: which quantiles of the norm to report, distinct, in [0, 1] (keys
        ``grad_norm_q10``, ``grad_norm_q50``, ``grad_norm_q99.5`` ...).

    Returns:
      ``{"grad_norm_mean", "grad_norm_qNN"..., "fraction_clipped", "clip_bias_bound",
      "examples"}`` as scalars (NaN statistics when no example counts).

    Privacy: these are computed from private data without noise; they are not
    covered by ε (debugging and research only; do not publish them).

    Example:
      >>> import jax.numpy as jnp, jaxdp
      >>> s = jaxdp.gradient_norm_stats(jnp.array([0.5, 3.0, 9.0]), jnp.array([1, 1, 0]), l2_clip_norm=1.0)
      >>> float(s["clip_bias_bound"]), float(s["fraction_clipped"])
      (1.0, 0.5)
    """
    clip = _check_clip_norm(l2_clip_norm)
    keys = [f"grad_norm_q{100 * q:g}" for q in quantiles]
    if not all(0 <= q <= 1 for q in quantiles) or len(set(keys)) != len(keys):
        raise ValueError(f"quantiles={tuple(quantiles)!r} must be distinct numbers in [0, 1], e.g. (0.1, 0.5, 0.9).")
    norms = jnp.asarray(norms, jnp.float32)
    counted = (jnp.asarray(example_mask) > 0) & jnp.isfinite(norms)
    n = jnp.sum(counted)
    safe = jnp.where(counted, norms, 0.0)
    denom = jnp.where(n > 0, n, jnp.nan)
    stats = {
        "grad_norm_mean": jnp.sum(safe) / denom,
        "fraction_clipped": jnp.sum(counted & (norms > clip)) / denom,
        "clip_bias_bound": jnp.sum(jnp.maximum(safe - clip, 0.0)) / denom,
        "examples": n.astype(jnp.int32),
    }
    values = jnp.nanquantile(jnp.where(counted, norms, jnp.nan), jnp.asarray(quantiles, jnp.float32))
    stats.update(zip(keys, values, strict=True))
    return stats
