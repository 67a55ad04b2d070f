"""Throughput of one training step, measured side by side in one process.

For each model at a fixed batch: examples/s of
  * the ordinary (non-private) jitted step,
  * the jaxdp private step (clipped per-example grads + noise + update),
  * a naive private step (python loop over examples, one jitted grad each),
and the ratios private / non-private and private / naive.

    python benchmarks/bench_core.py                 # (`make bench` runs `jaxdp bench`)
    python benchmarks/bench_core.py --batch 128 --models cnn
    python benchmarks/bench_core.py --clipping-impl vmap   # per-example gradients materialised (default: auto)

Writes the markdown table to stdout and a JSON file to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxdp
from jaxdp.bench import time_interleaved, time_per_call  # the one timer of every benchmark
from jaxdp.keys import key_from_secret, new_secret
from jaxdp.models import CNN, MLP
from jaxdp.train import classification_loss

MODELS = {
    # name: (constructor, input shape of one example)
    "cnn": (lambda: CNN((28, 28, 1), 10, features=(16, 32), rngs=nnx.Rngs(0)), (28, 28, 1)),
    # Same network with flax's nnx.Conv: the fastest *non-private* step on CPU.
    "cnn-nnxconv": (lambda: CNN((28, 28, 1), 10, features=(16, 32), conv="nnx", rngs=nnx.Rngs(0)), (28, 28, 1)),
    "mlp": (lambda: MLP(784, 10, hidden=(256, 256), rngs=nnx.Rngs(0)), (28, 28, 1)),
}


def bench_model(name: str, batch: int, repeats: int, iters: int, naive_examples: int, impl: str = "auto") -> dict:
    make, shape = MODELS[name]
    graphdef, params, rest = nnx.split(make(), nnx.Param, ...)
    loss_fn = classification_loss(graphdef, rest)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    chunks = [(x, y, jnp.ones((batch,), jnp.float32))]  # one Poisson draw of exactly one chunk
    opt = optax.sgd(0.1)
    plan = jaxdp.PrivacyPlan(dataset_size=60000, batch_size=batch, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=1)

    # Non-private.
    np_step = jaxdp.make_nonprivate_step(loss_fn, opt)
    np_state = [jaxdp.init_state(params, opt)]

    def run_nonprivate():
        np_state[0], loss = np_step(np_state[0], x, y)
        return loss

    t0 = time.perf_counter()
    jax.block_until_ready(run_nonprivate())
    compile_np = time.perf_counter() - t0

    # jaxdp private.
    p_step = jaxdp.make_private_step(plan, loss_fn, opt, noise_key=key_from_secret(new_secret()), clipping_impl=impl)
    p_state = [p_step.init(params)]

    def run_private():
        p_state[0], metrics = jaxdp.run_private_step(p_step, p_state[0], chunks)
        return metrics["loss_sum"]

    t0 = time.perf_counter()
    jax.block_until_ready(run_private())
    compile_p = time.perf_counter() - t0

    # Naive: a python loop over examples, one jitted single-example gradient each.
    one_grad = jax.jit(jax.grad(loss_fn))
    privatizer = plan.privatizer(key_from_secret(new_secret()))
    naive_tx = optax.chain(privatizer, opt)
    naive_state = [params, naive_tx.init(params)]
    n_naive = min(naive_examples, batch)

    def run_naive():
        total = None
        for i in range(n_naive):
            g = one_grad(naive_state[0], x[i : i + 1], y[i : i + 1])
            norm = optax.tree.norm(g)
            g = jax.tree_util.tree_map(lambda v, n=norm: v * jnp.minimum(1.0, 1.0 / n), g)
            total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
        updates, naive_state[1] = naive_tx.update(total, naive_state[1], naive_state[0])
        naive_state[0] = optax.apply_updates(naive_state[0], updates)
        return naive_state[0]

    # Both steps ran once above (compilation): interleaved blocks of `iters` steps from here.
    t = time_interleaved({"np": run_nonprivate, "p": run_private}, repeats, iters=iters, warmup=False)
    t_np, t_p = t["np"].seconds, t["p"].seconds
    t_naive = time_per_call(run_naive, max(1, repeats // 2), 1) * batch / n_naive  # per full batch
    return {
        "model": name,
        "clipping_impl": impl,
        "batch": batch,
        "params": int(sum(v.size for v in jax.tree_util.tree_leaves(params))),
        "nonprivate_ex_per_s": batch / t_np,
        "private_ex_per_s": batch / t_p,
        "naive_ex_per_s": batch / t_naive,
        "private_over_nonprivate": t_np / t_p,
        "private_over_naive": t_naive / t_p,
        "compile_s_nonprivate": compile_np,
        "compile_s_private": compile_p,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--naive-examples", type=int, default=64, help="examples timed in the naive loop (scaled)")
    parser.add_argument("--clipping-impl", default="auto", choices=["vmap", "ghost", "auto"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_core.json"))
    args = parser.parse_args()

    device = jax.devices()[0]
    header = f"device: {device.platform} ({device.device_kind}), {len(jax.devices())} device(s); jax {jax.__version__}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; clipping_impl={args.clipping_impl}"
    print(header)
    rows = [
        bench_model(m, args.batch, args.repeats, args.iters, args.naive_examples, args.clipping_impl)
        for m in args.models
    ]
    print()
    print(
        "| model | params | batch | non-private ex/s | jaxdp private ex/s | naive loop ex/s | private / non-private | private / naive | compile s (np / p) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params']:,} | {r['batch']} | {r['nonprivate_ex_per_s']:,.0f} | {r['private_ex_per_s']:,.0f} "
            f"| {r['naive_ex_per_s']:,.0f} | {r['private_over_nonprivate']:.2f} | {r['private_over_naive']:.0f}x "
            f"| {r['compile_s_nonprivate']:.1f} / {r['compile_s_private']:.1f} |"
        )
    by_name = {r["model"]: r for r in rows}
    if "cnn" in by_name and "cnn-nnxconv" in by_name:
        best_np = max(by_name[m]["nonprivate_ex_per_s"] for m in ("cnn", "cnn-nnxconv"))
        best_p = max(by_name[m]["private_ex_per_s"] for m in ("cnn", "cnn-nnxconv"))
        print(
            f"\nsmall CNN, fastest private / fastest non-private (any conv implementation): "
            f"{best_p:,.0f} / {best_np:,.0f} = {best_p / best_np:.2f}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
