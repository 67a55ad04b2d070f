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

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdp
from jaxdp.train import TrainCallback

__all__ = ["BiasProbe", "bam_example_grad", "clipping_bias", "method_hooks", "sat_perturb"]


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


BIAS_KEYS = ("bias", "cosine", "bias_bound", "clipped_fraction", "norm_median", "grad_norm")
ORACLE_KEYS = ("oracle_bias", "oracle_cosine")


def clipping_bias(grads: np.ndarray, l2_clip_norm: float, estimator: np.ndarray | None = None) -> dict:
    """The clipping bias of one set of per-example gradients, exactly (float64).

    ``grads`` is ``(n, d)``: the plain per-example loss gradients g_i. With c_i = g_i·min(1, C/‖g_i‖) the
    clipped ones (an expected Poisson draw sums to q·Σ c_i, so the noisy step estimates mean c_i):

    * ``bias``: ‖mean c_i − mean g_i‖, the actual bias of the clipped mean as an estimate of the gradient;
    * ``cosine``: cos(mean c_i, mean g_i), their alignment (1 = clipping only rescales);
    * ``bias_bound``: mean max(0, ‖g_i‖ − C), the bound on ``bias`` by the triangle inequality;
    * ``clipped_fraction``, ``norm_median``: the share of ‖g_i‖ > C and the median ‖g_i‖;
    * ``grad_norm``: ‖mean g_i‖, the size of what is estimated.

    ``estimator`` (``(n, d)``, optional): the per-example vectors a method actually clips instead of g_i
    (BAM's g_i^BAM); then ``oracle_bias`` = ‖mean clip(h_i) − mean g_i‖ and ``oracle_cosine`` are added:
    how far the method's clipped mean is from the true gradient.
    """
    g = np.asarray(grads, np.float64)
    if g.ndim != 2 or len(g) == 0:
        raise ValueError(f"grads has shape {g.shape}; expected (examples, parameters) with at least one example.")
    clip = float(l2_clip_norm)

    def clipped_mean(v):
        norms = np.linalg.norm(v, axis=1)
        scale = np.minimum(1.0, clip / np.maximum(norms, 1e-300))
        return (v * scale[:, None]).mean(axis=0), norms

    def cos(a, b):
        den = np.linalg.norm(a) * np.linalg.norm(b)
        return float(a @ b / den) if den > 0 else float("nan")

    mean = g.mean(axis=0)
    cmean, norms = clipped_mean(g)
    out = {
        "bias": float(np.linalg.norm(cmean - mean)),
        "cosine": cos(cmean, mean),
        "bias_bound": float(np.mean(np.maximum(norms - clip, 0.0))),
        "clipped_fraction": float(np.mean(norms > clip)),
        "norm_median": float(np.median(norms)),
        "grad_norm": float(np.linalg.norm(mean)),
    }
    if estimator is not None:
        h = np.asarray(estimator, np.float64)
        if h.shape != g.shape:
            raise ValueError(f"estimator has shape {h.shape}; it must match grads {g.shape}.")
        hmean, _ = clipped_mean(h)
        out["oracle_bias"] = float(np.linalg.norm(hmean - mean))
        out["oracle_cosine"] = cos(hmean, mean)
    return out


def _flat(tree: Any, n: int) -> np.ndarray:
    return np.concatenate([np.asarray(leaf, np.float64).reshape(n, -1) for leaf in jax.tree_util.tree_leaves(tree)], 1)


class BiasProbe(TrainCallback):
    """The actual clipping bias along training, on a fixed probe subset of the training data.

    Every ``every`` steps (and after step 1 and the last step) it takes the plain per-example gradients
    of the current parameters on the probe examples and records :func:`clipping_bias` of them. With
    ``example_grad`` (BAM's estimator) it also records ``oracle_bias`` / ``oracle_cosine``: the bias of
    what that method clips. The same yardstick serves every method: the plain-gradient bias is what
    DP-SGD's estimator would have at the method's parameters, which is what BAM claims to lower.

    The probe is ``size`` training examples drawn once with a public seed. These statistics read
    private data without noise: research diagnostics, listed under ``not_covered_by_epsilon``. The
    record is kept in every checkpoint, so a resumed run continues it.
    """

    def __init__(self, size: int = 512, every: int = 10, example_grad: jaxdp.ExampleGradFn | None = None, chunk=256):
        if not (isinstance(size, int) and size > 0 and isinstance(every, int) and every > 0):
            raise ValueError(f"BiasProbe(size={size!r}, every={every!r}): both must be ints > 0.")
        self.size, self.every, self.example_grad, self.chunk = size, every, example_grad, chunk
        self.keys = BIAS_KEYS + (ORACLE_KEYS if example_grad is not None else ())

    def on_start(self, *, predict_logits, dataset, plan) -> None:
        if plan.per_layer:
            raise ValueError("BiasProbe measures whole-gradient clipping; this plan clips per layer.")
        self.clip, self.num_steps = float(plan.l2_clip_norm), int(plan.num_steps)
        n = len(dataset.y_train)
        idx = np.sort(np.random.default_rng(12345).choice(n, min(self.size, n), replace=False))  # public seed
        self.x, self.y = np.asarray(dataset.x_train[idx]), np.asarray(dataset.y_train[idx])

        def loss(p, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(predict_logits(p, x), y).mean()

        self._grads = jax.jit(jaxdp.clipped_grad(loss, l2_clip_norm=self.clip).per_example_grads)
        self._oracle = None
        if self.example_grad is not None:
            fn = jaxdp.clipped_grad(loss, l2_clip_norm=self.clip, example_grad=self.example_grad)
            self._oracle = jax.jit(fn.per_example_grads)
        self.steps = sorted({1, self.num_steps, *range(self.every, self.num_steps + 1, self.every)})
        self._index = {s: i for i, s in enumerate(self.steps)}  # on_step runs every step: a dict, not a list search
        self.record = np.full((len(self.steps), len(self.keys)), np.nan)
        self.done = np.zeros(len(self.steps), bool)  # probed (a non-finite measurement stays NaN, and is kept)

    def _per_example(self, fn, params) -> np.ndarray:
        out = []
        for start in range(0, len(self.y), self.chunk):
            xb, yb = self.x[start : start + self.chunk], self.y[start : start + self.chunk]
            n = len(yb)
            if n < self.chunk:  # one compiled shape: pad with copies, then drop them
                xb = np.concatenate([xb, np.repeat(xb[:1], self.chunk - n, axis=0)])
                yb = np.concatenate([yb, np.repeat(yb[:1], self.chunk - n, axis=0)])
            out.append(_flat(fn(params, xb, yb)[0], self.chunk)[:n])
        return np.concatenate(out)

    def measure(self, params) -> dict:
        """:func:`clipping_bias` of the probe examples at ``params``."""
        grads = self._per_example(self._grads, params)
        oracle = self._per_example(self._oracle, params) if self._oracle is not None else None
        return clipping_bias(grads, self.clip, oracle)

    def on_step(self, step: int, params) -> None:
        i = self._index.get(step)
        if i is not None:
            stats = self.measure(params)
            self.record[i] = [stats[k] for k in self.keys]
            self.done[i] = True

    def history(self) -> list[dict]:
        """One dict per probed step (``step`` and the keys), in order; steps not reached are left out."""
        return [
            {"step": s, **dict(zip(self.keys, map(float, row), strict=True))}
            for s, row, done in zip(self.steps, self.record, self.done, strict=True)
            if done
        ]

    def state_template(self, params):
        return {"record": np.zeros_like(self.record), "done": np.zeros_like(self.done)}

    def state_dict(self):
        return {"record": self.record, "done": self.done}

    def load_state_dict(self, state) -> None:
        self.record = np.array(state["record"], np.float64)
        self.done = np.array(state["done"], bool)

    def on_end(self, params, workdir: str) -> dict:
        history = self.history()
        with open(os.path.join(workdir, "bias.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
        final = history[-1] if history else {}
        out = {f"final_{k}": final.get(k, float("nan")) for k in self.keys}
        out["bias_history"] = history
        out["not_covered_by_epsilon"] = [*out.keys()]
        return out
