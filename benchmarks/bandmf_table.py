"""DP-SGD vs banded matrix factorization (BandMF) at the same ε, steps and data; and the cost of the noise.

    python benchmarks/bandmf_table.py                         # the README table: digits, ε ∈ {1, 3, 8} x 3 seeds
    python benchmarks/bandmf_table.py --only noise-cost       # only the step-time comparison (batch 256, small CNN)
    python benchmarks/bandmf_table.py --only tfds-mock        # MNIST recipe on TFDS *mock* data (a smoke, no accuracy)

Accuracy part: every (mechanism, ε, seed) trains ``--config`` with the same steps,
batch, optimizer and data; σ is calibrated per mechanism to the target ε by its own
accountant (DP-SGD: Poisson q = B/N for T steps; BandMF: cyclic Poisson, q = bB/N for
ceil(T/b) rounds). Cells: test accuracy mean ± std over seeds, and examples/s of the
training loop (epoch 1, with compilation, excluded).

Noise-cost part: the jitted private step of the small CNN (28x28x1 inputs, as
``benchmarks/bench_core.py``) at batch 256, with DP-SGD noise and with b-banded noise,
timed interleaved in one process (median of blocks); the noise share is
(t_bandmf - t_dpsgd) / t_bandmf. It also times the privatizer's update alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxdp
from jaxdp.bench import time_interleaved  # the one timer of every benchmark
from jaxdp.config import apply_overrides, load_config
from jaxdp.keys import key_from_secret, new_secret
from jaxdp.models import CNN
from jaxdp.train import classification_loss, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "digits_cnn.py")
# Same steps, data and optimizer for both mechanisms. Batch 64 so that b = 4 groups of N/4 examples hold a
# batch at a modest per-group rate (q = 0.18); plain SGD because the strategy minimises the error of prefix
# sums of the noise, which is what SGD's parameters accumulate.
DEFAULT_SET = [
    "batch_size=64",
    "epochs=40",
    "optimizer.name=sgd",
    "optimizer.learning_rate=0.5",
    "optimizer.momentum=0.0",
]


def run_one(spec, bands, epsilon, seed, workdir, overrides=(), quiet=True) -> dict:
    config = apply_overrides(
        load_config(spec),
        [
            *overrides,
            f"privacy.bands={bands}",
            f"privacy.target_epsilon={epsilon}",
            f"seed={seed}",
            # A fixed noise seed makes the table reproducible; a real private run keeps it secret.
            f"privacy.noise_seed={1000 + seed}",
            f"workdir={workdir}",
        ],
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        summary = train(config, progress=not quiet, overwrite=True)  # the cell's workdir is this table's
    return {
        "bands": bands,
        "epsilon_target": epsilon,
        "seed": seed,
        "epsilon_spent": summary["epsilon"],
        "test_accuracy": summary["test_accuracy"],
        "examples_per_sec": summary["examples_per_sec"],
        "noise_multiplier": summary["noise_multiplier"],
        "steps": summary["steps"],
    }


def accuracy_table(results: list[dict]) -> str:
    lines = [
        "| mechanism | ε target (spent) | σ | steps | test accuracy | examples/s |",
        "|---|---|---|---|---|---|",
    ]
    for eps in dict.fromkeys(r["epsilon_target"] for r in results):
        for bands in dict.fromkeys(r["bands"] for r in results):
            rows = [r for r in results if r["bands"] == bands and r["epsilon_target"] == eps]
            if not rows:
                continue
            acc = np.array([r["test_accuracy"] for r in rows])
            exs = np.array([r["examples_per_sec"] for r in rows])

            def sd(v):
                return v.std(ddof=1) if len(v) > 1 else 0.0

            name = "DP-SGD" if bands == 1 else f"BandMF (b={bands})"
            lines.append(
                f"| {name} | {eps:g} ({max(r['epsilon_spent'] for r in rows):.3f}) | {rows[0]['noise_multiplier']:.3f} "
                f"| {rows[0]['steps']} | {acc.mean():.3f} ± {sd(acc):.3f} (n={len(rows)}) "
                f"| {exs.mean():,.0f} ± {sd(exs):,.0f} |"
            )
    return "\n".join(lines)


def noise_cost(batch=256, bands_list=(4, 16), repeats=15, iters=10) -> list[dict]:
    """Step time with DP-SGD noise vs with b-banded noise, interleaved in one process."""
    graphdef, params, rest = nnx.split(CNN((28, 28, 1), 10, features=(16, 32), rngs=nnx.Rngs(0)), nnx.Param, ...)
    loss_fn = classification_loss(graphdef, rest)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    chunks = [(x, y, jnp.ones((batch,), jnp.float32))]  # one draw of exactly one chunk
    opt = optax.sgd(0.1)
    n = 60000
    runners = {}
    for b in (1, *bands_list):
        plan = jaxdp.PrivacyPlan(
            dataset_size=n,
            batch_size=batch,
            l2_clip_norm=1.0,
            noise_multiplier=1.0,
            num_steps=2000,
            bands=b,
            sampling="poisson" if b == 1 else "cyclic_poisson",
        )
        step = jaxdp.make_private_step(plan, loss_fn, opt, noise_key=key_from_secret(new_secret()))
        state = [step.init(params)]
        privatizer = plan.privatizer(key_from_secret(new_secret()))
        p_state = [privatizer.init(params)]
        p_update = jax.jit(privatizer.update)

        def run_step(step=step, state=state):
            state[0], metrics = jaxdp.run_private_step(step, state[0], chunks)
            return metrics["loss_sum"]

        def run_noise(p_update=p_update, p_state=p_state):
            out, p_state[0] = p_update(params, p_state[0])
            return out

        runners[f"step:{b}"], runners[f"noise:{b}"] = run_step, run_noise
    # Interleaved block by block (load drifts on a shared machine), after one warm-up call each.
    calls = {name: iters if name.startswith("step") else iters * 5 for name in runners}
    times = time_interleaved(runners, repeats, iters=calls)
    base = times["step:1"].seconds
    rows = []
    for b in (1, *bands_list):
        t, t_noise = times[f"step:{b}"].seconds, times[f"noise:{b}"].seconds
        rows.append(
            {
                "bands": b,
                "params": int(sum(v.size for v in jax.tree_util.tree_leaves(params))),
                "batch": batch,
                "step_ms": 1e3 * t,
                "examples_per_sec": batch / t,
                "privatizer_ms": 1e3 * t_noise,
                "noise_share_vs_dpsgd": (t - base) / t,
                "privatizer_share": t_noise / t,
            }
        )
    return rows


def noise_table(rows) -> str:
    lines = [
        "| noise | params | batch | step ms | examples/s | privatizer alone ms | privatizer / step | (step - DP-SGD step) / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "DP-SGD" if r["bands"] == 1 else f"BandMF b={r['bands']}"
        lines.append(
            f"| {name} | {r['params']:,} | {r['batch']} | {r['step_ms']:.2f} | {r['examples_per_sec']:,.0f} "
            f"| {r['privatizer_ms']:.3f} | {100 * r['privatizer_share']:.1f}% | {100 * r['noise_share_vs_dpsgd']:+.1f}% |"
        )
    return "\n".join(lines)


def tfds_mock_smoke(bands=2) -> str:
    """The MNIST recipe (configs/mnist_cnn.py:smoke) on TFDS mock data, DP-SGD and BandMF: runs, no accuracy."""
    import tensorflow_datasets as tfds

    lines = ["| recipe (TFDS mock data) | mechanism | ε spent | steps | test accuracy (meaningless: random data) |"]
    lines.append("|---|---|---|---|---|")
    for b in (1, bands):
        with tempfile.TemporaryDirectory() as tmp:
            config = apply_overrides(
                load_config(os.path.join(ROOT, "configs", "mnist_cnn.py:smoke")),
                [
                    "batch_size=16",
                    f"privacy.bands={b}",
                    "privacy.noise_seed=0",
                    f"workdir={tmp}",
                    f"data_dir={tmp}/tfds",
                ],
            )
            with tfds.testing.mock_data(num_examples=64), contextlib.redirect_stdout(io.StringIO()):
                s = train(config, progress=False)
        name = "DP-SGD" if b == 1 else f"BandMF (b={b})"
        lines.append(f"| mnist_cnn:smoke | {name} | {s['epsilon']:.3f} | {s['steps']} | {s['test_accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--bands", type=int, default=4, help="b of the BandMF rows (DP-SGD is b = 1)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=DEFAULT_SET, help="config overrides for every run (key=value)")
    parser.add_argument("--only", choices=["accuracy", "noise-cost", "tfds-mock"], default=None)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "bandmf"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = jax.devices()[0]
    print(
        f"device: {device.platform} ({device.device_kind}); jax {jax.__version__}; {os.cpu_count()} cores", flush=True
    )
    report = {}
    if args.only in (None, "accuracy"):
        t0 = time.perf_counter()
        results = []
        for eps in args.epsilons:
            for seed in args.seeds:
                for bands in (1, args.bands):
                    workdir = os.path.join(args.out, f"b{bands}_eps{eps:g}_seed{seed}")
                    row = run_one(args.config, bands, eps, seed, workdir, args.set, quiet=not args.verbose)
                    results.append(row)
                    print(
                        f"eps={eps:g} seed={seed} b={bands}: sigma={row['noise_multiplier']:.3f} "
                        f"acc {row['test_accuracy']:.3f} | {row['examples_per_sec']:,.0f} ex/s",
                        flush=True,
                    )
        report["accuracy"] = results
        print(
            f"\n{args.config} {' '.join(args.set)}; {len(args.seeds)} seed(s); took {time.perf_counter() - t0:.0f} s\n"
        )
        print(accuracy_table(results), flush=True)
    if args.only in (None, "noise-cost"):
        rows = noise_cost()
        report["noise_cost"] = rows
        print("\nnoise cost, small CNN at batch 256 (interleaved, medians):\n")
        print(noise_table(rows), flush=True)
    if args.only in (None, "tfds-mock"):
        text = tfds_mock_smoke()
        report["tfds_mock"] = text
        print("\n" + text, flush=True)
    with open(os.path.join(args.out, f"report{'_' + args.only if args.only else ''}.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
