"""Does another convolution lowering close part of the gap to PyTorch, for the private and non-private step alike?

    .venv/bin/python benchmarks/conv_lowering.py                    # DP MNIST CNN, batch 256
    .venv/bin/python benchmarks/conv_lowering.py --batch 64 --repeats 9

The DP MNIST CNN (jaxdp.models.DPMnistCNN: conv 16@8x8/2 SAME, conv 32@4x4/2 VALID, two dense
layers) twice, with the same parameters:

* ``xla``: its convolutions as ``lax.conv_general_dilated`` (what the model uses);
* ``im2col``: each convolution as strided slices of the padded input (one per window offset),
  concatenated into patches, then one matmul with the kernel reshaped to (kh kw C_in, C_out).
  Its backward is then matmuls and the transpose of the slices (pads and adds).

The logits of the two are checked equal first. Then, interleaved in one process (medians of
``jaxdp.bench.time_interleaved`` blocks): the non-private gradient step (``jax.grad`` of the mean
loss and an SGD update) and the private step (``jaxdp.make_private_step``, ghost and vmap) of each,
and each private step's ratio to the non-private step of the *same* lowering and of ``xla``.
``--ops`` instead times each convolution of the model alone at the batch: forward, input gradient and
weight gradient, in XLA (``lax.conv_general_dilated`` and its transposes) and, where torch is
installed (the ``bench`` extra), in PyTorch (``F.conv2d`` and ``torch.nn.grad``: oneDNN on a CPU),
with the same shapes and threads. Nothing here is a test.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxdp
from jaxdp.bench import MODELS, time_interleaved
from jaxdp.models import DPMnistCNN
from jaxdp.train import classification_loss


def im2col_conv(x, kernel, strides, padding):
    """``lax.conv_general_dilated(x, kernel, strides, padding, ("NHWC", "HWIO", "NHWC"))`` as slices and a matmul."""
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    if padding == "SAME":
        out_h, out_w = -(-h // strides[0]), -(-w // strides[1])
        pad_h = max((out_h - 1) * strides[0] + kh - h, 0)
        pad_w = max((out_w - 1) * strides[1] + kw - w, 0)
        pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    else:
        out_h, out_w = (h - kh) // strides[0] + 1, (w - kw) // strides[1] + 1
        pads = ((0, 0), (0, 0))
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    cols = [
        xp[:, i : i + (out_h - 1) * strides[0] + 1 : strides[0], j : j + (out_w - 1) * strides[1] + 1 : strides[1], :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.concatenate(cols, axis=-1)  # (N, out_h, out_w, kh kw C_in), features ordered (i, j, c) as HWIO
    return patches @ kernel.reshape(kh * kw * cin, cout)


class Im2colConv(nnx.Module):
    """``nnx.Conv``'s parameters (kernel HWIO, bias), its forward through :func:`im2col_conv`."""

    def __init__(self, conv: nnx.Conv):
        self.kernel = nnx.Param(conv.kernel[...])
        self.bias = nnx.Param(conv.bias[...])
        self.strides, self.padding = tuple(conv.strides), conv.padding

    def __call__(self, x):
        return im2col_conv(x, self.kernel[...], self.strides, self.padding) + self.bias[...]


def models(seed: int = 0):
    """The DP MNIST CNN with XLA convolutions, and the same parameters with im2col convolutions."""
    xla = DPMnistCNN((28, 28, 1), 10, rngs=nnx.Rngs(seed))
    im2col = DPMnistCNN((28, 28, 1), 10, rngs=nnx.Rngs(seed))
    im2col.conv1, im2col.conv2 = Im2colConv(xla.conv1), Im2colConv(xla.conv2)
    return {"xla": xla, "im2col": im2col}


# The DP MNIST CNN's convolutions: (input H, W, C_in), (kh, kw, C_out), stride, padding.
CONVS = {"conv1": ((28, 28, 1), (8, 8, 16), 2, "SAME"), "conv2": ((13, 13, 16), (4, 4, 32), 2, "VALID")}


def op_timings(batch: int, repeats: int) -> dict[str, float]:
    """Seconds per call of each convolution's forward, input gradient and weight gradient in XLA (and torch)."""
    runners = {}
    rng = np.random.default_rng(0)
    for name, ((h, w, cin), (kh, kw, cout), s, pad) in CONVS.items():
        x = jnp.asarray(rng.normal(size=(batch, h, w, cin)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(kh, kw, cin, cout)), jnp.float32)

        def conv(x, k, s=s, pad=pad):
            return jax.lax.conv_general_dilated(x, k, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

        g = jnp.ones_like(conv(x, k))
        fwd = jax.jit(conv)
        dx = jax.jit(lambda x, k, g, conv=conv: jax.vjp(lambda x: conv(x, k), x)[1](g)[0])
        dk = jax.jit(lambda x, k, g, conv=conv: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])
        runners[f"xla {name} forward"] = lambda f=fwd, x=x, k=k: f(x, k)
        runners[f"xla {name} input grad"] = lambda f=dx, x=x, k=k, g=g: f(x, k, g)
        runners[f"xla {name} weight grad"] = lambda f=dk, x=x, k=k, g=g: f(x, k, g)
    try:
        import torch
        import torch.nn.functional as F  # noqa: N812
    except ImportError:
        torch = None
    if torch is not None:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for name, ((h, w, cin), (kh, kw, cout), s, pad) in CONVS.items():
            x = torch.randn(batch, cin, h, w)
            k = torch.randn(cout, cin, kh, kw)
            # PyTorch's 'same' needs stride 1: pad as XLA's SAME does (more at the end), then convolve VALID.
            if pad == "SAME":
                out = -(-h // s)
                total = max((out - 1) * s + kh - h, 0)
                x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
            g = torch.ones_like(F.conv2d(x, k, stride=s))

            def t_fwd(x=x, k=k, s=s):
                with torch.no_grad():
                    return F.conv2d(x, k, stride=s)

            def t_dx(x=x, k=k, g=g, s=s):
                return torch.nn.grad.conv2d_input(x.shape, k, g, stride=s)

            def t_dk(x=x, k=k, g=g, s=s):
                return torch.nn.grad.conv2d_weight(x, k.shape, g, stride=s)

            runners[f"torch {name} forward"] = t_fwd
            runners[f"torch {name} input grad"] = t_dx
            runners[f"torch {name} weight grad"] = t_dk
    t = time_interleaved({k: _blocking(f) for k, f in runners.items()}, repeats, block_s=0.3)
    return {k: v.seconds for k, v in t.items()}


def _blocking(f):
    """A call that returns something time_interleaved can wait on (torch tensors are ready when returned)."""

    def call():
        out = f()
        return out if isinstance(out, jax.Array) else jnp.zeros(())

    return call


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ops", action="store_true", help="time each convolution's forward and gradients (XLA, torch)")
    args = ap.parse_args(argv)
    if args.ops:
        t = op_timings(args.batch, args.repeats)
        print(f"jax {jax.__version__}; batch {args.batch}, {args.repeats} interleaved blocks, medians, ms per call\n")
        print("| convolution | part | XLA ms | torch ms | XLA / torch |")
        print("|---|---|---|---|---|")
        for key, sec in t.items():
            lib, name, part = key.split(" ", 2)
            if lib != "xla":
                continue
            ref = t.get(f"torch {name} {part}")
            ratio = f"{sec / ref:.1f}" if ref else "–"
            print(f"| {name} | {part} | {sec * 1e3:.2f} | {ref * 1e3 if ref else float('nan'):.2f} | {ratio} |")
        return
    data = MODELS["mnist_cnn"].data()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(data.x_train), args.batch)
    x, y = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
    mask = jnp.ones((args.batch,), jnp.float32)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; DP MNIST CNN on {MODELS['mnist_cnn'].data_label()}")
    print(f"batch {args.batch}, {args.repeats} interleaved blocks, medians\n")

    runners, logits = {}, {}
    plan = jaxdp.PrivacyPlan(
        dataset_size=len(data.x_train), batch_size=args.batch, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=10
    )
    opt = optax.sgd(0.1)
    for name, model in models().items():
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        logits[name] = nnx.merge(graphdef, params, rest)(x)
        loss_fn = classification_loss(graphdef, rest)
        np_step = jaxdp.make_nonprivate_step(loss_fn, opt)
        np_state = [jaxdp.init_state(params, opt)]

        def run_np(np_step=np_step, np_state=np_state):
            np_state[0], loss = np_step(np_state[0], x, y)
            return loss

        runners[f"{name}: non-private"] = run_np
        for impl in ("ghost", "vmap"):
            step = jaxdp.make_private_step(
                plan, loss_fn, opt, noise_key=jaxdp.keys.key_from_secret(1), clipping_impl=impl
            )
            state = [step.init(params)]

            def run_p(step=step, state=state):
                state[0], metrics = step.step_fn(state[0], None, x, y, mask)
                return metrics["loss_sum"]

            runners[f"{name}: private {impl}"] = run_p
    diff = float(jnp.max(jnp.abs(logits["im2col"] - logits["xla"])))
    print(f"max |logits im2col - logits xla| = {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the two lowerings disagree: not comparable")
    t = time_interleaved(runners, args.repeats, block_s=0.5)
    base = t["xla: non-private"].seconds
    print("\n| lowering | step | ms | examples/s | / its non-private | / xla non-private |")
    print("|---|---|---|---|---|---|")
    for key, timing in t.items():
        name, what = key.split(": ")
        own = t[f"{name}: non-private"].seconds
        print(
            f"| {name} | {what} | {timing.seconds * 1e3:.1f} | {args.batch / timing.seconds:,.0f} "
            f"| {own / timing.seconds:.2f} | {base / timing.seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
