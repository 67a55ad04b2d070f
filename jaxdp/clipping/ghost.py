"""The ghost path: per-example gradient norms without per-example gradients of the whole model.

``clipping_impl="ghost"`` (or ``"auto"`` where it covers the loss) takes this path
instead of :mod:`jaxdp.clipping.vmap`: :func:`analyse_loss` checks the loss once,
:func:`chunk` clips and sums one chunk of examples (the factors and the masked sum
come from :mod:`jaxdp.clipping.core`, as on the vmap path).

The vmap path (``clipping_impl="vmap"``) computes every example's full gradient,
``batch x params`` numbers. For a parameter that enters the loss through one
operation that is *linear in it*, y = op(x, W) (a dense layer, a convolution, an
embedding lookup, a bias add, a norm layer's scale), the example's gradient is a
function of that example's input ``x_i`` and output cotangent ``g_i = dl_i/dy_i``
alone, and its norm often has a cheap closed form:

* dense (``dot_general``): ``||X_i^T G_i||^2 = <X_i X_i^T, G_i G_i^T>`` over the
  example's T positions: ``T^2 (d_in + d_out)`` work instead of ``T d_in d_out``
  (the "ghost norm"; we take whichever is cheaper);
* convolution: the same, with X_i the example's input patches (im2col);
* embedding (``gather`` of rows): ``sum_{t,s} [idx_t = idx_s] <g_t, g_s>``;
* a dense or convolution kernel whose per-example gradient is no larger than the
  example's X and G (few positions T, or a first convolution on few channels): that
  gradient X_i^T G_i itself;
* anything else linear in W (convolutions, bias, scale): the example's gradient of
  *that one parameter* (small for biases and scales), never of the whole model;
* a kernel standardised by :func:`jaxdp.models.weight_standardize` (W' = (W - mean_c) / s_c
  per output channel, a verified reparametrisation): the gradient with respect to W is
  (1/s_c) P (g'_c - <g'_c, w'_c> w'_c / n), so its norm needs only, per channel, ||g'_c||^2
  (the Gram form), <g'_c, 1> and <g'_c, w'_c> (from the layer's input and output), or the
  example's X^T G taken back through the standardisation (the direct form).

How: the loss of one example is traced to a jaxpr and re-run by a small
interpreter that adds a zero "probe" to the output of each such operation and
records its other operand. One backward pass to the probes (not to the
parameters) gives every ``g_i``; the norms follow per parameter; the clipped sum
is then, per parameter, one *weighted* backward pass ``sum_i w_i X_i^T G_i``, or,
where the per-example gradient was formed for its norm, the weighted sum of those
(book-keeping: no second pass through the network). What is formed from a convolution's
im2col matrix (k times its input: the direct products, the Gram forms' statistics of X) is
formed in chunks of examples, in a loop, so that the matrix never exists for the whole batch
(:func:`_patch_chunk`): XLA's CPU scheduler would otherwise build every layer's in the
forward pass and hold them all to the end of the step.

Soundness is checked, not assumed: each parameter leaf must reach exactly one such
operation through shape-only steps (reshape, transpose, broadcast, dtype casts,
nested ``jit``) and at most once through jaxdp's weight standardisation (recognised by
its source and its body, with a constant eps > 0), with the other operand free of parameters. Any other
use (shared weights, a standardisation written inline, a parameter in a nonlinearity or
in the loss itself, control flow) makes the model *not covered*: ``"ghost"`` raises
:class:`GhostUnsupported` naming the parameter and the operation, and ``"auto"``
falls back to the vmap path. A wrong norm would be a privacy bug, so when in
doubt the analysis refuses.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jaxdp.clipping.core import ChunkSum, clip_factors, scaled_sum, sq_norm_and_bound, two_stage_sum
from jaxdp.clipping.reparam import standardize_kernel
from jaxdp.schedule import after

PyTree = Any

__all__ = [
    "Fallback",
    "GhostPlan",
    "GhostUnsupported",
    "analyse",
    "analyse_loss",
    "check_traces",
    "chunk",
    "explain",
    "leaf_names",
    "run_with_probes",
    "site_norms",
    "site_roundoff",
    "site_weighted_sum",
]

# Linear unary steps a parameter may take before its one linear use (re-applied, then transposed, per site).
_STRUCTURAL = {
    "reshape",
    "broadcast_in_dim",
    "convert_element_type",
    "transpose",
    "squeeze",
    "expand_dims",
    "copy",
    "slice",
    "neg",
    "rev",
}
# Of those, the ones that keep the gradient's norm (bijective relayouts).
_NORM_KEEPING = {"reshape", "transpose", "convert_element_type", "squeeze", "expand_dims", "copy"}
# Operations linear in each operand separately (when the other has no parameter).
_LINEAR = {"dot_general", "conv_general_dilated", "mul", "add", "sub", "gather"}
# Calls inlined when a parameter flows into them (their body is analysed instead). A custom
# derivative rule (custom_jvp / custom_vjp) is inlined only when it is known to be the exact
# derivative of its body (_EXACT_RULES): otherwise vmap would clip the custom rule's gradient
# and ghost the body's, so a parameter flowing into one is refused.
_CUSTOM_RULES = {"custom_jvp_call", "custom_vjp_call"}
_EXACT_RULES = {
    # DPConv's im2col backward, tested equal to the derivative of its body (tests/test_models.py).
    (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "_conv.py"), "conv_same"),
}
# Reparametrisations of a parameter that ghost clipping verifies and takes norms through (its own
# formula below, :func:`_ws_gram_norms`): weight standardisation, identified by source and by body.
_REPARAMS = {
    (os.path.join(os.path.dirname(os.path.abspath(__file__)), "reparam.py"), "standardize_kernel"),
}
_CALLS = {
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "remat",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
}


class GhostUnsupported(ValueError):
    """The loss uses a parameter in a way ghost clipping cannot take the per-example norm of."""


@dataclass(frozen=True)
class _Tag:
    """A value derived from parameter leaf ``leaf`` by the shape-only steps ``chain``."""

    leaf: int
    chain: tuple = ()


@dataclass(frozen=True)
class _Reparam:
    """A step of a tag's chain: the verified weight standardisation ``eqn`` (a ``jit`` call; its eps a literal)."""

    eqn: Any

    @property
    def eps(self):
        """The eps literal, (value, dtype)."""
        v = self.eqn.invars[1]
        return v.val, v.aval.dtype

    @property
    def primitive(self):
        return self.eqn.primitive

    @property
    def invars(self):
        return self.eqn.invars

    @property
    def outvars(self):
        return self.eqn.outvars


@dataclass(frozen=True)
class _Zeros:
    """Stands in for an operand whose value the parameter's gradient does not depend on."""

    shape: tuple
    dtype: Any


@dataclass
class _Site:
    """One linear use of a parameter leaf: ``y = consumer(..., chain(leaf), ...)``."""

    leaf: int
    chain: tuple  # jaxpr eqns, applied in order to the leaf
    eqn: Any  # the consumer eqn
    pos: int  # operand position of the parameter-derived value
    out_shape: tuple
    out_dtype: Any
    literals: dict = field(default_factory=dict)  # operand position -> literal value (or _Zeros)
    # The consumer's output is recorded too (last among the operands): a standardised kernel on the
    # Gram form needs it (see _ws_gram_norms); decided from the shapes when the site is found.
    keeps_output: bool = False


def _inner(eqn):
    """(jaxpr, consts) of a call-like eqn, or None."""
    p = eqn.params
    for key in ("jaxpr", "call_jaxpr"):
        if key in p:
            j = p[key]
            if isinstance(j, jcore.ClosedJaxpr):
                return j.jaxpr, j.consts
            if isinstance(j, jcore.Jaxpr):
                return j, ()
    return None


def _source(eqn) -> tuple[str, str]:
    """(absolute file, function name) of a call-like eqn's body, from its debug info; ("", "") if unknown."""
    info = getattr(_inner(eqn)[0], "debug_info", None) if _inner(eqn) is not None else None
    src = getattr(info, "func_src_info", None) or ""
    name, _, where = src.partition(" at ")
    return (os.path.abspath(where.rsplit(":", 1)[0]) if where else "", name)


def _exact_rule(eqn) -> bool:
    """Whether a custom_jvp/custom_vjp call is one whose rule is the exact derivative of its body."""
    return _source(eqn) in _EXACT_RULES


def _is_reparam(eqn) -> bool:
    """Whether a ``jit`` call is the verified weight standardisation (:data:`_REPARAMS`): its source, and a body
    equal to a fresh trace of :func:`jaxdp.clipping.reparam.standardize_kernel` on the call's input. A
    batched call (under ``jax.vmap``: statistics per slice, not over every axis but the last) differs and
    is then analysed as any other call (its reductions are refused)."""
    if eqn.primitive.name not in ("jit", "pjit") or _source(eqn) not in _REPARAMS or len(eqn.invars) != 2:
        return False
    k, eps = (v.aval for v in eqn.invars)
    body = _standardize_program(tuple(k.shape), k.dtype, eps.dtype, bool(getattr(eps, "weak_type", False)))
    return str(_inner(eqn)[0]) == body


@functools.lru_cache(maxsize=64)
def _standardize_program(shape, dtype, eps_dtype, eps_weak) -> str:
    traced = jax.make_jaxpr(standardize_kernel.__wrapped__)(
        jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct((), eps_dtype, weak_type=eps_weak)
    )
    return str(traced.jaxpr)


def _bind(eqn, invals, precise: bool = False, wide: bool = False):
    """Bind ``eqn`` on ``invals``; ``precise``: a matmul or convolution at ``Precision.HIGHEST``;
    ``wide``: its result type (``preferred_element_type``) at least float32, as :func:`_wide`.

    Ghost's own products (the weighted sum and the per-example gradients it forms) run
    precise and wide, on operands widened to float32 or more, so their rounding is that of
    float32 (or float64) whatever matmul precision is in force (``jax.default_matmul_precision``,
    TF32 on GPUs, bfloat16 passes on TPUs) and whatever dtype the model computes in
    (mixed precision): the rounding bounds below assume exactly that.
    """
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    if precise and "precision" in bind_params:
        bind_params = {**bind_params, "precision": (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)}
    if wide and bind_params.get("preferred_element_type") is not None:
        bind_params = {**bind_params, "preferred_element_type": _wide(bind_params["preferred_element_type"])}
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _describe(leaf: int, names: list[str]) -> str:
    return names[leaf] if leaf < len(names) else f"leaf {leaf}"


class _Interpreter:
    """Evaluates a one-example jaxpr, tracking parameter-derived values.

    ``probes is None``: analysis (records the sites). Otherwise ``probes[k]`` is
    added to the output of site ``k`` and its non-parameter operands are kept in
    ``self.operands[k]``.
    """

    def __init__(self, names: list[str], probes=None, sites=None):
        self.names = names
        self.probes = probes
        self.sites: list[_Site] = [] if sites is None else sites
        self.operands: list[list] = []
        self.used: dict[int, str] = {}

    def _refuse(self, tag: _Tag, what: str):
        raise GhostUnsupported(
            f"parameter {_describe(tag.leaf, self.names)} is {what}; ghost clipping needs every parameter to enter "
            "the loss once, through one operation linear in it (dense, convolution, embedding lookup, bias add, "
            "scale). Use clipping_impl='vmap' (or 'auto', which falls back to it) for this model."
        )

    def run(self, jaxpr, consts, args, tags):
        env: dict = {}
        tenv: dict = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return v.val, None
            return env[v], tenv.get(v)

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = c
        for v, a, t in zip(jaxpr.invars, args, tags, strict=True):
            env[v] = a
            if t is not None:
                tenv[v] = t

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            vals = [a for a, _ in ins]
            intags = [t for _, t in ins]
            tagged = [i for i, t in enumerate(intags) if t is not None]
            name = eqn.primitive.name
            outtags = [None] * len(eqn.outvars)
            if not tagged:
                outs = _bind(eqn, vals)
            elif _is_reparam(eqn):
                outs, outtags = self._reparam(eqn, vals, intags, tagged)
            elif name in _CUSTOM_RULES and not _exact_rule(eqn):
                self._refuse(
                    intags[tagged[0]], f"passed into `{name}`, a custom derivative rule ghost clipping cannot check"
                )
            elif name in _CALLS and _inner(eqn) is not None:
                inner, inner_consts = _inner(eqn)
                n_extra = len(vals) - len(inner.invars)  # e.g. custom_jvp consts precede
                if n_extra != 0:
                    self._refuse(intags[tagged[0]], f"passed into `{name}` with an unexpected signature")
                outs, outtags = self.run(inner, inner_consts, vals, intags)
            elif name in _STRUCTURAL and len(vals) == 1:
                outs = _bind(eqn, vals)
                t = intags[0]
                outtags = [_Tag(t.leaf, (*t.chain, eqn))]
            elif name in _LINEAR and len(tagged) == 1:
                outs = self._site(eqn, vals, intags, tagged[0])
            else:
                t = intags[tagged[0]]
                what = f"used by `{name}`" if len(tagged) == 1 else f"combined with another parameter in `{name}`"
                self._refuse(t, what)
            for v, o, t in zip(eqn.outvars, outs, outtags, strict=True):
                if isinstance(v, jcore.DropVar):
                    continue
                env[v] = o
                if t is not None:
                    tenv[v] = t
        outs = [read(v) for v in jaxpr.outvars]
        return [a for a, _ in outs], [t for _, t in outs]

    def _reparam(self, eqn, vals, intags, tagged):
        """The verified weight standardisation of one parameter leaf, ``eps`` a constant: a step of its chain."""
        t = intags[tagged[0]]
        eps = eqn.invars[1]  # _is_reparam checked there are two inputs
        if tagged != [0] or not isinstance(eps, jcore.Literal):
            self._refuse(t, "weight-standardised with a non-constant eps or together with another parameter")
        # (A _Reparam step is a `jit`, never a relayout: a second standardisation fails here too.)
        if not all(e.primitive.name in _NORM_KEEPING for e in t.chain):
            self._refuse(t, "weight-standardised after a step other than a relayout (or standardised twice)")
        eps_value = float(eps.val)
        if not (math.isfinite(eps_value) and eps_value > 0):
            self._refuse(
                t,
                f"weight-standardised with eps={eps_value}; ghost clipping needs a finite eps > 0 (with eps = 0 a "
                "constant channel's derivative is not finite, and the clipped sum would carry its NaN)",
            )
        outs = _bind(eqn, vals)
        return outs, [_Tag(t.leaf, (*t.chain, _Reparam(eqn)))]

    def _site(self, eqn, vals, intags, pos):
        tag = intags[pos]
        if tag.leaf in self.used:
            self._refuse(tag, f"used twice (by `{self.used[tag.leaf]}` and `{eqn.primitive.name}`: shared weights)")
        self.used[tag.leaf] = eqn.primitive.name
        k = len(self.operands)
        shape_only = eqn.primitive.name in ("add", "sub")
        recorded = _recorded(eqn, pos)
        if self.probes is None:
            literals = {i: v.val for i, v in enumerate(eqn.invars) if isinstance(v, jcore.Literal)}
            if shape_only:
                literals.update({i: _Zeros(v.aval.shape, v.aval.dtype) for i, v in enumerate(eqn.invars) if i != pos})
            aval = eqn.outvars[0].aval
            site = _Site(tag.leaf, tag.chain, eqn, pos, tuple(aval.shape), aval.dtype, literals)
            if _reparam_index(tag.chain) is not None:  # the form from the shapes (one example stands for all)
                ops = [jnp.expand_dims(vals[i], 0) for i in recorded]
                form = _choose_form(site, ops, jnp.zeros((1, *aval.shape), aval.dtype))[0]
                # Mixed precision: the recorded output used the rounded kernel; site_norms forms X W' instead.
                site.keeps_output = form == "ws_gram" and not _narrow(site)
            self.sites.append(site)
        keep = self.sites[k].keeps_output
        # That output (exactly X W') is then computed at HIGHEST, so that its rounding is that of its
        # operands' dtype whatever matmul precision is in force (see _ws_gram_norms).
        (out,) = _bind(eqn, vals, precise=keep)
        self.operands.append([vals[i] for i in recorded] + ([out] if keep else []))
        if self.probes is not None:
            out = out + self.probes[k]
        return [out]


def _recorded(eqn, pos: int) -> list[int]:
    """Operand positions a site records (its other, non-literal operands). A sum's gradient does not depend on
    the other addend: its shape is kept (as a literal :class:`_Zeros`), not its value."""
    if eqn.primitive.name in ("add", "sub"):
        return []
    return [i for i, v in enumerate(eqn.invars) if i != pos and not isinstance(v, jcore.Literal)]


def _reparam_index(chain) -> int | None:
    """Position of the weight standardisation in a chain, or None."""
    return next((i for i, e in enumerate(chain) if isinstance(e, _Reparam)), None)


def _broadcast_as_product(w, shape, broadcast_dimensions):
    """``broadcast_in_dim(w, shape, broadcast_dimensions)`` as an outer product with ones (exact: each entry is
    w times 1.0), so that its transpose, the sum over the broadcast dims, is a dot with ones.

    Why: in a per-example gradient that sum is a reduction over a middle axis (a LayerNorm scale's
    ``sum_t x_t g_t``), which XLA's CPU backend ran as a YNNPACK fusion 26x slower than as a dot
    (2.4 ms against 0.09 ms for (256, 1, 32, 64) over the 32). Measured: the transformer's five
    LayerNorm scales took 13 ms of its 75 ms ghost step.
    """
    kept = [d for d in range(w.ndim) if w.shape[d] == shape[broadcast_dimensions[d]]]
    w = w.reshape([w.shape[d] for d in kept])  # size-1 dims that are broadcast: dropped (exact)
    kept_out = [broadcast_dimensions[d] for d in kept]
    new = [d for d in range(len(shape)) if d not in kept_out]
    ones = jnp.ones([shape[d] for d in new], w.dtype)
    outer = jax.lax.dot_general(w, ones, (((), ()), ((), ())), precision=_HIGHEST)  # dims: kept_out, then new
    order = kept_out + new
    return jnp.transpose(outer, [order.index(d) for d in range(len(shape))])


def _apply_steps(steps, w, wide: bool = False, products: bool = False):
    """``steps`` applied to ``w``; ``wide``: every floating value at least float32, see :func:`_apply_site`. A
    cast to bfloat16 or float16 then gives the rounded value, as the model sees it, held in float32 and with
    the derivative of the identity (the gradient is not rounded); a standardisation runs on the widened
    kernel, at the model's rounded point. ``products``: a floating broadcast as :func:`_broadcast_as_product`
    (the same values; its transpose a dot)."""
    if wide:
        w = _wide_value(w)
    for e in steps:
        if (
            products
            and not isinstance(e, _Reparam)
            and e.primitive.name == "broadcast_in_dim"
            and jnp.issubdtype(w.dtype, jnp.floating)
            and w.size > 0
        ):
            w = _broadcast_as_product(w, e.params["shape"], e.params["broadcast_dimensions"])
        elif isinstance(e, _Reparam) and wide:
            # The verified body (_is_reparam), traced afresh for the widened kernel.
            w = standardize_kernel(w, jnp.asarray(e.eps[0], _wide(e.eps[1])))
        elif isinstance(e, _Reparam):
            (w,) = _bind(e.eqn, [w, jnp.asarray(*e.eps)])
        elif wide and e.primitive.name == "convert_element_type":
            wide_dtype = _wide(e.params["new_dtype"])
            rounded = w.astype(e.params["new_dtype"]).astype(wide_dtype)
            w = w.astype(wide_dtype)
            w = w + jax.lax.stop_gradient(rounded - w)  # exact: rounded - w is exact (Sterbenz), and so is the sum
        else:
            (w,) = _bind(e, [w])
    return w


def _apply_chain(site: _Site, w, wide: bool = False, products: bool = False):
    """The leaf as its one consumer sees it: ``chain(leaf)``."""
    return _apply_steps(site.chain, w, wide, products)


def _apply_site(site: _Site, leaf_value, operands, wide: bool = True, products: bool = False):
    """``consumer(..., chain(leaf), ...)`` with the recorded non-parameter operands.

    ``wide`` (ghost's own products: the weighted sum, per-example gradients, a standardised
    kernel's output): every floating operand, the chain and the result at least float32
    (:func:`_wide`). Under mixed precision (a bfloat16 or float16 model, float32 parameters)
    the site's gradient is then that of its recorded low-precision input and output gradient,
    formed and summed in float32: the precision :func:`site_roundoff` bounds. Values in
    float32 or wider are unchanged.
    """
    # Only for a product (x * scale: the fused multiply-and-sum was the slow one), whether the chain or the
    # product itself broadcasts; a bias's plain sum measured no faster as a dot (the DP MNIST CNN's: slower).
    products = products and site.eqn.primitive.name == "mul"
    w = _apply_chain(site, leaf_value, wide, products)
    out_shape = site.out_shape
    scaling = products and w.ndim == len(out_shape) and w.shape != out_shape
    if scaling and w.size > 0 and jnp.issubdtype(w.dtype, jnp.floating):
        # Broadcast by the product itself (size-1 dims): made explicit, so its transpose is a dot too.
        w = _broadcast_as_product(w, out_shape, tuple(range(len(out_shape))))
    cast = _wide_value if wide else (lambda v: v)
    it = iter(operands)
    vals = []
    for i in range(len(site.eqn.invars)):
        if i == site.pos:
            vals.append(w)
        elif isinstance(site.literals.get(i), _Zeros):
            z = site.literals[i]
            vals.append(jnp.zeros(z.shape, _wide(z.dtype) if wide else z.dtype))
        elif i in site.literals:
            vals.append(cast(jnp.asarray(site.literals[i])))
        else:
            vals.append(cast(next(it)))
    (out,) = _bind(site.eqn, vals, precise=True, wide=wide)
    return out


def _wide(dtype):
    """A floating dtype widened to at least float32 (bfloat16, float16 -> float32); others unchanged."""
    dtype = jnp.dtype(dtype)
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def _wide_value(x):
    return x.astype(_wide(jnp.result_type(x)))


def _dense_layout(site: _Site, x, g):
    """([X], G) as [(B, T, d_in)], (B, T, d_out) for a plain dense ``dot_general``, or None."""
    (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
    if lb or rb:
        return None
    # x: (B, *example operand shape); g: (B, *output shape).
    xc = rc if site.pos == 0 else lc  # contracting dims of the non-parameter operand
    x_nd = x.ndim - 1
    x_free = [d for d in range(x_nd) if d not in xc]
    w_rank = len(site.eqn.invars[site.pos].aval.shape)
    w_free = w_rank - len(lc if site.pos == 0 else rc)
    b = x.shape[0]
    x_perm = [0] + [d + 1 for d in x_free] + [d + 1 for d in xc]
    t = int(np.prod([x.shape[d + 1] for d in x_free], dtype=np.int64))
    d_in = int(np.prod([x.shape[d + 1] for d in xc], dtype=np.int64))
    xm = jnp.transpose(x, x_perm).reshape(b, t, d_in)
    # Output layout: lhs free dims, then rhs free dims.
    g_nd = g.ndim - 1
    if site.pos == 1:  # x is lhs: (x free, w free)
        gm = g.reshape(b, t, -1)
    else:  # W is lhs: (w free, x free)
        perm = [0] + list(range(1 + w_free, 1 + g_nd)) + list(range(1, 1 + w_free))
        gm = jnp.transpose(g, perm).reshape(b, t, -1)
    return [xm], gm


def _conv_window(site: _Site) -> tuple[list[int], list[int], int]:
    """A convolution site's (kernel window, output positions per spatial dim, input channels)."""
    _, rhs_spec, out_spec = site.eqn.params["dimension_numbers"]
    rhs_shape = site.eqn.invars[1].aval.shape
    return [rhs_shape[d] for d in rhs_spec[2:]], [site.out_shape[d] for d in out_spec[2:]], rhs_shape[rhs_spec[1]]


def _conv_layout(site: _Site, x, g):
    """(pieces, G) for a convolution, or None: ``pieces[k]`` (B, T, C) is the input seen at window offset k
    (G None where g is None).

    The example's kernel gradient is ``[X_k^T G]_k`` (the im2col product, in blocks);
    its norm does not depend on how the kernel lays those blocks out.
    """
    p = site.eqn.params
    if site.pos != 1 or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    lhs_spec, _, out_spec = p["dimension_numbers"]
    if lhs_spec[0] != 0 or out_spec[0] != 0:
        return None
    if any(d != 1 for d in p["lhs_dilation"]):
        return None
    window, out_spatial, _ = _conv_window(site)
    b = x.shape[0]
    lhs = x.reshape((b * x.shape[1], *x.shape[2:]))  # fold the examples into the conv's batch dim
    # (batch, spatial..., channels), padded; then one strided slice per window offset
    # (kh * kw copies of the input: cheaper on CPU than a patch-extracting convolution).
    lhs = jnp.transpose(lhs, [lhs_spec[0], *lhs_spec[2:], lhs_spec[1]])
    lhs = jax.lax.pad(lhs, jnp.zeros((), lhs.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in p["padding"]), (0, 0, 0)])
    strides, dil = p["window_strides"], p["rhs_dilation"]
    pieces = []
    for offset in np.ndindex(*window):
        start = [0, *(o * d for o, d in zip(offset, dil, strict=True)), 0]
        limit = [
            lhs.shape[0],
            *(s0 + (n - 1) * st + 1 for s0, n, st in zip(start[1:-1], out_spatial, strides, strict=True)),
            lhs.shape[-1],
        ]
        pieces.append(jax.lax.slice(lhs, start, limit, [1, *strides, 1]))
    # One (B, T, C) block per window offset: the kernel gradient's block at that offset is
    # X_offset^T G (no concatenated im2col matrix: on CPU the small matmuls are ~3x faster).
    pieces = [piece.reshape(b, -1, piece.shape[-1]) for piece in pieces]
    # Few input channels (e.g. a first layer on grey images): group offsets into blocks of
    # >= 16 columns, as one thin matmul per offset is slower than a wider one.
    group = max(1, -(-16 // lhs.shape[-1]))
    if group > 1:
        pieces = [jnp.concatenate(pieces[i : i + group], axis=-1) for i in range(0, len(pieces), group)]
    if g is None:
        return pieces, None
    perm = [out_spec[0], *out_spec[2:], out_spec[1]]  # positions (batch, spatial...) first, features last
    g = g.reshape((b * g.shape[1], *g.shape[2:]))
    g = jnp.transpose(g, perm)
    return pieces, g.reshape(b, -1, g.shape[-1])


def _conv_patches_t(site: _Site, x) -> jax.Array:
    """A convolution's per-example im2col matrix, transposed: (B, K C, T), rows in :func:`_conv_layout`'s
    order (window offset, then input channel), columns the output positions.

    Built one spatial dimension at a time, the k window offsets of each stacked as strided slices,
    straight into this layout (no transpose after it): a kh x kw kernel takes kh + kw slices, not
    kh kw. Measured (2 CPU cores, the DP MNIST CNN at batch 256): 64 separate slices of its 8 x 8
    first layer took longer than its per-example products, and XLA's batched product ran twice as
    fast with the positions contracted along the last axis of X as along the middle one.
    """
    p = site.eqn.params
    lhs_spec = p["dimension_numbers"][0]
    window, out_spatial, _ = _conv_window(site)
    b, n = x.shape[0], x.shape[1]  # examples, and the convolution's own batch within one example
    lhs = jnp.transpose(x.reshape((b * n, *x.shape[2:])), list(lhs_spec))  # (N, C, S_0, ...)
    lhs = jax.lax.pad(lhs, jnp.zeros((), lhs.dtype), [(0, 0, 0), (0, 0, 0), *((lo, hi, 0) for lo, hi in p["padding"])])
    # (N, k_0, ..., k_{i-1}, C, o_0, ..., o_{i-1}, S_i, ...): spatial dim i at axis 2 + 2 i.
    for i, (k, o, st, dil) in enumerate(zip(window, out_spatial, p["window_strides"], p["rhs_dilation"], strict=True)):
        axis = 2 + 2 * i
        shifted = [
            jax.lax.slice_in_dim(lhs, a * dil, a * dil + (o - 1) * st + 1, stride=st, axis=axis) for a in range(k)
        ]
        lhs = jnp.stack(shifted, axis=1 + i)
    t = int(np.prod(out_spatial, dtype=np.int64))
    lhs = lhs.reshape(b, n, -1, t)
    if n > 1:
        lhs = jnp.swapaxes(lhs, 1, 2)
    return lhs.reshape(b, -1, n * t)


def _patch_chunk(site: _Site, x) -> int:
    """Examples per chunk of what is formed from a convolution's im2col matrix (its direct products, the Gram
    forms' statistics of X): the matrix at most the size of the layer's input.

    The matrix is k times the input (k window offsets over the stride). Formed for the whole batch, XLA's CPU
    scheduler (which starts work as early as its inputs allow) built each layer's in the forward pass and held
    them all to the end: WRN-16-4 at batch 32 planned 639 MB of temporaries against the non-private step's 189 MB.
    Formed inside a loop over chunks it exists only while its chunk is used.
    """
    b = x.shape[0]
    x_size = math.prod(x.shape[1:])
    window, out_spatial, channels = _conv_window(site)
    patches = math.prod(window) * channels * math.prod(out_spatial)
    if patches <= x_size:
        return b
    return max(1, min(b, (b * x_size) // patches))


def _by_chunks(fn, arrays, c: int):
    """``fn(*arrays)`` (a pytree of per-example outputs) formed ``c`` examples at a time in a loop.

    As many chunks as ``c`` allows, or a few more where that count divides the batch; otherwise the batch
    padded with zero examples (a copy of the inputs; their outputs are dropped). The loop reads each chunk in
    place (a scan over reshaped chunks copied its inputs into its state, in the forward pass) into buffers made
    from the first chunk's outputs (buffers of zeros, with no inputs, were allocated at the start of the step
    and held throughout).
    """
    b = arrays[0].shape[0]
    if c >= b:
        return fn(*arrays)
    n = -(-b // c)
    n = next((k for k in range(n, 2 * n + 1) if b % k == 0), n)
    c = -(-b // n)
    pad = n * c - b
    if pad:
        arrays = [jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) for a in arrays]
    first = fn(*(a[:c] for a in arrays))
    out = jax.tree_util.tree_map(lambda f: jnp.pad(f, [(0, (n - 1) * c), *[(0, 0)] * (f.ndim - 1)]), first)

    def chunk(i, out):
        part = fn(*(jax.lax.dynamic_slice_in_dim(a, i * c, c) for a in arrays))
        return jax.tree_util.tree_map(lambda o, q: jax.lax.dynamic_update_slice_in_dim(o, q, i * c, 0), out, part)

    out = jax.lax.fori_loop(1, n, chunk, out)
    return jax.tree_util.tree_map(lambda o: o[:b], out) if pad else out


def _conv_example_grads(site: _Site, leaf_value, x, gm) -> jax.Array:
    """Each example's gradient of a convolution's leaf, (B, *leaf shape): its X^T G from :func:`_conv_patches_t`
    taken to the leaf's layout (:func:`_to_leaf`), in chunks of :func:`_patch_chunk` examples. Taken to the leaf
    chunk by chunk, no (B, K C, d_out) array of the whole batch's products exists beside the gradients (for a
    standardised kernel, a copy through its Jacobian: WRN-16-4, 18 MB each at batch 32)."""

    def grads(xc, gc):
        blocks = jnp.einsum("bpt,btd->bpd", _wide_value(_conv_patches_t(site, xc)), gc, precision=_HIGHEST)
        return _to_leaf(site, leaf_value, blocks)

    return _by_chunks(grads, [x, gm], _patch_chunk(site, x))


class _XStats(NamedTuple):
    """What the Gram forms take from a site's X alone, per example: X scaled by ``2^-e_x`` into [-1, 1]
    (:func:`_gram_norms`), then its Gram matrix and, per position t, ``||x_t||^2``, the sum of x_t's entries
    and of their magnitudes; and whether X has a nonzero entry."""

    e_x: jax.Array  # (B,)
    gram: jax.Array  # (B, T, T)
    sq: jax.Array  # (B, T)
    rows: jax.Array  # (B, T)
    abs: jax.Array  # (B, T)
    nonzero: jax.Array  # (B,)


def _x_stats(pieces) -> _XStats:
    """:class:`_XStats` of a layout's pieces ((B, T, d) blocks of X)."""
    e_x = _pow2_exponent(pieces)
    sx = [_scaled(x, e_x) for x in pieces]
    return _XStats(
        e_x,
        sum(jnp.matmul(x, jnp.swapaxes(x, 1, 2), precision=_HIGHEST) for x in sx),
        sum(jnp.sum(jnp.square(x), axis=-1) for x in sx),
        sum(jnp.sum(x, axis=-1) for x in sx),
        sum(jnp.sum(jnp.abs(x), axis=-1) for x in sx),
        functools.reduce(jnp.logical_or, [jnp.any(x != 0, axis=(1, 2)) for x in sx]),
    )


def _site_x_stats(site: _Site, x, pieces) -> _XStats:
    """:func:`_x_stats` of the site's pieces; for a convolution, laid out again from its input, in chunks of
    :func:`_patch_chunk` examples where its pieces outgrow it (however many pieces hold them). Formed whole,
    XLA's CPU backend fused the Gram matrix of X with G's side, so the pieces (k times X, and their scaled
    copies) were held from the forward pass until G existed (WRN-16-4, batch 32: 112 MB of its peak)."""
    if site.eqn.primitive.name != "conv_general_dilated":
        return _x_stats(pieces)
    return _by_chunks(
        lambda xc: _x_stats([_wide_value(p) for p in _conv_layout(site, xc, None)[0]]), [x], _patch_chunk(site, x)
    )


def _gather_layout(site: _Site, x, g):
    """(idx, valid, G) as (B, T), (B, T), (B, T, D) for an embedding-row ``gather``, or None."""
    if site.pos != 0:
        return None
    p = site.eqn.params
    dn = p["dimension_numbers"]
    table = site.eqn.invars[0].aval.shape
    idx = x
    if (
        len(table) != 2
        or tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.start_index_map) != (0,)
        or tuple(getattr(dn, "operand_batching_dims", ())) != ()
        or tuple(p["slice_sizes"]) != (1, table[1])
        or tuple(dn.offset_dims) != (idx.ndim - 2,)  # (B,)-leading idx: last output dim
        or idx.shape[-1] != 1
    ):
        return None
    b = idx.shape[0]
    i = idx.reshape(b, -1)
    mode = str(p["mode"])
    if "FILL_OR_DROP" in mode:
        valid = (i >= 0) & (i < table[0])
    else:  # clip / promise_in_bounds: out-of-range rows are clamped
        i = jnp.clip(i, 0, table[0] - 1)
        valid = jnp.ones(i.shape, bool)
    return i, valid, g.reshape(b, i.shape[1], table[1])


def _to_leaf(site: _Site, leaf_value, blocks):
    """Per-example gradients of the leaf, (B, *leaf shape), from the (B, d_in, d_out) blocks of X^T G.

    ``blocks`` rows are the non-parameter operand's contracted features in the order the
    layouts above flatten them (dense: the contracting dims in pairing order; convolution:
    window offset, then input channel), columns the parameter's free features (dense: its
    free dims in order; convolution: output channels). They are put in the consumer
    operand's layout, then taken back through the leaf's chain of relayouts (its transpose).
    """
    b = blocks.shape[0]
    operand = site.eqn.invars[site.pos].aval
    p = site.eqn.params
    if site.eqn.primitive.name == "dot_general":
        (lc, rc), _ = p["dimension_numbers"]
        wc = list(lc if site.pos == 0 else rc)
        wfree = [d for d in range(len(operand.shape)) if d not in wc]
        order = wc + wfree  # operand dims in the order the blocks hold them
    else:
        _, rhs_spec, _ = p["dimension_numbers"]
        order = [*rhs_spec[2:], rhs_spec[1], rhs_spec[0]]  # window offset, input channel, output channel
    canon = blocks.reshape((b, *(operand.shape[d] for d in order)))
    per_op = jnp.transpose(canon, [0] + [1 + order.index(d) for d in range(len(order))])
    # Through the widened chain: a cast to bfloat16 on the way is not a rounding of the gradient.
    chained, back = jax.vjp(lambda w: _apply_chain(site, w, wide=True), _wide_value(leaf_value))
    return jax.vmap(lambda y: back(y.astype(chained.dtype))[0])(per_op)


_HIGHEST = jax.lax.Precision.HIGHEST
# The Gram estimate is replaced by the example's own X^T G (see site_norms) when its rounding
# bound inflates a norm by more than this factor: cancellation, not ordinary rounding. 2.5%: the
# worst-case rounding bound grows with n + T and with Q^2 / ||X^T G||^2 (~T where positions add
# incoherently): WRN-16-4's last stage (n = 2,304, T = 64) reached 1.1% at init on random inputs,
# and at 1% that chunk took the one-example-at-a-time path (4x the step). A clipped example is
# then scaled at most 2.5% more than needed, never less.
_GRAM_TRUST = 1.025


def _unit_roundoff(*dtypes) -> float:
    """The unit roundoff of the *lowest* precision among ``dtypes`` (each a dtype or an array)."""
    return max(float(jnp.finfo(getattr(d, "dtype", d)).eps) / 2 for d in dtypes)


def site_roundoff(site: _Site, leaf_value, *arrays) -> float:
    """The unit roundoff a site's norm and sum computations run at: that of the lowest precision of the
    parameter, every operand, the consumer's output and the arrays given (the layouts' X and G),
    each widened to float32 (:func:`_wide`).

    Ghost's own products run at ``Precision.HIGHEST`` (:func:`_bind`, the matmuls below), so
    no lower matmul precision in force enters; a float32 product whose result is float64
    (``preferred_element_type``) rounds like float32 here, not float64. Values in bfloat16 or
    float16 (mixed precision) are exact in float32, and every product ghost forms from them, for
    the norms and for the sum, runs on them widened to float32 (:func:`_apply_site`): float32
    rounding, not theirs.
    """
    return _unit_roundoff(*(_wide(getattr(d, "dtype", d)) for d in (*_site_dtypes(site, leaf_value), *arrays)))


def _site_dtypes(site: _Site, leaf_value=None) -> list:
    """The dtypes of a site's values: the leaf, each step of its chain, each operand (not a gather's
    indices) and the consumer's output."""
    first = site.chain[0].invars[0] if site.chain else site.eqn.invars[site.pos]
    dtypes = [jnp.result_type(leaf_value) if leaf_value is not None else first.aval.dtype, site.out_dtype]
    dtypes += [v.aval.dtype for i, v in enumerate(site.eqn.invars) if not _is_index(site, i)]
    dtypes += [v.aval.dtype for e in site.chain for v in e.outvars]
    return dtypes


def _narrow(site: _Site) -> bool:
    """Whether a site holds a value below float32 (mixed precision)."""
    return any(jnp.dtype(d) != _wide(d) for d in _site_dtypes(site))


def _position_weight(x_sq, d_in: int, gm, u) -> jax.Array:
    """``Q = sum_t ||x_t|| ||g_t||`` per example (an upper bound, rounding included).

    Every term of the closed forms is bounded by products of position norms, and
    ``sum_{t,s} ||x_t|| ||x_s|| ||g_t|| ||g_s|| = Q^2 <= (||X|| ||G||)^2``: rounding errors
    are bounded in terms of Q.
    """
    # x_sq: (B, T), ||x_t||^2 over all blocks of X (d_in entries)
    g_sq = jnp.sum(jnp.square(gm), axis=-1)
    q = jnp.sum(jnp.sqrt(x_sq) * jnp.sqrt(g_sq), axis=-1)
    d = d_in + gm.shape[-1] + gm.shape[1]
    return q * (1 + 2 * (d + 8) * u)


def _example_blocks(pieces, gm):
    """Per-example X^T G in blocks, (B, d_in, d_out), at HIGHEST precision.

    Each block of X is first copied to (B, d, T), positions last, behind an optimization barrier: XLA's CPU
    dot contracted the positions along the middle axis of (B, T, d) at about half speed, and without the
    barrier its algebraic simplifier folds the transpose back into the dot. Measured (2 cores, B = 256,
    T = 32, 64 x 64): 0.60 ms per product as (B, T, d), 0.44 ms with the copy (0.35 ms the product alone);
    the transformer's private step (twelve such products) went from 0.77 to 0.93 of its non-private
    step's speed, with the same result bit for bit. (A convolution's products already read X as
    (B, K C, T): :func:`_conv_patches_t`.)
    """
    pieces = jax.lax.optimization_barrier([jnp.swapaxes(x, 1, 2) for x in pieces])
    return jnp.concatenate([jnp.einsum("bdt,bte->bde", x, gm, precision=_HIGHEST) for x in pieces], axis=1)


def _one_block(example_pieces, gm, i):
    """Example i's X^T G, (d_in, d_out): :func:`_example_blocks` of that example alone, its pieces from
    ``example_pieces(i)``."""
    return _example_blocks(example_pieces(i), gm[i][None])[0]


class Fallback(NamedTuple):
    """A Gram site whose estimate may be untrustworthy for some example in the chunk.

    ``use`` (a bool scalar): the norms came from each example's own X^T G instead, so the
    clipped sum must be that of those products too: ``weighted_sum(w, keep)`` forms
    ``sum_i w_i X_i^T G_i`` one example at a time (memory of one example's gradient of this
    parameter) in the leaf's layout.
    """

    use: jax.Array
    weighted_sum: Any


def _layout_of(site: _Site):
    return _dense_layout if site.eqn.primitive.name == "dot_general" else _conv_layout


# The Gram form also scales X and G, forms Q and the rounding bound and carries the fallback: counted
# twice against the direct form. Measured (benchmarks/profile_ghost.py's timer, 2 CPU cores, side by side):
# a factor of 2 instead of 1 took the transformer (batch 256) from 0.68 to 0.76 of the non-private
# gradient's speed and the DP MNIST CNN from 0.71 to 0.77 (their T = 25-32 Gram sites go direct); WRN-16-4
# (batch 32) stayed at 0.74; 1.5 measured as 2, 4 and 0.5 worse.
_GRAM_OVERHEAD = 2


def _split_output(site: _Site, operands):
    """``(operands, z)``: a standardised kernel on the Gram form recorded its consumer's output last (``z``);
    ``None`` for every other site."""
    if site.keeps_output:
        return operands[:-1], operands[-1]
    return operands, None


def _choose_form(site: _Site, operands, g):
    """How a site's per-example norms are taken: ``(form, layout, (T, d_in, d_out) or None)``.

    ``form``, from the shapes (Bu et al.'s rule, the Gram form's B T^2 (d_in + d_out) multiply-adds
    against the direct form's B T d_in d_out, with the Gram side counted :data:`_GRAM_OVERHEAD` times):

    * ``"gram"``: a dense or conv kernel, ``2 T (d_in + d_out) < d_in d_out``: ``<X X^T, G G^T>``;
    * ``"ws_gram"``: the same for a weight-standardised kernel (:func:`_ws_gram_norms`);
    * ``"direct"``: a dense or conv kernel otherwise (or standardised with channels not last):
      each example's X^T G, formed and kept for the sum;
    * ``"embedding"``: an embedding table with few positions (``T^2 < 8 V``): pairwise token matches;
    * ``"parameter"``: anything else (biases, scales, other layouts): the example's gradient of
      that one leaf.
    """
    ws = _reparam_index(site.chain)
    # Relayouts only, or relayouts around the verified standardisation (whose Jacobian the kernel
    # forms take into account; _to_leaf takes each example's gradient back through it).
    bijective = all(e.primitive.name in _NORM_KEEPING for e in site.chain if not isinstance(e, _Reparam))
    name = site.eqn.primitive.name
    if bijective and name in ("dot_general", "conv_general_dilated") and len(operands) == 1:
        layout = _layout_of(site)(site, operands[0], g)
        if layout is not None:
            pieces, gm = layout
            dims = (gm.shape[1], sum(x.shape[2] for x in pieces), gm.shape[2])
            t, d_in, d_out = dims
            if _GRAM_OVERHEAD * t * (d_in + d_out) < d_in * d_out:
                if ws is None:
                    return "gram", layout, dims
                if _ws_channels_match(site, d_in, d_out):
                    return "ws_gram", layout, dims
            return "direct", layout, dims
    # The embedding formula has no standardisation's Jacobian in it: a standardised table takes the general form.
    if bijective and ws is None and name == "gather" and len(operands) == 1:
        layout = _gather_layout(site, operands[0], g)
        if layout is not None:
            t, v = layout[0].shape[1], site.eqn.invars[0].aval.shape[0]
            if t * t < 8 * v:
                return "embedding", layout, (t, v, layout[2].shape[2])
    return "parameter", None, None


def site_norms(site: _Site, leaf_value, operands, g, mask=None):
    """Per-example squared norm of this leaf's gradient: ``(estimate, bound, per_example_grads or None, fallback)``.

    ``estimate`` is the computed squared norm (reported as the norm; it may come out slightly
    negative when its terms cancel, and is then clamped by the caller, never taken as
    non-finite). ``bound`` is what the clip factor uses: an upper bound, under float
    rounding at the site's lowest precision (:func:`site_roundoff`), on the squared norm of
    what :func:`site_weighted_sum` will add for the example. The closed forms add up many
    terms that can cancel (outputs whose gradients nearly cancel across positions), and a
    rounded estimate of a small result can be far too small; the bound adds the standard
    rounding error bound of each formula, in terms of ``Q = sum_t ||x_t|| ||g_t||``
    (:func:`_position_weight`), and of the weighted backward's own rounding. Where that
    bound inflates some example's norm by more than 2.5% (cancellation), the site's norms
    for the chunk are those of each example's own X^T G, formed one example at a time, and
    ``fallback`` tells the caller to sum those products (:class:`Fallback`), so the result
    equals the vmap path's. Where the gradient is materialised (a kernel's direct X^T G, or
    the general path), it is returned and summed as is, like the vmap path: the only slack is the
    rounding of its own sum of squares.
    """
    operands, z = _split_output(site, operands)
    form, layout, _ = _choose_form(site, operands, g)
    if form in ("gram", "ws_gram", "direct"):
        pieces, gm = layout
        pieces, gm = [_wide_value(x) for x in pieces], _wide_value(gm)
        u = site_roundoff(site, leaf_value, gm, *pieces)

        def example_pieces(i):
            # Example i's pieces laid out again from its own operand, for the fallback: sliced from the batch's,
            # they (k times X for a convolution) were held from the forward pass to the end of the step for it
            # (WRN-16-4, batch 32: 112 MB of its peak). The same values: slices and casts are exact.
            one = [jax.lax.dynamic_slice_in_dim(a, i, 1) for a in (operands[0], g)]
            return [_wide_value(x) for x in _layout_of(site)(site, *one)[0]]

        d_in = sum(x.shape[2] for x in pieces)
        if form == "gram":
            xs = _site_x_stats(site, operands[0], pieces)
            return _gram_norms(site, leaf_value, xs, d_in, gm, u, mask, example_pieces)
        if form == "ws_gram":
            if not site.keeps_output:
                if not _narrow(site):  # decided from the same shapes when the site was found
                    raise AssertionError("ghost clipping: a standardised Gram site without its recorded output")
                # Mixed precision: the model's output is a bfloat16 / float16 rounding of X W'; the norm needs X W'
                # with the float32 W' whose Jacobian it takes (_ws_stats, the wide chain): formed here.
                z = jax.vmap(lambda ops: _apply_site(site, leaf_value, ops))(operands)
            zm = _wide_value(_layout_of(site)(site, operands[0], z)[1])
            xs = _site_x_stats(site, operands[0], pieces)
            return _ws_gram_norms(site, leaf_value, xs, d_in, gm, zm, u, mask, example_pieces)
        # Direct: the example's gradient X^T G itself, no larger than its X and G (see _choose_form).
        # It is kept, mapped to the leaf's layout (through the standardisation's Jacobian, if any) and
        # summed as normed (book-keeping without a second weight-gradient pass): the only slack is the
        # rounding of its own sum of squares.
        if site.eqn.primitive.name == "conv_general_dilated":
            per_ex = _wide_value(_conv_example_grads(site, leaf_value, operands[0], gm))
        else:
            per_ex = _wide_value(_to_leaf(site, leaf_value, _example_blocks(pieces, gm)))
        return *sq_norm_and_bound(per_ex), per_ex, None
    if form == "embedding":
        i, valid, gm = layout
        t = i.shape[1]
        gm = jnp.where(valid[..., None], _wide_value(gm), 0.0)  # dropped rows: their cotangent may be NaN
        u = site_roundoff(site, leaf_value, gm)
        same = (i[:, :, None] == i[:, None, :]).astype(gm.dtype)
        g_gram = jnp.matmul(gm, jnp.swapaxes(gm, 1, 2), precision=_HIGHEST)
        sq = two_stage_sum(same * g_gram)
        # Only pairs of positions holding the same row carry a term (and its rounding error):
        # the slack is in sum_{t,s same} ||g_t|| ||g_s||, not Q^2 (which over-clipped distinct tokens).
        g_norm = jnp.sqrt(jnp.sum(jnp.square(gm), axis=-1)) * (1 + 2 * (gm.shape[2] + 8) * u)
        # Q = sum_t ||g_t|| (one-hot rows: ||x_t|| = 1), with the rounding of that sum of T terms too.
        big_p = jnp.sum(g_norm, axis=-1) * (1 + 2 * (t + 1) * u)
        same_weight = jnp.einsum("bts,bt,bs->b", same, g_norm, g_norm, precision=_HIGHEST)
        slack = 2 * (gm.shape[2] + 2 * t + 4) * u * same_weight * (1 + 4 * t * u)
        bound = jnp.sqrt(jnp.maximum(sq, 0.0) + slack) + 2 * (t + 4) * u * big_p
        return sq, jnp.square(bound), None, None
    # General linear use: this one leaf's per-example gradient (a bias, a scale, a conv kernel).

    def one(ops, gi):
        out, vjp = jax.vjp(lambda w: _apply_site(site, w, ops, products=True), _wide_value(leaf_value))
        (gw,) = vjp(gi.astype(out.dtype))
        return gw

    per_ex = _wide_value(jax.vmap(one)(operands, g))
    return *sq_norm_and_bound(per_ex), per_ex, None


# Smallest normal float32: products and squares below it may be flushed to zero (XLA's CPU does).
_TINY = 2.0**-126


def _pow2_exponent(arrays) -> jax.Array:
    """Per example, the binary exponent e of the largest |value| over ``arrays`` (0 where all are 0 or one is
    not finite): :func:`_scaled` ``(a, e)`` scales each example exactly into [-1, 1]."""
    m = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(a), axis=tuple(range(1, a.ndim))) for a in arrays])
    _, e = jnp.frexp(jnp.where(jnp.isfinite(m), m, 0.0))
    return e


def _scaled(a, e) -> jax.Array:
    """``a`` times ``2^-e[i]`` for each example i (its leading axis): as exact as ``jnp.ldexp(a, -e)`` (a product
    by a power of two rounds only where it overflows or falls below the normal range, where both flush), at the
    cost of two multiplies. ``jnp.ldexp`` of an array takes each element's frexp and a power: 8x the time of the
    sum of squares it fed (measured, 2 CPU cores, (256, 32, 64)). ``2^-e`` is two factors of at most 2^75 each
    (e is an exponent of a float32, within [-149, 128]), both on the same side of 1: the partial product lies
    between ``a`` and the result, and overflows or flushes only where the result would."""
    h = -e // 2
    one = jnp.ones((), a.dtype)
    shape = (-1,) + (1,) * (a.ndim - 1)
    return a * jnp.ldexp(one, h).reshape(shape) * jnp.ldexp(one, -e - h).reshape(shape)


def _gram_norms(site: _Site, leaf_value, xs: _XStats, d_in: int, gm, u, mask, example_pieces):
    """The Gram estimate ``<X X^T, G G^T>`` with its rounding bound, and the fallback to each example's own
    X^T G where cancellation makes the bound loose (see :func:`site_norms`).

    Each example's X and G are first scaled by exact powers of two into [-1, 1], so that no square
    or product overflows and underflow is an absolute error (at most ``2^-126`` per operation,
    flush-to-zero included) that the bound counts; unscaled, tiny inputs against huge output
    gradients (x ~ 1e-20, g ~ 1e18) flushed every Gram entry to zero and gave a bound of 0 for
    a gradient far above C.
    """
    t, d_out = gm.shape[1], gm.shape[2]
    e_x, e_g = xs.e_x, _pow2_exponent([gm])
    sg = _scaled(gm, e_g)
    g_gram = jnp.matmul(sg, jnp.swapaxes(sg, 1, 2), precision=_HIGHEST)
    sq = two_stage_sum(xs.gram * g_gram)
    # Q of the scaled values, plus what flushed position norms may have lost (each < 2^-63 sqrt(d)).
    q = _position_weight(xs.sq, d_in, sg, u) + t * 2.0**-60 * math.sqrt(d_in * d_out)
    # |computed - exact| <= (gamma_{d_in} + gamma_{d_out} + gamma_{2T} + ...) Q^2; twice that covers the
    # gamma denominators and second-order terms. Underflow: each Gram entry is off by at most
    # 2 d 2^-126 (entries scaled into [-1, 1], so Gram entries <= d), each of the T^2 products by
    # that times the other Gram's d, plus its own flush.
    underflow = 2 * t * t * (4 * d_in * d_out + 1) * _TINY
    # An example whose X or G is all zeros has a zero gradient here: no underflow term (padding rows).
    nonzero = jnp.any(sg != 0, axis=(1, 2)) & xs.nonzero
    slack = 2 * (d_in + d_out + 2 * t + 4) * u * jnp.square(q) + jnp.where(nonzero, underflow, 0.0)
    summing = (t + 4) * u * q  # the weighted backward's rounding, per example
    est = jnp.maximum(sq, 0.0)
    bound = jnp.square(jnp.sqrt(est + slack) + 2 * summing)
    unscale = jnp.ldexp(jnp.ones((), sq.dtype), 2 * (e_x + e_g))  # 4^(e_x + e_g), exact (inf beyond range)
    return _trusted_or_direct(
        site, leaf_value, d_in, gm, sq * unscale, bound * unscale, jnp.isfinite(q), mask, example_pieces
    )


def _trusted_or_direct(site: _Site, leaf_value, d_in: int, gm, sq, bound, finite, mask, example_pieces):
    """The Gram norms where their bound is within 2.5% of every example's estimate; otherwise (cancellation)
    the norms of each example's own gradient, formed one example at a time, and a :class:`Fallback`
    that sums exactly those (see :func:`site_norms`)."""
    d_out = gm.shape[2]
    loose = jnp.isfinite(sq) & finite & (bound > _GRAM_TRUST**2 * jnp.maximum(sq, 0.0))
    if mask is not None:  # masked rows (padding, anything) never send the chunk to the slow path
        loose = loose & (mask > 0)
    use = jnp.any(loose)
    # A standardised kernel: each example's X^T G goes back through the standardisation's Jacobian
    # before its norm is taken and before it is added (the vmap path's per-example gradient).
    per_example = _reparam_index(site.chain) is not None

    def gradient(i):
        block = _one_block(example_pieces, gm, i)
        return _to_leaf(site, leaf_value, block[None])[0] if per_example else block

    def direct_norms():
        exact, exact_bound = jax.lax.map(
            lambda i: sq_norm_and_bound(_wide_value(gradient(i))[None]), jnp.arange(gm.shape[0])
        )
        return exact[:, 0].astype(sq.dtype), exact_bound[:, 0].astype(bound.dtype)

    sq, bound = jax.lax.cond(use, direct_norms, lambda: (sq, bound))

    def weighted_sum(w, keep):
        def add(acc, i):
            grad = gradient(i)
            return acc + jnp.where(keep[i], w[i].astype(grad.dtype) * grad, jnp.zeros((), grad.dtype)), None

        acc0 = jnp.zeros(jnp.shape(leaf_value) if per_example else (d_in, d_out), gm.dtype)
        total, _ = jax.lax.scan(add, acc0, jnp.arange(gm.shape[0]))
        return total if per_example else _to_leaf(site, leaf_value, total[None])[0]

    return sq, bound, None, Fallback(use, weighted_sum)


def _ws_channels_match(site: _Site, d_in: int, d_out: int) -> bool:
    """Whether a standardised kernel reaches its consumer unchanged in layout, output channels last and every
    other axis contracted: then the standardisation's channel c is the consumer's output feature c, and
    its n = d_in entries per channel are the columns of the layout's X (:func:`_ws_gram_norms`)."""
    i = _reparam_index(site.chain)
    if not all(e.primitive.name in ("convert_element_type", "copy") for e in site.chain[i + 1 :]):
        return False
    shape = tuple(site.chain[i].outvars[0].aval.shape)
    if len(shape) < 2 or shape[-1] != d_out or math.prod(shape[:-1]) != d_in:
        return False
    p = site.eqn.params
    if site.eqn.primitive.name == "conv_general_dilated":
        return p["dimension_numbers"][1][0] == len(shape) - 1  # the kernel's output-feature axis is its last
    (lc, rc), _ = p["dimension_numbers"]
    return set(lc if site.pos == 0 else rc) == set(range(len(shape) - 1))


def _ws_stats(site: _Site, leaf_value):
    """(w', 1/s): the standardised kernel as (n, d_out) and 1/s per output channel, in float32 or wider.

    The standardisation maps the kernel k (the leaf after its relayouts) to
    ``w' = (k - mean_c) / s_c`` with ``s_c = sqrt(var_c + eps)``, statistics per output channel.
    """
    i = _reparam_index(site.chain)
    k = _apply_steps(site.chain[:i], leaf_value, wide=True)  # widened: float32 or wider
    w = _apply_steps(site.chain[i:], k, wide=True)
    axes = tuple(range(k.ndim - 1))
    a = k - jnp.mean(k, axis=axes, keepdims=True)
    s = jnp.sqrt(jnp.mean(jnp.square(a), axis=axes) + float(site.chain[i].eps[0]))
    return w.reshape(-1, k.shape[-1]), 1.0 / s


def _ws_gram_norms(site: _Site, leaf_value, xs: _XStats, n: int, gm, zm, u, mask, example_pieces):
    """Per-example norms of a weight-standardised kernel's gradient without forming it (Gram form).

    With the standardised kernel ``w'_c = (k_c - mean) / s_c`` (n entries per output channel c) and
    ``g'_c = X^T G_c`` the example's gradient with respect to it, the gradient with respect to k
    (what autodiff computes, the vmap path's) is

        (1/s_c) P (g'_c - (beta_c / n) w'_c),   P = I - 1 1^T / n,   beta_c = <g'_c, w'_c>,

    whose squared norm is, with S_c = <g'_c, 1>, rho_c = ||w'_c||^2 / n and sigma_c = <w'_c, 1> (~0):

        (1/s_c^2) [ ||g'_c||^2 - S_c^2/n - (2 - rho_c) beta_c^2/n + 2 S_c beta_c sigma_c/n^2
                    - beta_c^2 sigma_c^2/n^3 ].

    Each term comes from the layer's input X and output gradient G: ||g'_c||^2 = <X X^T, G_c G_c^T>
    (the Gram form, per channel), S_c = sum_t (sum of x_t) G_tc, and beta_c = sum_t Z_tc G_tc with
    Z = X W' the layer's own output (recorded, computed at HIGHEST precision). The bound adds each
    term's rounding error in terms of Q_c = sum_t ||x_t|| |G_tc| (every term is at most ~Q_c^2),
    the weighted backward's and the Jacobian's own rounding, and 2.5% beyond that sends the chunk to
    each example's own gradient (:func:`_trusted_or_direct`), as for plain kernels.
    """
    t = gm.shape[1]
    w, inv_s = _ws_stats(site, leaf_value)
    u = max(u, _unit_roundoff(w, inv_s))
    rho = jnp.sum(jnp.square(w), axis=0) / n
    sigma = jnp.sum(w, axis=0)
    # Powers of two per example, as in _gram_norms (Z = X W' scales with X).
    e_x, e_g = xs.e_x, _pow2_exponent([gm])
    sz, sg = _scaled(zm, e_x), _scaled(gm, e_g)
    kg = jnp.matmul(xs.gram, sg, precision=_HIGHEST)  # (B, T, d_out)
    g_sq = jnp.sum(sg * kg, axis=1)  # ||g'_c||^2, (B, d_out)
    s_c = jnp.einsum("bt,btc->bc", xs.rows, sg, precision=_HIGHEST)  # rows: sum of each position's inputs
    beta = jnp.sum(sz * sg, axis=1)
    est = g_sq - jnp.square(s_c) / n - (2 - rho) * jnp.square(beta) / n
    est = est + 2 * s_c * beta * sigma / float(n) ** 2 - jnp.square(beta * sigma) / float(n) ** 3
    x_norm = jnp.sqrt(xs.sq)  # (B, T)
    x_abs = xs.abs  # (B, T): sum_k |x_tk| >= |sum of x_t|
    g_abs = jnp.abs(sg)
    grow = 1 + 2 * (n + t + 8) * u  # covers the rounding of these magnitudes themselves
    q_c = jnp.einsum("bt,btc->bc", x_norm, g_abs, precision=_HIGHEST) * grow + t * 2.0**-60 * math.sqrt(n)
    a_c = jnp.einsum("bt,btc->bc", x_abs, g_abs, precision=_HIGHEST) * grow
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=0)) * grow
    # Rounding of each term (gamma_k ~ k u): ||g'_c||^2 (Gram entries over n, two sums over T) is off by
    # <= (gamma_n + 2 gamma_T) Q_c^2; S_c by dS <= (gamma_n + gamma_T) A_c with A_c = sum_t (sum_k |x_tk|)
    # |G_tc|; beta_c by d_beta <= (gamma_n + gamma_T) ||w'_c|| Q_c (Z = X W' at HIGHEST, then T terms);
    # a square a^2 of a value off by d by (2|a| + d) d. The sigma terms are counted whole.
    d_s = (n + t + 2) * u * a_c * grow
    d_beta = (n + t + 2) * u * w_norm * q_c * grow
    abs_s, abs_beta = jnp.abs(s_c) + d_s, jnp.abs(beta) + d_beta
    sigma_abs = jnp.abs(sigma) + (n + 2) * u * jnp.sqrt(float(n)) * w_norm
    err = (n + 2 * t + 2) * u * jnp.square(q_c) * grow
    err = err + (abs_s + jnp.abs(s_c)) * d_s / n + (2 - rho + 4 * u) * (abs_beta + jnp.abs(beta)) * d_beta / n
    err = err + 4 * abs_s * abs_beta * sigma_abs / float(n) ** 2 + 2 * jnp.square(abs_beta * sigma_abs) / float(n) ** 3
    err = err + 8 * u * (jnp.abs(g_sq) + jnp.square(abs_s) / n + 2 * jnp.square(abs_beta) / n)  # the last few ops
    # Underflow as in _gram_norms, for each of the terms.
    nonzero = jnp.any(sg != 0, axis=(1, 2)) & xs.nonzero
    underflow = jnp.where(nonzero, 8 * t * t * (4 * n + 1) * (n + 1) * _TINY, 0.0)
    slack = 2 * err + underflow[:, None]  # twice: the gamma denominators and second-order terms
    inv_s2 = jnp.square(inv_s)
    sq = jnp.sum(inv_s2 * est, axis=-1)
    inner = jnp.sum(inv_s2 * (jnp.maximum(est, 0.0) + slack), axis=-1)
    # Added per example beyond that: the weighted backward's sum of X^T G (2 (T + 4) u Q_c per channel, as
    # in _gram_norms) taken through the Jacobian (norm <= 1/s_c), and the Jacobian's own rounding (two
    # sums of n terms: the mean and <g', w'>) relative to ||g'_c||; 1/s computed here against 1/s in the
    # derivative (n-term sums) multiplies.
    g_norm = jnp.sqrt(jnp.maximum(g_sq, 0.0) + slack)
    additive = u * jnp.sqrt(jnp.sum(inv_s2 * jnp.square(2 * (t + 4) * q_c + (2 * n + 16) * g_norm), axis=-1))
    bound = jnp.square(jnp.sqrt(inner) * (1 + 2 * (n + 8) * u) + additive)
    unscale = jnp.ldexp(jnp.ones((), sq.dtype), 2 * (e_x + e_g))
    finite = jnp.all(jnp.isfinite(q_c), axis=-1)
    return _trusted_or_direct(site, leaf_value, n, gm, sq * unscale, bound * unscale, finite, mask, example_pieces)


def site_weighted_sum(site: _Site, leaf_value, operands, g_weighted):
    """``sum_i`` of example i's gradient of this leaf with cotangent ``g_weighted[i]``: one batched backward."""

    def batched(w):
        return jax.vmap(lambda ops: _apply_site(site, w, ops), axis_size=g_weighted.shape[0])(operands)

    # Widened (_apply_site): under mixed precision the weighted cotangent is not rounded to bfloat16, and the
    # sum over the chunk is not formed in it (a bfloat16 sum would be off by ~2^-8 of all examples together).
    out, vjp = jax.vjp(batched, _wide_value(leaf_value))  # a bfloat16 leaf: its sum is not rounded to it
    (gw,) = vjp(g_weighted.astype(out.dtype))
    return gw


def leaf_names(params: PyTree) -> list[str]:
    """``params['a']['kernel']``-style names of the parameter leaves, in flattening order (for messages)."""
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    return ["params" + jax.tree_util.keystr(p) for p, _ in paths]


class GhostPlan(NamedTuple):
    """An analysed one-example loss: its jaxpr, the one linear use of each parameter leaf, its output tree."""

    closed: Any
    sites: list[_Site]
    out_tree: Any


def analyse(fun, params, example_args) -> GhostPlan:
    """Trace ``fun(params, *example_args)`` (one example) and find its parameter sites.

    Returns ``(closed_jaxpr, sites, out_tree)``; raises :class:`GhostUnsupported`.
    """
    leaves = jax.tree_util.tree_leaves(params)
    names = leaf_names(params)
    for name, leaf in zip(names, leaves, strict=True):
        _check_dtype(jnp.result_type(leaf), f"parameter {name} is")
    out_tree = []

    def flat(p, *a):
        out = fun(p, *a)
        leaves_out, tree = jax.tree_util.tree_flatten(out)
        out_tree.append(tree)
        return leaves_out

    abstract = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)), params)
    closed = jax.make_jaxpr(flat)(abstract, *example_args)
    n = len(leaves)
    tags = [_Tag(i) for i in range(n)] + [None] * (len(closed.jaxpr.invars) - n)
    interp = _Interpreter(names)

    def evaluate(*args):
        outs, outtags = interp.run(closed.jaxpr, closed.consts, args, tags)
        for t in outtags:
            if t is not None:
                interp._refuse(t, "returned by the loss function itself")
        return outs

    in_avals = [v.aval for v in closed.jaxpr.invars]
    jax.eval_shape(evaluate, *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals])
    for site in interp.sites:
        # Every value on the way, not only the result: a complex or 8-bit value anywhere on the site.
        for dtype in _site_dtypes(site)[1:]:
            _check_dtype(
                dtype,
                f"parameter {_describe(site.leaf, interp.names)} meets a {jnp.dtype(dtype).name} value in "
                f"`{site.eqn.primitive.name}`:",
            )
    return GhostPlan(closed, interp.sites, out_tree[0])


def _is_index(site: _Site, i: int) -> bool:
    """The indices operand of a gather (integer by nature)."""
    return site.eqn.primitive.name == "gather" and i == 1


def _check_dtype(dtype, what: str) -> None:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise GhostUnsupported(
            f"{what} complex; ghost clipping covers real arithmetic only (its norm formulas do not conjugate). "
            "Use clipping_impl='vmap'."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise GhostUnsupported(f"{what} {dtype.name}, not floating point; use clipping_impl='vmap'.")
    if jnp.finfo(dtype).bits < 16:
        raise GhostUnsupported(
            f"{what} {dtype.name}; ghost clipping takes float16, bfloat16 and wider (it forms norms and the clipped "
            "sum from them in float32). Use clipping_impl='vmap' for 8-bit floats."
        )


def explain(plan: GhostPlan, params: PyTree, batch: int) -> list[dict]:
    """One row per site of an analysed loss: how ghost takes its per-example norms at this batch size.

    Each row: ``parameter`` (leaf name), ``op`` (the consuming primitive), ``form``
    (:func:`_choose_form`), ``standardised`` (through :func:`jaxdp.models.weight_standardize`),
    ``T``, ``d_in``, ``d_out`` (None for the per-parameter form; for an embedding, d_in is the
    vocabulary), and for kernels the two costs the choice compares, in multiply-adds for the
    whole batch: ``gram_cost`` = B T^2 (d_in + d_out) and ``direct_cost`` = B T d_in d_out (an
    embedding takes its formula when T^2 < 8 V). Only traces shapes; nothing is computed.
    """
    names = leaf_names(params)
    rows = []
    for site in plan.sites:
        avals = [site.eqn.invars[i].aval for i in _recorded(site.eqn, site.pos)]
        ops = [jax.ShapeDtypeStruct((batch, *a.shape), a.dtype) for a in avals]
        g = jax.ShapeDtypeStruct((batch, *site.out_shape), site.out_dtype)
        found = {}

        def trace(ops, g, site=site, found=found):
            form, _, dims = _choose_form(site, ops, g)
            found.update(form=form, dims=dims)
            return jnp.zeros(())

        jax.eval_shape(trace, ops, g)
        t, d_in, d_out = found["dims"] or (None, None, None)
        rows.append(
            {
                "parameter": _describe(site.leaf, names),
                "op": site.eqn.primitive.name,
                "form": found["form"],
                "standardised": _reparam_index(site.chain) is not None,
                "T": t,
                "d_in": d_in,
                "d_out": d_out,
                "gram_cost": None if t is None or found["form"] == "embedding" else batch * t * t * (d_in + d_out),
                "direct_cost": None if t is None or found["form"] == "embedding" else batch * t * d_in * d_out,
            }
        )
    return rows


def run_with_probes(closed, sites, names, flat_args, probes):
    """Evaluate the analysed jaxpr with probes added at the sites; returns (outs, operands per site)."""
    tags = [_Tag(i) for i in range(len(names))] + [None] * (len(flat_args) - len(names))
    interp = _Interpreter(names, probes=probes, sites=sites)
    outs, _ = interp.run(closed.jaxpr, closed.consts, flat_args, tags)
    if len(interp.operands) != len(sites):
        raise AssertionError("ghost clipping: the probed run found a different number of sites than the analysis")
    return outs, interp.operands


# -- the ghost path: one loss analysed, one chunk of examples clipped and summed -------------------


def analyse_loss(loss_of_one: Callable[..., Any], params: PyTree, batched_nums: Sequence[int], args) -> GhostPlan:
    """The one-example loss traced and its parameter uses checked (:func:`analyse`).

    ``loss_of_one(p, *example_args) -> (loss, aux)`` is the loss of one example
    (:func:`jaxdp.clipping.vmap.example_loss`); ``args`` are the call's arguments, the
    batched ones (``batched_nums``, 1-based) with their example axis. Raises
    :class:`GhostUnsupported`.
    """
    one = [
        jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v)[1:], jnp.result_type(v)), a)
        if (i + 1) in batched_nums
        else a
        for i, a in enumerate(args)
    ]
    return analyse(loss_of_one, params, one)


def check_traces(
    plan: GhostPlan, params: PyTree, batched_nums: Sequence[int], args, *, l2_clip_norm: float, per_layer: bool
) -> None:
    """Trace the whole ghost chunk abstractly (nothing is computed); a failure raises :class:`GhostUnsupported`.

    ``"auto"`` and :meth:`jaxdp.ClippedGradFn.ghost_coverage` call it: a model the analysis
    accepts but the ghost path cannot run is a reason to use vmap, not an error.
    """

    def abstract(v):
        return jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) if hasattr(v, "shape") else v

    size = jax.tree_util.tree_leaves(args[batched_nums[0] - 1])[0].shape[0]
    try:
        jax.eval_shape(
            lambda p, a: chunk(
                plan,
                p,
                batched_nums,
                a,
                jnp.ones((size,), jnp.float32),
                l2_clip_norm=l2_clip_norm,
                per_layer=per_layer,
            ),
            jax.tree_util.tree_map(abstract, params),
            jax.tree_util.tree_map(abstract, list(args)),
        )
    except Exception as e:  # anything: auto must never fail where vmap works
        raise GhostUnsupported(f"the ghost path did not trace ({type(e).__name__}: {e})") from e


def chunk(
    plan: GhostPlan,
    params: PyTree,
    batched_nums: Sequence[int],
    args,
    mask: jax.Array,
    *,
    l2_clip_norm: float,
    per_layer: bool,
) -> ChunkSum:
    """One chunk of examples on the ghost path: one backward pass to the probes gives every site's output
    gradients, :func:`site_norms` the per-leaf norms, :func:`jaxdp.clipping.core.clip_factors` the factors,
    and per leaf one weighted backward pass (or the sum of the gradients already formed) the clipped sum."""
    closed, sites, out_tree = plan
    names = leaf_names(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    size = mask.shape[0]
    in_axes = (0, *[0 if (i + 1) in batched_nums else None for i in range(len(args))])

    def one(probes, *a):
        outs, operands = run_with_probes(closed, sites, names, leaves + jax.tree_util.tree_leaves(a), probes)
        loss, aux = jax.tree_util.tree_unflatten(out_tree, outs)
        return loss, aux, operands

    def total(probes):
        loss, aux, operands = jax.vmap(one, in_axes=in_axes)(probes, *args)
        return jnp.sum(loss.astype(jnp.float32)), (loss, aux, operands)

    probes = [jnp.zeros((size, *s.out_shape), s.out_dtype) for s in sites]
    _, vjp_fn, (loss, aux, operands) = jax.vjp(total, probes, has_aux=True)
    (cotangents,) = vjp_fn(jnp.ones((), jnp.float32))
    operands, cotangents = list(operands), list(cotangents)
    for k, site in enumerate(sites):
        if _narrow(site):
            # One float32 copy of the recorded low-precision values, behind a barrier, read by the norms and by
            # the sum alike. Without it XLA (whose default allows excess precision) fed the weighted backward an
            # unrounded float32 X or G where the norm read the bfloat16-rounded one: up to 1.001 C per example.
            operands[k], cotangents[k] = jax.lax.optimization_barrier(
                ([_wide_value(o) for o in operands[k]], _wide_value(cotangents[k]))
            )

    leaf_sq = [jnp.zeros((size,), jnp.float32) for _ in leaves]
    leaf_bound = list(leaf_sq)
    materialised, fallbacks = {}, {}
    # The direct sites' kept gradients are formed only once every site's output gradient exists
    # (jaxdp.schedule.after: the same computation whatever those hold). Formed as soon as their own G existed,
    # as XLA's CPU scheduler chose, they were held through the rest of the backward beside the earlier layers'
    # activations: WRN-16-4's stage-2 kernels, 18 MB each at batch 32; its private step planned 311 MB against
    # the non-private step's 234 MB (now 246 MB).
    for k, site in enumerate(sites):

        def norms_k(ops, g, site=site):
            return site_norms(site, leaves[site.leaf], ops, g, mask)

        if _choose_form(site, _split_output(site, operands[k])[0], cotangents[k])[0] == "direct":
            sq, bound, per_ex, fallback = after(cotangents, norms_k, operands[k], cotangents[k])
        else:
            sq, bound, per_ex, fallback = norms_k(operands[k], cotangents[k])
        leaf_sq[site.leaf], leaf_bound[site.leaf] = sq, bound
        if per_ex is not None:
            materialised[k] = per_ex, sq  # sq finite: per_ex holds no NaN/inf (scaled_sum may take one product)
        if fallback is not None:
            fallbacks[k] = fallback
    factors, keep, norms, stats = clip_factors(
        leaf_sq, mask, l2_clip_norm=l2_clip_norm, per_layer=per_layer, leaf_bound=leaf_bound
    )

    def kept(x):
        # `where` (not a multiply): a dropped example's NaN/inf contributes exactly zero.
        return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))

    def weighted_backward(k, site, w):
        g = cotangents[k]
        g_w = kept(g * w.astype(jnp.promote_types(g.dtype, jnp.float32)).reshape((-1,) + (1,) * (g.ndim - 1)))
        return site_weighted_sum(site, leaves[site.leaf], [kept(o) for o in operands[k]], g_w)

    summed = [jnp.zeros(leaf.shape, jnp.promote_types(leaf.dtype, jnp.float32)) for leaf in leaves]
    for k, site in enumerate(sites):
        if k in materialised:  # the gradients whose norms were taken, scaled and summed (as on the vmap path)
            per_ex, sq = materialised[k]
            total_k = scaled_sum(per_ex, factors[site.leaf], keep, jnp.isfinite(sq))
        elif k in fallbacks:  # norms from each example's own X^T G when fb.use: then sum those products
            w, fb = jnp.where(keep, factors[site.leaf], 0.0), fallbacks[k]
            # The weighted backward runs outside the cond, and is discarded when fb.use: inside a cond
            # branch XLA's CPU backend ran WRN-16-4's weight-gradient convolutions ~4x slower.
            backward = weighted_backward(k, site, w)
            total_k = jax.lax.cond(
                fb.use,
                lambda b=backward, fb=fb, w=w: fb.weighted_sum(w, keep).astype(b.dtype),
                lambda b=backward: b,
            )
        else:
            total_k = weighted_backward(k, site, jnp.where(keep, factors[site.leaf], 0.0))
        summed[site.leaf] = total_k.astype(summed[site.leaf].dtype)
    return ChunkSum(jax.tree_util.tree_unflatten(treedef, summed), loss, aux, norms, stats)
