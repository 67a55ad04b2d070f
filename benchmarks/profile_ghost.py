"""Where a ghost-clipped gradient's time goes, per bench model: one step's parts timed side by side.

    .venv/bin/python benchmarks/profile_ghost.py                       # mnist_cnn 256, transformer 256, wrn16_4 32
    .venv/bin/python benchmarks/profile_ghost.py --models wrn16_4 --batch 8

For each model, in one process and interleaved (jaxdp.bench.time_interleaved, medians):

* ``non-private``: ``jax.grad`` of the mean loss (no optimizer);
* ``ghost``: ``jaxdp.clipped_grad(..., clipping_impl="ghost")``, the clipped sum;
* ``ghost, no norms``: the same with every per-example norm replaced by a constant (the probe
  pass, the clip factors and the weighted sums remain): what the norms cost;
* ``ghost, no <form> norms``: only the sites of one form (``ghost._choose_form``: gram,
  ws_gram, direct, embedding, parameter) given a constant norm;
* ``vmap``: the vmap path.

The stubbed variants compute a wrong clipped sum: they measure cost only. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np

import jaxdp
from jaxdp.bench import MODELS, time_interleaved
from jaxdp.bench.models import split_model
from jaxdp.clipping import ghost

FORMS = ("gram", "ws_gram", "direct", "embedding", "parameter")
DEFAULT = (("mnist_cnn", 256), ("transformer", 256), ("wrn16_4", 32))


@contextlib.contextmanager
def constant_norms(forms):
    """Within the block, sites whose form is in ``forms`` get norm 1 without computing it (compile inside)."""
    original = ghost.site_norms

    def stub(site, leaf_value, operands, g, mask=None):
        ops = operands[:-1] if site.keeps_output else operands
        if ghost._choose_form(site, ops, g)[0] in forms:
            ones = jnp.ones((g.shape[0],), jnp.float32)
            return ones, ones, None, None
        return original(site, leaf_value, operands, g, mask)

    ghost.site_norms = stub
    try:
        yield
    finally:
        ghost.site_norms = original


def batch_of(name: str, batch: int):
    data = MODELS[name].data()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(data.x_train), batch)
    return jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])


def profile(name: str, batch: int, repeats: int) -> None:
    _, params, _, loss_fn = split_model(name)
    x, y = batch_of(name, batch)
    forms = {r["form"] for r in jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).explain_ghost(params, x, y)}
    variants = {"non-private": jax.jit(jax.grad(loss_fn))}
    variants["ghost"] = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, clipping_impl="ghost"))
    stubs = {"ghost, no norms": set(FORMS)} | {f"ghost, no {f} norms": {f} for f in FORMS if f in forms}
    for label, stubbed in stubs.items():
        with constant_norms(stubbed):
            fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, clipping_impl="ghost"))
            variants[label] = fn.lower(params, x, y).compile()  # compiled while stubbed
    variants["vmap"] = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, clipping_impl="vmap"))
    timings = time_interleaved({k: (lambda f=f: f(params, x, y)) for k, f in variants.items()}, repeats)
    base = timings["non-private"].seconds
    print(f"\n{name}, batch {batch} ({jax.default_backend()}): ms per call, and non-private / that")
    print("| part | ms | non-private / this |\n|---|---:|---:|")
    for label, t in timings.items():
        print(f"| {label} | {t.seconds * 1e3:.1f} | {base / t.seconds:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="default: mnist_cnn transformer wrn16_4")
    parser.add_argument("--batch", type=int, default=None, help="default: 256, 256, 32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    grid = [(m, args.batch or dict(DEFAULT).get(m, 64)) for m in args.models] if args.models else list(DEFAULT)
    for name, batch in grid:
        profile(name, batch, args.repeats)


if __name__ == "__main__":
    main()
