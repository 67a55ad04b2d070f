"""The outputs of ``jaxdp bench``: markdown tables, CSV (one record per model, batch, implementation, ε), JSON, PNG."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os

__all__ = ["OUTPUT_FILES", "clear_outputs", "flat_rows", "render_markdown", "write_outputs"]

# The files ``jaxdp bench`` writes into its output folder.
OUTPUT_FILES = {
    "csv": "bench.csv",
    "json": "bench.json",
    "md": "bench.md",
    "png": "bench.png",
    "devices_csv": "bench_devices.csv",
}

# The per-(model, batch) columns of a CSV record, in order; the private ones are then overwritten per implementation.
_ROW_KEYS = (
    "model data params batch dtype clipping_impl sampling_rate epochs compile_s_nonprivate compile_s_private "
    "nonprivate_ex_per_s private_ex_per_s private_over_nonprivate xla_mb_nonprivate xla_mb_private peak_kind "
    "peak_mb_after_nonprivate peak_mb_after_private"
).split()


def flat_rows(rows: list[dict]) -> list[dict]:
    """One record per (model, batch, clipping implementation, ε): throughput repeated (it does not depend on ε),
    accuracy per ε (trained with the first implementation: the clipped sum is the same)."""
    out = []
    for r in rows:
        acc_by_eps = {a["epsilon_target"]: a["test_accuracy"] for a in r["accuracy"]}
        for p, cal in ((p, cal) for p in r["private"] for cal in r["calibration"]):
            rec = {k: _dtype(r) if k == "dtype" else r[k] for k in _ROW_KEYS}
            rec.update(
                clipping_impl=p["clipping_impl"],
                clipping_path=p["path"],
                compile_s_private=p["compile_s"],
                private_ex_per_s=p["ex_per_s"],
                private_over_nonprivate=p["over_nonprivate"],
                xla_mb_private=p["xla_mb"],
                peak_mb_after_private=p["peak_mb_after"],
                accuracy_trained_with=r["clipping_impl"],
            )
            rec.update(cal)
            rec["test_accuracy"] = acc_by_eps.get(cal["epsilon_target"], math.nan)
            rec["test_accuracy_nonprivate"] = r.get("accuracy_nonprivate", math.nan)
            for name, ref in r["references"].items():
                rec[f"jaxdp/{name}"] = ref.get("jaxdp_over_ref", math.nan)
            out.append(rec)
    return out


def _dtype(row: dict) -> str:
    """What the row's model computed in (rows written before mixed precision have no key: float32)."""
    return row.get("dtype", "float32")


def _fmt(v, spec=",.0f"):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render_markdown(header: str, rows: list[dict], scale: list[dict], elapsed: float | None = None) -> str:
    ref_names = sorted({name for r in rows for name in r["references"]})
    lines = [f"jaxdp bench: {header}", ""]
    lines.append(
        "Throughput (measured once per model and batch: sigma only scales the noise added once per step, so it "
        "does not depend on epsilon). The clipping implementations of a model are timed side by side with its "
        "non-private step in one process; 'auto (ghost)' means auto took the ghost path. Reference ratios are "
        "jaxdp's first implementation over the reference."
    )
    lines.append("")
    cols = [
        "model",
        "params",
        "batch",
        "dtype",
        "clipping_impl",
        "compile s (np / p)",
        "non-private ex/s",
        "private ex/s",
        "private / non-private",
        "XLA step MB (np / p)",
        "peak MB after np / p",
        *[f"jaxdp/{n}" for n in ref_names],
    ]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        refs = []
        for n in ref_names:
            ref = r["references"].get(n, {})
            refs.append(_fmt(ref.get("jaxdp_over_ref"), ".2f") if "error" not in ref else "n/a")
        for i, p in enumerate(r["private"]):
            impl = p["clipping_impl"] + (f" ({p['path']})" if p["clipping_impl"] == "auto" else "")
            lines.append(
                f"| {r['model']} | {r['params']:,} | {r['batch']} | {_dtype(r)} | {impl} "
                f"| {r['compile_s_nonprivate']:.1f} / {p['compile_s']:.1f} "
                f"| {_fmt(r['nonprivate_ex_per_s'])} | {_fmt(p['ex_per_s'])} "
                f"| {p['over_nonprivate']:.2f} "
                f"| {_fmt(r['xla_mb_nonprivate'], ',.1f')} / {_fmt(p['xla_mb'], ',.1f')} "
                f"| {_fmt(r['peak_mb_after_nonprivate'])} / {_fmt(p['peak_mb_after'])} "
                + "".join(f"| {v if i == 0 else '–'} " for v in refs)
                + "|"
            )
    kinds = sorted({r["peak_kind"] for r in rows})
    lines.append("")
    lines.append(
        f"Memory: 'XLA step MB' is the compiled step's planned memory (arguments + outputs + temporaries); "
        f"'peak MB' is the process {' / '.join(kinds)} read after the non-private step ran, then after each private "
        "step ran, in the order listed (a process peak only grows, so each includes the ones before"
        + ("; each (model, batch) ran in a fresh process)." if all(r["isolated_process"] for r in rows) else ").")
    )
    lines += ["", "Accuracy after the fixed budget (test split)", ""]
    cols = [
        "model",
        "data",
        "batch",
        "dtype",
        "q",
        "epochs",
        "eps target",
        "sigma",
        "eps spent",
        "test acc",
        "non-private acc",
    ]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        acc_by_eps = {a["epsilon_target"]: a["test_accuracy"] for a in r["accuracy"]}
        for cal in r["calibration"]:
            e = cal["epsilon_target"]
            acc = acc_by_eps.get(e)
            lines.append(
                f"| {r['model']} | {r['data']} | {r['batch']} | {_dtype(r)} | {r['sampling_rate']:.4f} "
                f"| {r['epochs'] or '–'} "
                f"| {e:g} | {cal['sigma']:.3f} | {cal['epsilon_spent']:.3f} "
                f"| {_fmt(acc, '.3f') if acc is not None else 'not run'} "
                f"| {_fmt(r.get('accuracy_nonprivate'), '.3f') if 'accuracy_nonprivate' in r else 'not run'} |"
            )
    if scale:
        s0 = scale[0]
        lines += [
            "",
            f"Scale-out: private step of {s0['model']}, global batch {s0['batch']}, forced CPU devices "
            f"(--xla_force_host_platform_device_count, one subprocess per count; they share this machine's "
            f"{os.cpu_count()} cores; each step waited for before the next), same seed; param difference to 1 device "
            f"after {s0['steps']} steps",
            "",
            "| devices | ex/s | vs 1 device | max abs param diff vs 1 device |",
            "|---|---|---|---|",
        ]
        for s in scale:
            lines.append(
                f"| {s['devices']} | {_fmt(s['ex_per_s'])} | {_fmt(s['ex_per_s_over_1_device'], '.2f')} "
                f"| {_fmt(s['max_abs_param_diff_vs_1'], '.2e')} |"
            )
    if elapsed is not None:
        lines += ["", f"took {elapsed:.0f} s"]
    return "\n".join(lines)


def clear_outputs(out_dir: str) -> None:
    """Remove a previous run's outputs from ``out_dir``, so that what is there is always this run's."""
    for name in OUTPUT_FILES.values():
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def write_outputs(
    out_dir: str, header: str, rows: list[dict], scale: list[dict], elapsed: float, *, complete: bool = True
) -> dict:
    """Write the CSV, JSON and markdown of the rows so far (``complete=False``: called after each row, so an
    interrupted bench keeps what it measured; the JSON says ``"complete": false``), and the PNG at the end."""
    os.makedirs(out_dir, exist_ok=True)
    files = {k: os.path.join(out_dir, OUTPUT_FILES[k]) for k in ("csv", "json", "md")}
    if complete:
        files["png"] = os.path.join(out_dir, OUTPUT_FILES["png"])
    flat = flat_rows(rows)
    fields = list(dict.fromkeys(k for rec in flat for k in rec))
    with _replace(files["csv"], newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)
    if scale:
        files["devices_csv"] = os.path.join(out_dir, OUTPUT_FILES["devices_csv"])
        with _replace(files["devices_csv"], newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(scale[0]))
            w.writeheader()
            w.writerows(scale)
    with _replace(files["json"]) as f:
        json.dump(
            _finite_or_none(
                {
                    "header": header,
                    "note": "throughput does not depend on epsilon (sigma only scales the noise); measured once per "
                    "(model, batch). Noise seed fixed: a benchmark, not a private release.",
                    "rows": rows,
                    "scale": scale,
                    "elapsed_s": elapsed,
                    "complete": complete,
                }
            ),
            f,
            indent=2,
            allow_nan=False,
        )
    with _replace(files["md"]) as f:
        f.write(render_markdown(header, rows, scale, elapsed) + "\n")
    if complete:
        _plot(files["png"], rows)
    return files


@contextlib.contextmanager
def _replace(path: str, newline: str | None = None):
    """Write ``path`` whole or not at all (a temporary file, then renamed): an interrupt never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline=newline) as f:
        yield f
    os.replace(tmp, path)


def _finite_or_none(obj):
    """NaN/inf become null, so the JSON is standard (``allow_nan=False``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj


def _plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        eps = [c["epsilon_target"] for c in r["calibration"]]
        label = f"{r['model']} B={r['batch']}" + (f" {_dtype(r)}" if _dtype(r) != "float32" else "")
        for j, p in enumerate(r["private"]):
            ax_t.plot(
                eps,
                [p["ex_per_s"]] * len(eps),
                ["o-", "s-.", "^:"][j % 3],
                color=color,
                label=f"{label} private ({p['clipping_impl']})",
            )
        ax_t.plot(eps, [r["nonprivate_ex_per_s"]] * len(eps), "--", color=color, label=f"{label} non-private")
        if r["accuracy"]:
            ax_a.plot(
                [a["epsilon_target"] for a in r["accuracy"]],
                [a["test_accuracy"] for a in r["accuracy"]],
                "o-",
                color=color,
                label=label,
            )
            if "accuracy_nonprivate" in r:
                ax_a.axhline(r["accuracy_nonprivate"], color=color, ls=":", lw=1)
    ticks = sorted({c["epsilon_target"] for r in rows for c in r["calibration"]})
    for ax in (ax_t, ax_a):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("target epsilon")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("examples / s")
    ax_t.set_title("throughput (independent of epsilon)")
    ax_a.set_ylabel("test accuracy")
    ax_a.set_title("accuracy after the fixed budget (dotted: no noise)")
    ax_t.legend(fontsize=7)
    if any(r["accuracy"] for r in rows):
        ax_a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
