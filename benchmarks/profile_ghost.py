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
import resource

import jax
import jax.numpy as jnp
import numpy as np

import jaxdp
from jaxdp.bench import MODELS, time_interleaved
from jaxdp.bench.models import split_model
from jaxdp.clipping import ghost
from jaxdp.host import keep_freed_memory, malloc_setting

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


def host_cost(fn, calls: int = 10) -> tuple[float, float]:
    """(minor page faults, kernel ms) per call of ``fn``, from the process's resource usage."""
    fn()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_minflt - r0.ru_minflt) / calls, (r1.ru_stime - r0.ru_stime) * 1e3 / calls


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
    calls = {k: (lambda f=f: jax.block_until_ready(f(params, x, y))) for k, f in variants.items()}
    timings = time_interleaved(calls, repeats)
    base = timings["non-private"].seconds
    print(f"\n{name}, batch {batch} ({jax.default_backend()}; {malloc_setting()}): ms per call, non-private / that,")
    print("and the host's minor page faults and kernel time per call")
    print("| part | ms | non-private / this | page faults | kernel ms |\n|---|---:|---:|---:|---:|")
    for label, t in timings.items():
        faults, kernel_ms = host_cost(calls[label])
        print(f"| {label} | {t.seconds * 1e3:.1f} | {base / t.seconds:.2f} | {faults:,.0f} | {kernel_ms:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="default: mnist_cnn transformer wrn16_4")
    parser.add_argument("--batch", type=int, default=None, help="default: 256, 256, 32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's malloc as it is (default: jaxdp.host.keep_freed_memory)",
    )
    args = parser.parse_args()
    if not args.malloc_defaults:
        keep_freed_memory()
    grid = [(m, args.batch or dict(DEFAULT).get(m, 64)) for m in args.models] if args.models else list(DEFAULT)
    for name, batch in grid:
        profile(name, batch, args.repeats)


if __name__ == "__main__":
    main()
