"""Cost per example of the complex CNN beside its real controls: one private step each, timed in alternation.

    python -m experiments.complex_valued.bench                    # digits shapes (8x8, batch 512)
    python -m experiments.complex_valued.bench --table fashion_mnist   # 28x28, batch 256

Each model of the table's recipe (configs/<table>.py) gets its private step (``jaxdp.clipped_grad`` →
noise-free sum; the vmap path, which every model here takes) and its non-private step (``jax.grad`` of the
mean loss), on random inputs of the table's shapes. The steps are timed in rounds, one call of each model
per round, so that a change in machine load hits every model alike; the median per model is reported, as
examples/s and as time relative to the real CNN on the magnitude image. ``complex (before)`` is the
complex CNN as it was before this experiment's profile: XLA's complex convolution and the cardioid
through ``atan2`` and ``cos``, the same parameters and function (checked here: equal logits).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxdp
from experiments.complex_valued import run
from jaxdp.bench import time_interleaved
from jaxdp.config import load_config
from jaxdp.models import ComplexCNN, complex_avg_pool, complex_weight_standardize, magnitude, make_model
from jaxdp.models._complex import _ACTIVATIONS

SHAPES = {"digits": (8, 8), "fashion_mnist": (28, 28)}


class ComplexCNNBefore(ComplexCNN):
    """The ComplexCNN forward pass as it was: complex ``lax.conv_general_dilated`` and cardioid by angle."""

    def __call__(self, z):
        for conv, norm in zip(self.convs, self.norms, strict=True):
            kernel = complex_weight_standardize(conv.kernel[...], mode=conv.weight_standardization)
            dims = ("NHWC", "HWIO", "NHWC")
            z = jax.lax.conv_general_dilated(z.astype(jnp.complex64), kernel, (1, 1), "SAME", dimension_numbers=dims)
            z = norm(z + conv.bias[...])
            if self.activation == "cardioid":
                z = 0.5 * (1.0 + jnp.cos(jnp.angle(z))) * z
            else:
                z = _ACTIVATIONS[self.activation](z)
            z = complex_avg_pool(z)
        return self.head(magnitude(z).reshape(z.shape[0], -1))


class ComplexCNNNoNorm(ComplexCNN):
    """The complex CNN with ComplexGroupNorm taken out (a profile ablation only: not a model to train)."""

    def __call__(self, z):
        act = _ACTIVATIONS[self.activation]
        for conv in self.convs:
            z = complex_avg_pool(act(conv(z)))
        return self.head(magnitude(z).reshape(z.shape[0], -1))


def profile(table: str, batch: int, rounds: int) -> list[tuple[str, float]]:
    """Where the complex CNN's private step spends its time: the step with one part taken out or swapped,
    timed in alternation with the whole; the difference is that part's share."""
    config = run.model_config(load_config(run.config_path(table)), "complex")
    h, w = SHAPES[table]
    rng = np.random.default_rng(0)
    x = jnp.asarray((rng.normal(size=(batch, h, w, 1)) + 1j * rng.normal(size=(batch, h, w, 1))).astype(np.complex64))
    y = jnp.asarray(rng.integers(0, 10, batch))
    kw = dict(config.model.kwargs)
    variants = {
        "whole private step (ConjugateMish, whitening WS, GroupNorm)": ComplexCNN(
            (h, w, 1), 10, rngs=nnx.Rngs(0), **kw
        ),
        "without weight standardisation": ComplexCNN(
            (h, w, 1), 10, rngs=nnx.Rngs(0), **{**kw, "weight_standardization": "none"}
        ),
        "without ComplexGroupNorm": ComplexCNNNoNorm((h, w, 1), 10, rngs=nnx.Rngs(0), **kw),
        "cardioid instead of ConjugateMish": ComplexCNN(
            (h, w, 1), 10, rngs=nnx.Rngs(0), **{**kw, "activation": "cardioid"}
        ),
        "before: complex XLA convolution, cardioid by angle": ComplexCNNBefore(
            (h, w, 1), 10, rngs=nnx.Rngs(0), **{**kw, "activation": "cardioid"}
        ),
    }
    steps = {name: _steps(m, x, y)["private"] for name, m in variants.items()}
    return [(name, t.seconds) for name, t in time_interleaved(steps, rounds, iters=1).items()]


def _steps(model, x, y):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p, rest)(x), y).mean()

    private = jax.jit(jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="vmap"))
    plain = jax.jit(jax.grad(loss))
    return {"private": lambda: private(params, x, y), "non-private": lambda: plain(params, x, y)}


def build(table: str, batch: int, seed: int = 0):
    """{name: (model, x, y)} for every model of the table, plus ``complex (before)``."""
    config = load_config(run.config_path(table))
    h, w = SHAPES[table]
    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.integers(0, 10, batch))
    out = {}
    for m in ("complex", "complex_cardioid", *config.cv.models):
        if m in out:
            continue
        c = run.model_config(config, m)
        channels = 2 if "reim" in m else 1
        x = rng.normal(size=(batch, h, w, channels)).astype(np.float32)
        if c.model.name == "complex_cnn":
            x = (x + 1j * rng.normal(size=x.shape)).astype(np.complex64)
        model = make_model(c.model.name, input_shape=(h, w, channels), num_classes=10, seed=0, **c.model.kwargs)
        out[m] = (model, jnp.asarray(x), y)
        if m in ("complex", "complex_cardioid"):
            before = ComplexCNNBefore((h, w, 1), 10, rngs=nnx.Rngs(0), **c.model.kwargs)
            np.testing.assert_allclose(before(out[m][1][:4]), model(out[m][1][:4]), rtol=1e-3, atol=1e-4)
            out[f"{m} (before)"] = (before, jnp.asarray(x), y)
    return out


def measure(table: str, batch: int, rounds: int) -> list[dict]:
    models = build(table, batch)
    steps = {f"{m}|{kind}": f for m, v in models.items() for kind, f in _steps(*v).items()}
    times = {name: t.seconds for name, t in time_interleaved(steps, rounds, iters=1).items()}  # medians
    base = times["magnitude|private"]
    rows = []
    for m, (model, _, _) in models.items():
        params = nnx.state(model, nnx.Param)
        reals = sum(
            int(np.prod(v.shape)) * (2 if jnp.iscomplexobj(v) else 1) for v in jax.tree_util.tree_leaves(params)
        )
        t_priv, t_plain = times[f"{m}|private"], times[f"{m}|non-private"]
        rows.append(
            {"model": m, "reals": reals, "private_ex_s": batch / t_priv, "nonprivate_ex_s": batch / t_plain,
             "private_vs_magnitude": t_priv / base, "private_over_nonprivate": t_priv / t_plain}
        )  # fmt: skip
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=run.TABLES, default="digits")
    parser.add_argument("--batch", type=int, default=0, help="0: 512 for digits, 256 for fashion_mnist")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="where the complex CNN's private step spends its time")
    args = parser.parse_args(argv)
    batch = args.batch or (512 if args.table == "digits" else 256)
    t0 = time.perf_counter()
    if args.profile:
        rows = profile(args.table, batch, args.rounds)
        whole = rows[0][1]
        print(f"\n{args.table} shapes, batch {batch}, median of {args.rounds} rounds: the complex CNN's private step")
        print("| variant | ms per step | ms saved vs whole |\n|---|---|---|")
        for name, t in rows:
            print(f"| {name} | {1e3 * t:.1f} | {1e3 * (whole - t):+.1f} |")
        print(f"\ntook {time.perf_counter() - t0:.0f} s")
        return rows
    rows = measure(args.table, batch, args.rounds)
    h, w = SHAPES[args.table]
    print(
        f"\n{args.table} shapes ({h}x{w}), batch {batch}, median of {args.rounds} rounds, {jax.devices()[0].platform}"
    )
    print(
        "| model | reals | private ex/s | non-private ex/s | private time ÷ real CNN (magnitude) | private ÷ non-private |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['reals']:,} | {r['private_ex_s']:,.0f} | {r['nonprivate_ex_s']:,.0f} "
            f"| {r['private_vs_magnitude']:.2f} | {r['private_over_nonprivate']:.2f} |"
        )
    print(f"\ntook {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
