"""How fast XLA's CPU dot forms ghost's per-example products in each operand layout, and what the DP MNIST
CNN's convolution products alone cost beside its gradients.

    .venv/bin/python benchmarks/dot_layouts.py            # the layouts, then the MNIST CNN (~1 min)
    .venv/bin/python benchmarks/dot_layouts.py --no-model # the layouts only

1. **Dense per-example X^T G** (``B, T, d`` by ``B, T, e``, the positions T contracted), the same product in
   four layouts: X as recorded (positions in the middle), X transposed inside the jit (XLA folds the
   transpose back into the dot), X transposed behind ``lax.optimization_barrier`` (what ghost's
   ``_example_blocks`` does), and X handed over already laid out (B, d, T) (the product alone). Each line
   also says which kernel XLA's CPU backend chose: with the positions in the middle its generic dot, with
   them last a YNNPACK fusion. Alone, the copy eats most of the difference (0.86-1.34x, shape to shape and run
   to run); inside the private step, where the generic dots ran beside the rest of the backward, they took
   2-3 ms each in a trace against 0.4-0.9 ms for the YNNPACK fusions (benchmarks/README.md).
2. **A convolution's per-example product** from its transposed im2col matrix (``B, K C, T``) and G
   (``B, T, d``), in three operand orders, at the MNIST CNN's two layers' shapes.
3. **The MNIST CNN** (on unless ``--no-model``): its non-private gradient, its ghost gradient and its two
   convolutions' per-example products alone (im2col given), timed side by side. The "floor" line is the
   non-private gradient plus the products alone: a comparison, not a bound (it counts the weight-gradient
   convolutions that ghost skips, and none of the im2col, norms and sum that ghost adds).

Every variant's result is checked against the first (the same product): a layout changes the time, not the
values. Times are ``time_interleaved`` medians; nothing here is a test.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.bench import time_interleaved
from jaxdp.host import keep_freed_memory

_HIGHEST = jax.lax.Precision.HIGHEST


def _kernel(compiled) -> str:
    """Which of XLA's CPU kernels ran the product: a YNNPACK fusion or its generic dot."""
    return "YNNPACK" if "ynn_fusion" in compiled.as_text() else "generic dot"


def _time(fns: dict, args, repeats: int) -> dict[str, tuple[float, str]]:
    jitted = {k: jax.jit(f).lower(*args).compile() for k, f in fns.items()}
    first = None
    for k, f in jitted.items():
        out = np.asarray(f(*args))
        if first is None:
            first = out
        elif not np.allclose(out, first, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(first)))):
            raise AssertionError(f"{k}: not the same product as the first variant")
    t = time_interleaved({k: (lambda f=f: f(*args)) for k, f in jitted.items()}, repeats)
    return {k: (v.seconds * 1e3, _kernel(jitted[k])) for k, v in t.items()}


def _normal(seed: int, *shapes) -> list[jax.Array]:
    """Standard normal arrays of the given shapes, one key each."""
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]


def dense_layouts(b: int, t: int, d: int, e: int, repeats: int) -> dict[str, tuple[float, str]]:
    """(ms per call, kernel) of the dense per-example product in each layout of X."""
    x, g = _normal(0, (b, t, d), (b, t, e))
    x_dt = jnp.swapaxes(x, 1, 2).copy()
    fns = {
        "positions in the middle": lambda x, g, x_dt: jnp.einsum("btd,bte->bde", x, g, precision=_HIGHEST),
        "transposed in the jit": lambda x, g, x_dt: jnp.einsum(
            "bdt,bte->bde", jnp.swapaxes(x, 1, 2), g, precision=_HIGHEST
        ),
        "transposed behind a barrier (jaxdp)": lambda x, g, x_dt: jnp.einsum(
            "bdt,bte->bde", jax.lax.optimization_barrier(jnp.swapaxes(x, 1, 2)), g, precision=_HIGHEST
        ),
        "laid out (B, d, T) before (product alone)": lambda x, g, x_dt: jnp.einsum(
            "bdt,bte->bde", x_dt, g, precision=_HIGHEST
        ),
    }
    return _time(fns, (x, g, x_dt), repeats)


def conv_orders(b: int, p: int, t: int, d: int, repeats: int) -> dict[str, tuple[float, str]]:
    """(ms per call, kernel) of a convolution's per-example product, im2col (B, p, T) given, in three operand orders."""
    cols, g = _normal(1, (b, p, t), (b, t, d))
    g_dt = jnp.swapaxes(g, 1, 2).copy()
    fns = {
        "bpt,btd->bpd (jaxdp)": lambda c, g, g_dt: jnp.einsum("bpt,btd->bpd", c, g, precision=_HIGHEST),
        "bpt,bdt->bpd": lambda c, g, g_dt: jnp.einsum("bpt,bdt->bpd", c, g_dt, precision=_HIGHEST),
        "bdt,bpt->bdp (transposed)": lambda c, g, g_dt: jnp.swapaxes(
            jnp.einsum("bdt,bpt->bdp", g_dt, c, precision=_HIGHEST), 1, 2
        ),
    }
    return _time(fns, (cols, g, g_dt), repeats)


def mnist_cnn_products(batch: int, repeats: int) -> dict[str, float]:
    """ms per call: the MNIST CNN's non-private and ghost gradients, and its convolutions' products alone."""
    import jaxdp
    from jaxdp.bench import MODELS
    from jaxdp.bench.models import split_model

    data = MODELS["mnist_cnn"].data()
    _, params, _, loss_fn = split_model("mnist_cnn")
    idx = np.random.default_rng(0).integers(0, len(data.x_train), batch)
    x, y = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
    grad = jax.jit(jax.grad(loss_fn))
    ghost = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, clipping_impl="ghost"))
    # conv1: 8x8 window on 1 channel, 14x14 positions, 16 out; conv2: 4x4 on 16 channels, 5x5 positions, 32 out.
    ops = _normal(2, (batch, 64, 196), (batch, 196, 16), (batch, 256, 25), (batch, 25, 32))
    products = jax.jit(
        lambda c1, g1, c2, g2: (
            jnp.einsum("bpt,btd->bpd", c1, g1, precision=_HIGHEST),
            jnp.einsum("bpt,btd->bpd", c2, g2, precision=_HIGHEST),
        )
    )
    calls = {
        "non-private gradient": lambda: grad(params, x, y),
        "ghost gradient": lambda: ghost(params, x, y),
        "conv products alone": lambda: products(*ops),
    }
    t = time_interleaved(calls, repeats)
    return {k: v.seconds * 1e3 for k, v in t.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-model", action="store_true", help="skip the MNIST CNN (no model, no data)")
    a = ap.parse_args(argv)
    keep_freed_memory()
    b = a.batch
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {b}; ms per call, medians")
    for t, d, e in ((32, 64, 64), (32, 64, 128)):
        ms = dense_layouts(b, t, d, e, a.repeats)
        base = ms["positions in the middle"][0]
        print(f"\ndense X^T G, T={t}, d={d}, e={e}")
        for k, (v, kernel) in ms.items():
            print(f"  {k:45s} {v:7.3f} ms  {base / v:5.2f}x  {kernel}")
    for p, t, d in ((64, 196, 16), (256, 25, 32)):
        ms = conv_orders(b, p, t, d, a.repeats)
        print(f"\nconvolution product, K C={p}, T={t}, d={d}")
        for k, (v, kernel) in ms.items():
            print(f"  {k:45s} {v:7.3f} ms  {kernel}")
    if not a.no_model:
        ms = mnist_cnn_products(b, a.repeats)
        npg, gh, prod = ms["non-private gradient"], ms["ghost gradient"], ms["conv products alone"]
        print(f"\nDP MNIST CNN, batch {b}")
        for k, v in ms.items():
            print(f"  {k:45s} {v:7.3f} ms")
        print(f"  ghost / non-private speed: {npg / gh:.3f}")
        print(f"  floor, non-private gradient + products alone (a comparison): {npg / (npg + prod):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
