"""DP-SGD vs DP-SAT vs BAM at the same ε: accuracy, clipping bias, gradient norms, throughput.

    python -m experiments.bam.run                      # the README table (digits, 3 methods x 3 eps x 3 seeds)
    python -m experiments.bam.run --methods bam --epsilons 3 --seeds 0          # one run
    python -m experiments.bam.run --config experiments/bam/configs/digits.py:smoke --epsilons 3 --seeds 0

Every run uses the same plan (σ calibrated to the target ε over the same steps); only
how each step forms the per-example gradients differs. Columns:
  * test accuracy (mean ± std over seeds);
  * bias bound: mean max(0, ||g_i|| - C) of what was clipped, pooled over each epoch and
    averaged over the run (for BAM, g_i is the BAM gradient);
  * final ||∇l_i|| and final bias bound: plain per-example loss gradients of the final
    model on training examples (the same yardstick for every method);
  * examples/s of the training loop (epoch 1, with compilation, excluded).
The gradient statistics are computed on the training data without noise: research
diagnostics, not covered by ε.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time

import numpy as np

from experiments.bam.bam import GradientNormProbe, method_hooks
from experiments.tables import mean_std, save_table
from jaxdp.config import apply_overrides, load_config
from jaxdp.train import train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
METHODS = {"dpsgd": "DP-SGD", "dpsat": "DP-SAT", "bam": "BAM"}
COLUMNS = [
    ("test_accuracy", "test accuracy", 3),
    ("clip_bias_bound", "bias bound (training)", 3),
    ("grad_norm_mean", "mean ‖g_i‖ (training)", 2),
    ("final_clip_bias_bound", "final bias bound", 3),
    ("final_grad_norm_mean", "final mean ‖∇ℓ_i‖", 2),
    ("examples_per_sec", "examples/s", 0),
]


def run_one(spec: str, method: str, epsilon: float, seed: int, workdir: str, overrides=(), quiet=True) -> dict:
    """Train one (method, ε, seed) and return its row."""
    config = apply_overrides(
        load_config(spec),
        [
            *overrides,
            f"bam.method={method}",
            f"privacy.target_epsilon={epsilon}",
            f"seed={seed}",
            # A fixed noise seed makes this research table reproducible; a real private run keeps it secret.
            f"privacy.noise_seed={1000 + seed}",
            f"workdir={workdir}",
        ],
    )
    probe = GradientNormProbe()
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        with contextlib.redirect_stderr(out) if quiet else contextlib.nullcontext():
            summary = train(
                config, progress=not quiet, callbacks=[probe], overwrite=True, **method_hooks(config.bam)
            )  # the cell's workdir is this table's: a rerun trains it again
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    return {
        "method": method,
        "epsilon_target": epsilon,
        "seed": seed,
        "epsilon_spent": summary["epsilon"],
        "test_accuracy": summary["test_accuracy"],
        # NaN where undefined (per-layer clipping has no whole-gradient bias bound).
        "clip_bias_bound": float(np.mean([r.get("clip_bias_bound", np.nan) for r in history])),
        "grad_norm_mean": float(np.mean([r["grad_norm_mean"] for r in history])),
        "final_clip_bias_bound": summary.get("final_clip_bias_bound", np.nan),
        "final_grad_norm_mean": summary["final_grad_norm_mean"],
        "examples_per_sec": summary["examples_per_sec"],
        "noise_multiplier": summary["noise_multiplier"],
    }


def table(results: list[dict]) -> str:
    head = "| method | ε (spent) | " + " | ".join(name for _, name, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for eps in dict.fromkeys(r["epsilon_target"] for r in results):
        for method in dict.fromkeys(r["method"] for r in results):
            rows = [r for r in results if r["method"] == method and r["epsilon_target"] == eps]
            if not rows:
                continue
            cells = [mean_std([r[key] for r in rows], digits) for key, _, digits in COLUMNS]
            spent = max(r["epsilon_spent"] for r in rows)
            lines.append(f"| {METHODS[method]} | {eps:g} ({spent:.3f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(HERE, "configs", "digits.py"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bam"))
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every run (key=value)")
    parser.add_argument("--verbose", action="store_true", help="show each run's own output")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for eps in args.epsilons:
        for seed in args.seeds:
            for method in args.methods:
                workdir = os.path.join(args.out, f"{method}_eps{eps:g}_seed{seed}")
                row = run_one(args.config, method, eps, seed, workdir, args.set, quiet=not args.verbose)
                results.append(row)
                print(
                    f"eps={eps:g} seed={seed} {METHODS[method]:>6}: sigma={row['noise_multiplier']:.3f} "
                    f"acc {row['test_accuracy']:.3f} | bias bound {row['clip_bias_bound']:.3f} "
                    f"| final |grad| {row['final_grad_norm_mean']:.2f} | {row['examples_per_sec']:,.0f} ex/s",
                    flush=True,
                )
    heading = f"{len(args.seeds)} seed(s), mean ± std; took {time.perf_counter() - t0:.0f} s"
    save_table(args.out, table(results), results, heading)
    return results


if __name__ == "__main__":
    main()
