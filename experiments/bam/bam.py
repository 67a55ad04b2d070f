"""Bias-Aware Minimisation (BAM) and its DP-SAT baseline, on jaxdp's per-example machinery.

BAM (Knolle, Dorfman, Ziller, Rueckert, Kaissis 2023) minimises ``l_i + lam * ||grad l_i||``
per example, which shrinks per-example gradient norms and with them the clipping bias
``mean_i max(0, ||g_i|| - C)``. Its gradient is taken SAM-style, by a finite
difference along the example's *own* normalised gradient::

    g_i^BAM = (1 - alpha) * grad l_i(theta) + alpha * grad l_i(theta + r * g_i / ||g_i||),   alpha = lam / r

To first order in r this is ``g_i + lam * H_i g_i / ||g_i||``, the exact gradient of
``l_i + lam ||g_i||``. ``alpha = 1`` is per-example SAM with radius r.

Privacy: :func:`bam_example_grad` is a :data:`jaxdp.ExampleGradFn`, handed one
example's ``value_and_grad`` and nothing else, so g_i^BAM is a function of example i
alone: it is clipped like any per-example gradient and the accounting is unchanged.
An ascent along the *batch* gradient (plain SAM) would mix examples before clipping;
this interface cannot express it.

DP-SAT (Park et al. 2023) instead ascends, for all examples, along the previous
step's already-privatised gradient: post-processing, free in privacy
(:func:`sat_perturb`, used through ``make_private_step(perturb=...)``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdp
from jaxdp.train import TrainCallback

__all__ = ["GradientNormProbe", "bam_example_grad", "method_hooks", "sat_perturb"]


def _check_radius(radius: float) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not (0 < radius < math.inf):
        raise ValueError(f"radius={radius!r} must be a finite number > 0 (the ascent step r, e.g. 0.05).")
    return float(radius)


def _ascend(params: Any, direction: Any, radius: float) -> Any:
    """``params + radius * direction / ||direction||`` (in >= float32); no move for a zero or non-finite direction."""
    if any(jnp.iscomplexobj(leaf) for leaf in jax.tree_util.tree_leaves(params)):
        raise TypeError(
            "BAM and DP-SAT ascend along real gradients; these params have complex leaves, whose ascent "
            "direction is the conjugate gradient (see jaxdp.optimizers). Use them with real-valued models."
        )
    norm = optax.tree.norm(direction)
    move = jnp.isfinite(norm) & (norm > 0)
    scale = jnp.where(move, radius / jnp.where(move, norm, 1.0), 0.0)

    def point(p, d):
        # In at least float32: in bfloat16 a step of r/sqrt(#params) per coordinate can round away.
        p = p.astype(jnp.promote_types(p.dtype, jnp.float32))
        return jnp.where(move, p + scale * d, p)

    return jax.tree_util.tree_map(point, params, direction)


def bam_example_grad(*, radius: float, lam: float) -> jaxdp.ExampleGradFn:
    """BAM's per-example gradient ``(1 - a) g(theta) + a g(theta + r g/||g||)`` with ``a = lam / r``.

    Args:
      radius: the finite-difference radius r > 0 (the authors sweep r in (0, 0.1]).
      lam: the weight lambda >= 0 of the gradient-norm penalty; ``lam = 0`` is plain
        DP-SGD, ``lam = radius`` is per-example SAM.

    Returns:
      An :data:`jaxdp.ExampleGradFn` for ``jaxdp.clipped_grad(example_grad=...)``,
      ``PrivacyPlan.clipped_grad`` or ``jaxdp.train.train(example_grad=...)``. It costs
      two gradient evaluations per example. A zero gradient gives no ascent; a
      non-finite one stays non-finite (and is dropped by ``clipped_grad``).
    """
    radius = _check_radius(radius)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0 <= lam < math.inf):
        raise ValueError(f"lam={lam!r} must be a finite number >= 0 (the gradient-norm penalty, e.g. 0.01).")
    alpha = float(lam) / radius

    def example_grad(value_and_grad, params):
        (loss, aux), g = value_and_grad(params)
        _, g_adv = value_and_grad(_ascend(params, g, radius))
        grad = jax.tree_util.tree_map(lambda a, b: (1.0 - alpha) * a + alpha * b, g, g_adv)
        return (loss, aux), grad

    return example_grad


def sat_perturb(*, radius: float):
    """DP-SAT's ascent: ``perturb(params, prev) = params + r * prev / ||prev||``.

    ``prev`` is the previous step's privatised gradient (zeros before the first
    step, which is therefore an ordinary DP-SGD step). Use with
    ``make_private_step(perturb=...)`` / ``train(perturb=...)``.
    """
    radius = _check_radius(radius)

    def perturb(params, prev):
        return _ascend(params, prev, radius)

    return perturb


def method_hooks(bam_config) -> dict:
    """``train()`` keyword arguments for ``config.bam`` (method ``dpsgd`` | ``dpsat`` | ``bam``)."""
    method = bam_config.method
    if method == "dpsgd":
        return {}
    if method == "dpsat":
        return {"perturb": sat_perturb(radius=bam_config.sat_radius)}
    if method == "bam":
        return {"example_grad": bam_example_grad(radius=bam_config.radius, lam=bam_config.lam)}
    raise ValueError(f"bam.method={method!r} is not known; choose 'dpsgd', 'dpsat' or 'bam'.")


class GradientNormProbe(TrainCallback):
    """After training: plain per-example gradient norms of the final model on training examples.

    The same yardstick for every method (BAM's training-time norms are of g^BAM, not
    of grad l_i): mean ||grad l_i|| and the clipping bias bound mean max(0, ||grad l_i|| - C)
    over the first ``max_examples`` training examples. Computed on private data
    without noise: a research diagnostic, not covered by epsilon.
    """

    def __init__(self, max_examples: int = 2048, chunk: int = 256):
        self.max_examples, self.chunk = max_examples, chunk

    def on_start(self, *, predict_logits, dataset, plan) -> None:
        self.logits, self.dataset, self.clip, self.per_layer = (
            predict_logits,
            dataset,
            plan.l2_clip_norm,
            plan.per_layer,
        )

    def on_end(self, params, workdir: str) -> dict:
        def loss(p, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(self.logits(p, x), y).mean()

        fn = jax.jit(jaxdp.clipped_grad(loss, l2_clip_norm=self.clip, return_norms=True))
        x = self.dataset.x_train[: self.max_examples]
        y = self.dataset.y_train[: self.max_examples]
        norms = []
        for start in range(0, len(x), self.chunk):
            xb, yb = x[start : start + self.chunk], y[start : start + self.chunk]
            n = len(xb)
            mask = np.zeros(self.chunk, np.float32)
            mask[:n] = 1.0
            if n < self.chunk:  # one shape for every chunk: pad with masked copies
                xb = np.concatenate([xb, np.repeat(xb[:1], self.chunk - n, axis=0)])
                yb = np.concatenate([yb, np.repeat(yb[:1], self.chunk - n, axis=0)])
            _, aux = fn(params, xb, yb, example_mask=mask)
            norms.append(np.asarray(aux.norms)[:n])
        norms = np.concatenate(norms)
        stats = jaxdp.gradient_norm_stats(norms, np.ones_like(norms), l2_clip_norm=self.clip)
        out = {"final_grad_norm_mean": float(stats["grad_norm_mean"])}
        if not self.per_layer:  # max(0, ||g|| - C) bounds the bias of whole-gradient clipping only
            out["final_clip_bias_bound"] = float(stats["clip_bias_bound"])
        return out
