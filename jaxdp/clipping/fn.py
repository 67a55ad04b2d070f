"""The face of clipping: :func:`clipped_grad` and :class:`ClippedGradFn` check the arguments, pick the path, scan.

The one function users need is :func:`clipped_grad`. It turns an ordinary batch
loss ``loss_fn(params, *batch)`` into a function that returns the **sum** of the
per-example gradients, each clipped to L2 norm at most ``l2_clip_norm``. The
result has L2 sensitivity ``l2_clip_norm`` under add/remove-one adjacency, which
is what :func:`jaxdp.privatize` adds noise for.

A call checks the batch and the mask, picks the path (:mod:`jaxdp.clipping.vmap`,
or :mod:`jaxdp.clipping.ghost` for ``clipping_impl="ghost"``/``"auto"``) and runs
it on the whole batch or, with ``microbatch_size``, on chunks inside ``lax.scan``
(:func:`microbatch_scan`). Either path ends in :mod:`jaxdp.clipping.core`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdp import rules
from jaxdp.clipping import ghost, vmap
from jaxdp.clipping.core import ChunkSum
from jaxdp.clipping.ghost import GhostPlan, GhostUnsupported
from jaxdp.clipping.vmap import ExampleGradFn

PyTree = Any

#: The clipping implementations :func:`clipped_grad` accepts (see its docstring).
CLIPPING_IMPLS = ("vmap", "ghost", "auto")

_log = logging.getLogger("jaxdp")

__all__ = [
    "CLIPPING_IMPLS",
    "ClippedGradAux",
    "ClippedGradFn",
    "batch_argnums",
    "clipped_grad",
    "microbatch_scan",
]


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


def batch_argnums(batch_argnums: int | Sequence[int] | None, num_args: int) -> tuple[int, ...]:
    """Which of ``num_args`` arguments after ``params`` carry the example axis, 1-based.

    ``None`` means all of them; an int or a sequence names them (as ``loss_fn``'s
    positional arguments, ``params`` being 0). Raises ValueError for a number outside
    ``1..num_args``. :func:`jaxdp.distributed.data_parallel` shards the same ones.
    """
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


def microbatch_scan(
    chunk: Callable[[list, jax.Array], ChunkSum],
    params: PyTree,
    batched_nums: Sequence[int],
    batch: Sequence[Any],
    mask: jax.Array,
    microbatch_size: int,
) -> ChunkSum:
    """``chunk(args, mask)`` on consecutive chunks of ``microbatch_size`` examples inside ``lax.scan``, summed.

    A batch that is not a multiple of ``microbatch_size`` is padded with copies of its
    first example, masked out. Per-example outputs come back in batch order, without the
    padding; the counters are summed.
    """
    size = mask.shape[0]
    m = microbatch_size
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
        g, loss, aux, norms, stats = chunk(chunk_args, chunk_mask)
        acc = jax.tree_util.tree_map(jnp.add, acc, g)
        return acc, (loss, aux, norms, stats)

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    xs = (tuple(args[n - 1] for n in batched_nums), mask_c)
    grad_sum, (loss, aux, norms, stats) = jax.lax.scan(body, zeros, xs)

    def unchunk(x):
        return x.reshape((chunks * m,) + x.shape[2:])[:size]

    loss, aux, norms = jax.tree_util.tree_map(unchunk, (loss, aux, norms))
    stats = tuple(jnp.sum(s) for s in stats)
    return ChunkSum(grad_sum, loss, aux, norms, stats)


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
        self.l2_clip_norm = rules.check_clip_norm(l2_clip_norm)
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

    def per_example_grads(self, params: PyTree, *batch: Any) -> tuple[PyTree, jax.Array]:
        """The per-example gradients this function clips, before clipping (for inspection and tests).

        Returns ``(grads, loss)``: ``grads`` has the structure of ``params`` with a
        leading example axis (the output of ``example_grad`` when one is set), and
        ``loss`` is the per-example loss. Materialises every example's gradient:
        use it on small batches.
        """
        loss, _, grads = vmap.example_grads(
            self.loss_fn,
            params,
            batch_argnums(self.batch_argnums, len(batch)),
            batch,
            has_aux=self.has_aux,
            example_grad=self.example_grad,
        )
        return grads, loss

    def ghost_coverage(self, params: PyTree, *batch: Any) -> str | None:
        """``None`` when ``clipping_impl="ghost"`` covers this loss, else why not (what ``"auto"`` would log).

        Only traces (abstractly); nothing is computed.
        """
        return self._coverage(params, batch)[1]

    def _coverage(self, params: PyTree, batch) -> tuple[GhostPlan | None, str | None]:
        """(the analysed plan, None) when the ghost path covers this loss, else (None, why not)."""
        if self.example_grad is not None:
            return None, "a custom example_grad estimator is set"
        batched_nums = batch_argnums(self.batch_argnums, len(batch))
        try:
            plan = ghost.analyse_loss(self._example_loss(batched_nums), params, batched_nums, batch)
            ghost.check_traces(
                plan, params, batched_nums, batch, l2_clip_norm=self.l2_clip_norm, per_layer=self.per_layer
            )
        except GhostUnsupported as e:
            return None, str(e)
        return plan, None

    def explain_ghost(self, params: PyTree, *batch: Any) -> list[dict] | str:
        """Per parameter use, how the ghost path takes its norms (:func:`jaxdp.clipping.ghost.explain`), or why
        the ghost path does not cover this loss (what ``"auto"`` logs before it uses vmap). Only traces."""
        plan, why = self._coverage(params, batch)
        if why is not None:
            return why
        batched_nums = batch_argnums(self.batch_argnums, len(batch))
        size = jax.tree_util.tree_leaves(batch[batched_nums[0] - 1])[0].shape[0]
        return ghost.explain(plan, params, min(size, self.microbatch_size or size))  # one chunk's costs

    def __call__(self, params: PyTree, *batch: Any, example_mask: Any = None):
        if not batch:
            raise TypeError("the clipped gradient function needs a batch: call fn(params, *batch).")
        batched_nums = batch_argnums(self.batch_argnums, len(batch))
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

        def chunk(args, chunk_mask):
            return self._chunk(params, batched_nums, args, chunk_mask, plan)

        if self.microbatch_size is None or self.microbatch_size >= size:
            out = chunk(batch, mask)
        else:
            out = microbatch_scan(chunk, params, batched_nums, batch, mask, self.microbatch_size)
        n_clip, n_bad = out.stats
        return out.grad_sum, ClippedGradAux(
            loss=out.loss,
            norms=out.norms if self.return_norms else None,
            aux=out.aux,
            num_clipped=n_clip,
            num_nonfinite=n_bad,
        )

    # -- the path -----------------------------------------------------------
    def _example_loss(self, batched_nums):
        return vmap.example_loss(self.loss_fn, batched_nums, has_aux=self.has_aux)

    def _ghost_plan(self, params, batched_nums, args) -> GhostPlan | None:
        """The analysed one-example loss for the ghost path, or None to use vmap (``auto``, not covered)."""
        if self.clipping_impl == "vmap":
            return None
        if self.example_grad is not None:  # 'ghost' refused it in __init__
            reason = "a custom example_grad estimator is set"
        else:
            try:
                plan = ghost.analyse_loss(self._example_loss(batched_nums), params, batched_nums, args)
                if self.clipping_impl == "auto":
                    ghost.check_traces(
                        plan, params, batched_nums, args, l2_clip_norm=self.l2_clip_norm, per_layer=self.per_layer
                    )
                return plan
            except GhostUnsupported as e:
                if self.clipping_impl == "ghost":
                    raise
                reason = str(e)
        if not self._fallback_said:
            self._fallback_said = True
            _log.warning("clipping_impl='auto': using the vmap path because %s", reason)
        return None

    def _chunk(self, params, batched_nums, args, mask, plan: GhostPlan | None) -> ChunkSum:
        """One chunk of examples clipped and summed, on the ghost path when there is a plan, else on vmap."""
        if plan is not None:
            return ghost.chunk(
                plan, params, batched_nums, args, mask, l2_clip_norm=self.l2_clip_norm, per_layer=self.per_layer
            )
        return vmap.chunk(
            self.loss_fn,
            params,
            batched_nums,
            args,
            mask,
            has_aux=self.has_aux,
            example_grad=self.example_grad,
            l2_clip_norm=self.l2_clip_norm,
            per_layer=self.per_layer,
        )


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
        see ``jaxdp/clipping/ghost.py``) and raises :class:`GhostUnsupported` naming the
        parameter a model uses otherwise (shared weights, weight standardisation,
        low precision, ``example_grad``). ``"auto"``: ghost where every parameter
        is covered, else vmap, saying why once (a warning on the ``jaxdp`` logger).

    Returns:
      ``fn(params, *batch, example_mask=None) -> (grad_sum, ClippedGradAux)``.
      ``fn.l2_sensitivity`` is C.

    Raises:
      ValueError: for a clip norm that is not a finite number > 0
        (:func:`jaxdp.rules.check_clip_norm`), a bad ``microbatch_size`` or
        ``clipping_impl``, or inconsistent batch sizes / mask shapes.
      TypeError: for a ``loss_fn`` or ``example_grad`` that is not callable.

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
