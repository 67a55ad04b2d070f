"""Where a ghost-clipped gradient's memory goes, per bench model: XLA's planned memory beside the non-private
gradient's, and the largest buffers live at the ghost step's peak.

    .venv/bin/python benchmarks/ghost_memory.py                        # mnist_cnn 256, transformer 256, wrn16_4 32
    .venv/bin/python benchmarks/ghost_memory.py --models wrn16_4 --top 30

For each model, both gradients are compiled (nothing runs): ``jax.grad`` of the mean loss and
``jaxdp.clipped_grad(..., clipping_impl="ghost")``. XLA's planned memory (``memory_analysis()``: temporaries,
arguments, outputs) is exact. The peak's contents are an estimate, read from the scheduled HLO of the entry
computation: each buffer is live from the instruction that defines it to its last use (bitcasts and tuple
elements followed to their source); a while loop's own temporaries are not counted, and its state is counted
whole. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import math
import re

import jax
from profile_ghost import DEFAULT, batch_of  # this folder: run as a script

import jaxdp
from jaxdp.bench.models import split_model

_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
_ALIASES = ("bitcast", "get-tuple-element")
_FREE = ("bitcast", "parameter", "get-tuple-element", "tuple", "constant")


def _size(shape: str) -> int:
    found = re.findall(r"(f64|s64|u64|f32|s32|u32|bf16|f16|pred|s8|u8)\[([\d,]*)\]", shape)
    return sum(_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in found)


def live_at_peak(hlo: str) -> tuple[int, list[tuple[int, str, str, str]]]:
    """(estimated peak bytes, [(bytes, name, shape, op_name)] live there), from scheduled HLO text."""
    entry = re.search(r"\nENTRY [^\n]*\{\n(.*?)\n\}", hlo, re.S)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    lines = entry.group(1).splitlines()
    start, end, info, alias = {}, {}, {}, {}
    for i, line in enumerate(lines):
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)", line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        meta = re.search(r'op_name="([^"]*)"', line)
        start[name] = i
        info[name] = (0 if op in _FREE else _size(shape), shape.split("{")[0], meta.group(1) if meta else "")
        operands = re.findall(r"%([\w.\-]+)", rest.split("metadata=")[0])
        if op in _ALIASES and operands:
            alias[name] = operands[0]
        for used in operands:
            while used in alias:
                used = alias[used]
            end[used] = max(end.get(used, 0), i)
    spans = [(start[n], end.get(n, start[n]), info[n][0], n) for n in start if info[n][0]]
    peak, at = 0, 0
    for t in range(len(lines)):
        total = sum(size for a, b, size, _ in spans if a <= t <= b)
        if total > peak:
            peak, at = total, t
    live = sorted(((size, n, *info[n][1:]) for a, b, size, n in spans if a <= at <= b), reverse=True)
    return peak, live


def report(name: str, batch: int, top: int) -> None:
    _, params, _, loss_fn = split_model(name)
    x, y = batch_of(name, batch)
    steps = {
        "non-private": jax.jit(jax.grad(loss_fn)),
        "ghost": jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, clipping_impl="ghost")),
    }
    compiled = {k: f.lower(params, x, y).compile() for k, f in steps.items()}
    print(f"\n{name}, batch {batch} ({jax.default_backend()}): XLA's planned memory, MB")
    print("| step | temporaries | arguments | outputs | total | / non-private |\n|---|---:|---:|---:|---:|---:|")
    totals = {}
    for k, c in compiled.items():
        m = c.memory_analysis()
        parts = [m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes]
        totals[k] = sum(parts)
        ratio = totals[k] / totals["non-private"]
        print(
            f"| {k} | " + " | ".join(f"{p / 2**20:.1f}" for p in parts) + f" | {totals[k] / 2**20:.1f} | {ratio:.2f} |"
        )
    if top:
        peak, live = live_at_peak(compiled["ghost"].as_text())
        print(f"\nghost step: estimated peak {peak / 2**20:.1f} MB of buffers in its entry computation; the largest:")
        print("| MB | buffer | shape | from |\n|---:|---|---|---|")
        for size, n, shape, op in live[:top]:
            print(f"| {size / 2**20:.1f} | {n} | {shape} | {op[-70:]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="default: mnist_cnn transformer wrn16_4")
    parser.add_argument("--batch", type=int, default=None, help="default: 256, 256, 32")
    parser.add_argument("--top", type=int, default=12, help="buffers listed at the ghost step's peak (0: none)")
    args = parser.parse_args()
    grid = [(m, args.batch or dict(DEFAULT).get(m, 64)) for m in args.models] if args.models else list(DEFAULT)
    for name, batch in grid:
        report(name, batch, args.top)


if __name__ == "__main__":
    main()
