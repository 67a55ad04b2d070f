"""Step throughput of DP-SGD, DP-SAT and BAM, measured side by side in one process.

    python -m experiments.bam.bench                    # digits MLP, batch 512 (the README line)
    python -m experiments.bam.bench --batch 256 --rounds 3

The three jitted steps share the model, the batch and the plan; each runs through
``jaxdp.run_private_step`` and they are timed in alternation by the benchmarks' one timer
(:func:`jaxdp.bench.time_interleaved`: round-robin, several rounds, best round kept) so
that other load on the machine hits all three alike. Prints examples/s and the ratio to DP-SGD.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdp
from experiments.bam.bam import method_hooks
from jaxdp.bench import time_interleaved
from jaxdp.config import load_config
from jaxdp.data import load as load_data
from jaxdp.keys import key_from_secret, new_secret
from jaxdp.models import make_model
from jaxdp.plan import PrivacyPlan
from jaxdp.train import classification_loss, make_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(HERE, "configs", "digits.py"))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="steps per method per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    data = load_data(config.dataset, config.data_dir or None)
    model = make_model(
        config.model.name,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        seed=0,
        **config.model.kwargs.to_dict(),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = classification_loss(graphdef, rest)
    n = len(data.x_train)
    plan = PrivacyPlan(
        dataset_size=n, batch_size=min(args.batch, n), l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=1
    )
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, args.batch)
    x, y = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
    chunks = [(x, y, jnp.ones(args.batch, jnp.float32))]  # one draw of exactly one chunk
    runners = {}
    for method in ("dpsgd", "dpsat", "bam"):
        config.bam.method = method
        optimizer = make_optimizer(config.optimizer.name, config.optimizer.learning_rate)
        step = jaxdp.make_private_step(
            plan, loss_fn, optimizer, noise_key=key_from_secret(new_secret()), **method_hooks(config.bam)
        )
        state = [step.init(params)]

        def run(step=step, state=state):
            state[0], _ = jaxdp.run_private_step(step, state[0], chunks)
            return state[0].params

        t0 = time.perf_counter()
        jax.block_until_ready(run())
        print(f"{method}: compile + first step {time.perf_counter() - t0:.2f} s", flush=True)
        runners[method] = run
    timings = time_interleaved(runners, args.rounds, iters=args.steps, warmup=False)
    best = {method: t.min_s for method, t in timings.items()}
    base = args.batch / best["dpsgd"]
    print(
        f"\n{config.model.name} on {config.dataset}, batch {args.batch}, {jax.devices()[0].platform}, "
        f"best of {args.rounds} rounds x {args.steps} steps"
    )
    print("| method | examples/s | ratio to DP-SGD |\n|---|---|---|")
    for method, t in best.items():
        print(f"| {method} | {args.batch / t:,.0f} | {args.batch / t / base:.2f} |")


if __name__ == "__main__":
    main()
