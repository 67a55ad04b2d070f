"""Step cost of BAM beside DP-SGD (vmap and ghost), DP-SAT and a non-private step, side by side in one process.

    python -m experiments.bam.bench                                   # the digits CNN of the table, batch 256
    python -m experiments.bam.bench --table fashion_mnist --set data_dir=/work/data/tfds
    python -m experiments.bam.bench --batch 128 --rounds 3

Rows (same model, batch, plan and optimizer; every private one through ``jaxdp.run_private_step``):

* ``non-private``: the mean loss's gradient and the update;
* ``DP-SGD (vmap)`` / ``DP-SGD (ghost)``: the two ways jaxdp finds per-example norms;
* ``DP-SAT``: the gradient at one shared ascended point (``auto``: ghost where it applies);
* ``BAM``: two gradients per example, the second at the example's *own* point θ + r·g_i/‖g_i‖;
  a custom estimator, so always the vmap path;
* ``two gradients, shared point``: the same two passes, the second at one point for all
  examples (a fixed direction, not data-dependent): what BAM would cost if its second point
  were not per example. It is a cost control only, not a method: real SAM would also need the
  batch gradient's own pass to find its direction.

They are timed in alternation (:func:`jaxdp.bench.time_interleaved`: round-robin, best round kept)
so that other load hits all rows alike. Prints examples/s and ratios to DP-SGD (ghost) and to the
non-private step.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxdp
from experiments.bam.bam import _ascend, bam_example_grad, sat_perturb
from jaxdp.bench import time_interleaved
from jaxdp.config import apply_overrides, load_config
from jaxdp.data import load as load_data
from jaxdp.keys import key_from_secret, new_secret
from jaxdp.models import make_model
from jaxdp.plan import PrivacyPlan
from jaxdp.train import classification_loss, config_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))


def shared_point_example_grad(radius: float, direction):
    """Two gradients per example, the second at ``θ + r·direction/‖direction‖``, the same for every example."""

    def example_grad(value_and_grad, params):
        (loss, aux), g = value_and_grad(params)
        _, g2 = value_and_grad(_ascend(params, direction, radius))
        # 0·g keeps the first gradient in the computation (unused, XLA would drop it): two passes, as BAM.
        return (loss, aux), jax.tree_util.tree_map(lambda a, b: 0.0 * a + b, g, g2)

    return example_grad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default="digits", choices=("digits", "fashion_mnist"))
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (key=value)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="steps per row per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    config = apply_overrides(load_config(os.path.join(HERE, "configs", f"{args.table}.py")), args.set)
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
    n = len(data.y_train)
    plan = PrivacyPlan(
        dataset_size=n,
        batch_size=min(args.batch, n),
        l2_clip_norm=config.privacy.l2_clip_norm,
        noise_multiplier=1.0,
        num_steps=1,
    )
    idx = np.random.default_rng(0).integers(0, n, args.batch)
    x, y = jnp.asarray(np.asarray(data.x_train[idx])), jnp.asarray(data.y_train[idx])
    chunks = [(x, y, jnp.ones(args.batch, jnp.float32))]  # one draw of exactly one chunk
    optimizer = config_optimizer(config)
    radius = float(config.bam.radius)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    private = {
        "DP-SGD (vmap)": {"clipping_impl": "vmap"},
        "DP-SGD (ghost)": {"clipping_impl": "ghost"},
        "DP-SAT": {"clipping_impl": "auto", "perturb": sat_perturb(radius=float(config.bam.sat_radius))},
        "BAM": {"example_grad": bam_example_grad(radius=radius, lam=float(config.bam.lam))},
        "two gradients, shared point": {"example_grad": shared_point_example_grad(radius, ones)},
    }
    runners = {}

    @jax.jit
    def plain_step(p, s, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        u, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, u), s

    plain = [params, optimizer.init(params)]

    def run_plain():  # the batch is an argument, as in the private steps
        plain[0], plain[1] = plain_step(plain[0], plain[1], x, y)
        return plain[0]

    runners["non-private"] = run_plain
    for name, kwargs in private.items():
        step = jaxdp.make_private_step(plan, loss_fn, optimizer, noise_key=key_from_secret(new_secret()), **kwargs)
        state = [step.init(params)]

        def run(step=step, state=state):
            state[0], _ = jaxdp.run_private_step(step, state[0], chunks)
            return state[0].params

        runners[name] = run
    for name, run in runners.items():
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        print(f"{name}: compile + first step {time.perf_counter() - t0:.2f} s", flush=True)
    timings = time_interleaved(runners, args.rounds, iters=args.steps, warmup=False)
    best = {name: t.min_s for name, t in timings.items()}
    print(
        f"\n{config.model.name} {tuple(config.model.kwargs.get('features', ()))} on {config.dataset} "
        f"{data.input_shape}, batch {args.batch}, {jax.devices()[0].platform}, "
        f"best of {args.rounds} rounds x {args.steps} steps"
    )
    print("| step | examples/s | ratio to DP-SGD (ghost) | ratio to non-private |\n|---|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {args.batch / t:,.0f} | {best['DP-SGD (ghost)'] / t:.2f} | {best['non-private'] / t:.2f} |")
    return best


if __name__ == "__main__":
    main()
