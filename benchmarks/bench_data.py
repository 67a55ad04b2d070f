"""Examples/s of private training with the data in memory vs read from the array_record files, prefetch on/off.

    python benchmarks/bench_data.py [--data_dir ~/tensorflow_datasets] [--steps 6] [--rounds 3]

Fashion-MNIST must be prepared (README, "Data and batches"). The recipe is configs/fashion_mnist_cnn.py
(the tanh CNN, B = 2048, Poisson). Four ways to feed the same steps, timed in interleaved rounds in one
process (medians): images in memory or read per draw from disk (``data_memory_mb`` below the data's
size: jaxdp.data.records.RecordArray), each with the gather in the loop or run ahead by a thread
(``data_prefetch``: jaxdp.data.prefetch). The private step is the one ``jaxdp train`` runs. Also timed:
the gather alone from disk, to show what the prefetch has to hide. Writes benchmarks/data_path.md.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import jaxdp
from jaxdp.config import apply_overrides, load_config
from jaxdp.data.prefetch import prefetch
from jaxdp.train import setup_run

HERE = os.path.dirname(os.path.abspath(__file__))


def _feed(run, start, stop, depth):
    draws = (
        [(run.dataset.x_train[idx], run.dataset.y_train[idx], mask) for idx, mask in chunks]
        for _, chunks in run.sampler.steps(start, stop)
    )
    return prefetch(draws, depth)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--steps", type=int, default=6, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    base = ["privacy.noise_seed=0", f"data_dir={args.data_dir}", "workdir=/tmp/jaxdp_bench_data"]
    runs = {}
    for where, mem in (("memory", "0"), ("disk", "1.0")):
        config = apply_overrides(load_config("configs/fashion_mnist_cnn.py"), [*base, f"data_memory_mb={mem}"])
        t0 = time.perf_counter()
        runs[where] = setup_run(config)
        print(f"{where}: set up in {time.perf_counter() - t0:.1f} s ({type(runs[where].dataset.x_train).__name__})")
    batch = runs["memory"].plan.batch_size
    state = {k: r.state for k, r in runs.items()}
    for k, r in runs.items():  # compile
        for host in _feed(r, 0, 1, 0):
            state[k], _ = jaxdp.run_private_step(r.step, state[k], host)
    times: dict[str, list[float]] = {f"{w}, prefetch {d}": [] for w in runs for d in (0, 2)}
    gather: list[float] = []
    step = 1
    for rnd in range(args.rounds):
        for w, r in runs.items():
            for d in (0, 2):
                t0 = time.perf_counter()
                for host in _feed(r, step, step + args.steps, d):
                    state[w], metrics = jaxdp.run_private_step(r.step, state[w], host)
                metrics["loss_sum"].block_until_ready()
                times[f"{w}, prefetch {d}"].append(time.perf_counter() - t0)
                step += args.steps
        t0 = time.perf_counter()
        for _ in _feed(runs["disk"], step, step + args.steps, 0):
            pass
        gather.append(time.perf_counter() - t0)
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()))
    examples = args.steps * batch  # expected examples per block (Poisson: the same draws for every way)
    best = np.median(times["memory, prefetch 0"])
    lines = [
        f"Private steps of configs/fashion_mnist_cnn.py (B = {batch}, Poisson), {args.steps} steps per block, "
        f"median of {args.rounds} interleaved rounds; `python benchmarks/bench_data.py` on this machine.",
        "",
        "| data | prefetch | examples/s | time / in memory without prefetch |",
        "|---|---|---|---|",
    ]
    for k, v in times.items():
        where, depth = k.split(", prefetch ")
        lines.append(f"| {where} | {depth} | {examples / np.median(v):,.0f} | {np.median(v) / best:.2f} |")
    lines += ["", f"Gathering the same draws from disk alone: {examples / np.median(gather):,.0f} examples/s."]
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(HERE, "data_path.md"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
