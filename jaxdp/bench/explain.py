"""``jaxdp bench --explain``: per model and batch size, how the ghost path takes each parameter's norms.

Shapes only (the loss is traced, nothing is computed): per parameter use, the form
:func:`jaxdp.clipping.ghost.explain` chooses and the two costs it compares, or why ghost does
not cover the model (``auto`` then uses the vmap path).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax.numpy as jnp

import jaxdp
from jaxdp.bench.models import MODELS, split_model

__all__ = ["explain_markdown"]

_FORMS = {
    "gram": "Gram <XXᵀ, GGᵀ>",
    "ws_gram": "Gram, through weight standardisation",
    "direct": "direct XᵀG (kept for the sum)",
    "embedding": "embedding token matches",
    "parameter": "per-example gradient of the leaf",
}


def _count(x) -> str:
    return "" if x is None else f"{x:,}"


def explain_markdown(models: Sequence[str], batch_sizes: Sequence[int] | None, full: bool = False) -> str:
    """Markdown: one table per (model, batch) of the ghost path's choice per parameter use."""
    out = []
    for name in models:
        spec = MODELS[name]
        data = spec.data()
        _, params, _, loss_fn = split_model(name)
        for batch in batch_sizes or (spec.full_batches if full else spec.quick_batches):
            x, y = jnp.asarray(data.x_train[:batch]), jnp.asarray(data.y_train[:batch])
            rows = jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).explain_ghost(params, x, y)
            if isinstance(rows, str):
                out.append(f"### {name}, batch {batch}: vmap path (ghost does not cover it)\n\n{rows}\n")
                continue
            lines = [
                f"### {name}, batch {batch}: ghost path (`auto` takes it)",
                "",
                "Costs: multiply-adds for the batch, B·T²·(d_in + d_out) for the Gram form and B·T·d_in·d_out for "
                "the direct form; the Gram form is taken when twice its cost is below the direct one's (its "
                "rounding bound and scaling cost about as much again). An embedding's d_in is its vocabulary V; its "
                "token-match formula is taken when T² < 8·V.",
                "",
                "| parameter | op | form | T | d_in | d_out | Gram cost | direct cost |",
                "|---|---|---|---:|---:|---:|---:|---:|",
            ]
            for r in rows:
                lines.append(
                    f"| `{r['parameter']}` | {r['op']} | {_FORMS[r['form']]} | {_count(r['T'])} | "
                    f"{_count(r['d_in'])} | {_count(r['d_out'])} | {_count(r['gram_cost'])} | "
                    f"{_count(r['direct_cost'])} |"
                )
            counts = collections.Counter(r["form"] for r in rows)
            lines += ["", "Forms: " + ", ".join(f"{_FORMS[k]} × {v}" for k, v in counts.items()), ""]
            out.append("\n".join(lines))
    return "\n".join(out)
