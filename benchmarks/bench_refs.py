"""jaxdp's private step vs reference DP-SGD implementations, interleaved in one process.

Per model and batch: builds jaxdp's step (``jaxdp.make_private_step`` run by
``jaxdp.run_private_step``, as ``jaxdp train`` runs it) and every installed reference (jax_privacy's
``clipped_grad``, optax's DP aggregator, Opacus), all on the same architecture,
inputs, C = 1, σ = 1 and SGD; then times them in interleaved blocks (jaxdp, ref1,
ref2, ..., jaxdp, ref1, ...) and prints medians and the ratios jaxdp / reference.

    pip install -e '.[bench]'          # references: jax-privacy, opacus, torch
    python benchmarks/bench_refs.py                                   # mnist_cnn, batch 256
    python benchmarks/bench_refs.py --models wrn16_4 --batch 32 --repeats 5

A reference that is not installed is reported and skipped. Writes the markdown
table to stdout and JSON to benchmarks/out/bench_refs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax

from jaxdp.bench import refs, time_interleaved


def bench(model_name: str, batch: int, repeats: int, min_block_s: float, which: list[str]) -> list[dict]:
    runners, skipped = [refs.build_jaxdp(model_name, batch)], []
    for name in which:
        try:
            runners.append(refs.BUILDERS[name](model_name, batch))
        except ImportError as e:
            skipped.append({"model": model_name, "batch": batch, "impl": name, "skipped": str(e)})
            print(f"  skipped {name}: {e}", file=sys.stderr)
    # Every runner made its first step when built: no warm-up here.
    times = time_interleaved({r.name: r.step for r in runners}, repeats, block_s=min_block_s, warmup=False)
    ours = times["jaxdp"].seconds
    rows = []
    for r in runners:
        t = times[r.name]
        rows.append(
            {
                "model": model_name,
                "batch": batch,
                "impl": r.name,
                "params": r.params,
                "ex_per_s": batch / t.seconds,
                "ex_per_s_range": [batch / t.max_s, batch / t.min_s],
                "jaxdp_over_impl": t.seconds / ours,
                "compile_s": r.compile_s,
                "iters_per_block": t.iters,
                "notes": r.notes,
            }
        )
    return rows + skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mnist_cnn"], choices=[*refs.REFERENCE_MODELS, "transformer"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (one block per implementation)")
    parser.add_argument("--min-block-s", type=float, default=0.5, help="steps per block: about this many seconds")
    parser.add_argument(
        "--refs", nargs="+", default=["jax_privacy", "optax", "opacus", "opacus_ghost"], choices=list(refs.REFERENCES)
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_refs.json"))
    args = parser.parse_args()

    device = jax.devices()[0]
    header = (
        f"device: {device.platform} ({device.device_kind}), {len(jax.devices())} device(s); jax {jax.__version__}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"C = {refs.L2_CLIP}, sigma = {refs.NOISE_MULTIPLIER}, SGD; {args.repeats} interleaved rounds"
    )
    print(header)
    rows = []
    for m in args.models:
        try:
            rows += bench(m, args.batch, args.repeats, args.min_block_s, args.refs)
        except NotImplementedError as e:
            print(f"  skipped model {m}: {e}", file=sys.stderr)
    print()
    print("| model | batch | implementation | params | ex/s (median) | ex/s (range) | jaxdp / impl | first step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | {r['batch']} | {r['impl']} | — | not installed | | | |")
            continue
        lo, hi = r["ex_per_s_range"]
        print(
            f"| {r['model']} | {r['batch']} | {r['impl']} | {r['params']:,} | {r['ex_per_s']:,.0f} "
            f"| {lo:,.0f}–{hi:,.0f} | {r['jaxdp_over_impl']:.2f} | {r['compile_s']:.1f} |"
        )
    print()
    for r in rows:
        if "notes" in r:
            print(f"- {r['model']} / {r['impl']}: {r['notes']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
