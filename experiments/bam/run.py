"""DP-SGD vs DP-SAT vs BAM at equal ε: accuracy and the *actual* clipping bias along training, mean ± std.

    python -m experiments.bam.run --table digits                         # 5 seeds x eps {1, 3, 8} x 3 methods
    python -m experiments.bam.run --table fashion_mnist data_dir=/work/data/tfds    # 3 seeds x eps 3
    python -m experiments.bam.run --tune digits                          # the search, on a validation split
    python -m experiments.bam.run --quick                                # digits, eps 3, 1 seed (<= 10 min)
    python -m experiments.bam.run --report digits                        # tables, verdict, figure from the file

Every run of one (ε, seed) has the same plan: σ calibrated to the target ε over the same steps,
the same Poisson batches and noise draws (noise seed 1000 + seed); only how each step forms its
per-example gradients differs. A probe (:class:`experiments.bam.bam.BiasProbe`) takes the plain
per-example gradients of a fixed subset of 512 training examples every ``bam.probe_every`` steps
and records the actual bias ‖mean clip(∇ℓ_i) − mean ∇ℓ_i‖, the alignment cos(mean clip(∇ℓ_i),
mean ∇ℓ_i), the bound mean max(0, ‖∇ℓ_i‖ − C) and the share clipped; for BAM also the bias of what
BAM clips (g_i^BAM). These read training data without noise: research diagnostics, not covered by ε.

Each finished run is appended at once to experiments/bam/results/<table>.jsonl (the search to
<table>_tune.jsonl); a rerun skips runs already there (``--redo`` trains them again), so a table
cut off midway is finished by running the same command again. Overrides are key=value.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import time

import numpy as np

from experiments import tables
from experiments.bam.bam import BiasProbe, method_hooks
from experiments.tables import group_rows, load_rows, mean_std
from jaxdp.config import apply_overrides, load_config
from jaxdp.data import Dataset, holdout, register_dataset
from jaxdp.data import load as load_data
from jaxdp.train import train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results")
FIGURES = os.path.join(HERE, "figures")
TABLES = ("digits", "fashion_mnist")
METHODS = {"dpsgd": "DP-SGD", "dpsat": "DP-SAT", "bam": "BAM"}
MIN_SEEDS = {"digits": 5, "fashion_mnist": 3}
# The keys of a run's row that identify it: a rerun skips a row with the same values.
RECIPE_VERSION = 1  # raise when what a run measures changes (bam.py, the probe), so old rows are not reused
IDENTITY = ("method", "epsilon_target", "seed", "learning_rate", "radius", "lam", "sat_radius", "config_id")
# What config_id leaves out: where a run is written, the keys a cell sets (its own identity above) and the lists
# that only say which cells to run. Everything else (epochs, C, batch, model, data, probe...) is in it, so a
# changed recipe never reuses rows trained under the old one.
_NOT_IN_ID = {
    "workdir", "data_dir", "seed", "privacy.noise_seed", "privacy.target_epsilon", "optimizer.learning_rate",
    "bam.method", "bam.radius", "bam.lam", "bam.sat_radius", "bam.epsilons", "bam.seeds", "bam.tune_seeds",
    "bam.tune_learning_rates", "bam.tune_radii", "bam.tune_sat_radii", "bam.tune_validation_size",
}  # fmt: skip


def config_path(table: str, variant: str | None = None) -> str:
    return os.path.join(HERE, "configs", f"{table}.py") + (f":{variant}" if variant else "")


def subset_dataset(base: str, train_size: int, data_dir: str | None) -> str:
    """A registered dataset training on a stratified subset (public seed 1) of ``base``'s training set."""
    name = f"bam-subset:{base}:{train_size}"
    full = load_data(base, data_dir or None)
    sub = holdout(full, train_size, seed=1)  # its evaluation split is the subset
    ds = Dataset(name, np.asarray(sub.x_test), sub.y_test, full.x_test, full.y_test, full.num_classes)
    register_dataset(name, lambda _data_dir, ds=ds: ds)
    return name


def config_id(config) -> str:
    """A short hash of the recipe (config minus the keys in ``_NOT_IN_ID``): rows of other recipes never mix."""
    return tables.config_id(config, _NOT_IN_ID, RECIPE_VERSION)


def late_mean(history: list[dict], key: str, num_steps: int) -> float:
    """Mean of ``key`` over the probes in the second half of training (past the early transient)."""
    vals = [r[key] for r in history if r["step"] > num_steps / 2 and key in r]
    return float(np.mean(vals)) if vals else float("nan")


def cell_identity(config, method: str, epsilon: float, seed: int, cid: str) -> dict:
    """The ``IDENTITY`` fields of one run: a rerun skips a row on record with the same values."""
    return {
        "method": method,
        "epsilon_target": float(epsilon),
        "seed": seed,
        "learning_rate": float(config.optimizer.learning_rate),
        "radius": float(config.bam.radius) if method == "bam" else None,
        "lam": float(config.bam.lam) if method == "bam" else None,
        "sat_radius": float(config.bam.sat_radius) if method == "dpsat" else None,
        "config_id": cid,
    }


def run_one(config, method: str, epsilon: float, seed: int, workdir: str, quiet: bool = True) -> dict:
    """Train one (method, ε, seed) of ``config`` (validation_size > 0: evaluated on the validation split)."""
    cid = config_id(config)
    config = apply_overrides(
        copy.deepcopy(config),
        [
            f"bam.method={method}",
            f"privacy.target_epsilon={epsilon}",
            f"seed={seed}",
            # A fixed noise seed makes this research table reproducible; a real private run keeps it secret.
            f"privacy.noise_seed={1000 + seed}",
            f"workdir={workdir}",
        ],
    )
    if config.bam.train_size:
        config.dataset = subset_dataset(config.dataset, config.bam.train_size, config.data_dir)
    hooks = method_hooks(config.bam)
    probe = BiasProbe(config.bam.probe_size, config.bam.probe_every, example_grad=hooks.get("example_grad"))
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        with contextlib.redirect_stderr(out) if quiet else contextlib.nullcontext():
            summary = train(config, progress=not quiet, callbacks=[probe], overwrite=True, **hooks)
    history = summary["bias_history"]
    steps = summary["steps"]
    row = {
        **cell_identity(config, method, epsilon, seed, cid),
        "evaluated_on": summary["evaluated_on"],
        "epsilon_spent": summary["epsilon"],
        "noise_multiplier": summary["noise_multiplier"],
        "l2_clip_norm": summary["l2_clip_norm"],
        "steps": steps,
        "accuracy": summary["test_accuracy"],
        "wall_s": time.perf_counter() - t0,
        "examples_per_sec": summary["examples_per_sec"],
        "history": history,
        # Read from the training data without noise: not covered by ε (nor is the search that chose the
        # hyperparameters on the validation split).
        "not_covered_by_epsilon": ["history", "late_*", "final_*"],
    }
    for key in probe.keys:
        row[f"late_{key}"] = late_mean(history, key, steps)
        row[f"final_{key}"] = history[-1][key] if history else float("nan")
    return row


def current_rows(path: str, config) -> list[dict]:
    """The rows on record in ``path`` trained under ``config``'s recipe (see :func:`config_id`)."""
    cid = config_id(config)
    return [r for r in load_rows(path) if r.get("config_id") == cid]


def latest(rows: list[dict]) -> list[dict]:
    """One row per run: the last one written (``--redo`` appends, it does not rewrite the file)."""
    return tables.latest(rows, IDENTITY)


def table_rows(rows: list[dict], config) -> list[dict]:
    """The rows of the table ``config`` describes: its step size, r, λ and ρ (latest row per run)."""
    lr, b = float(config.optimizer.learning_rate), config.bam

    def same(r):
        if r["learning_rate"] != lr:
            return False
        if r["method"] == "bam":
            return (r["radius"], r["lam"]) == (float(b.radius), float(b.lam))
        return r["method"] != "dpsat" or r["sat_radius"] == float(b.sat_radius)

    return [r for r in latest(rows) if same(r)]


def chosen(tune_rows: list[dict]) -> dict:
    """The search's choice: DP-SGD's best step size, then BAM's r (λ = r) and DP-SAT's ρ at it."""
    lr = best_learning_rate(tune_rows)
    out = {"optimizer.learning_rate": lr}
    for method, key in (("bam", "radius"), ("dpsat", "sat_radius")):
        rs = [r for r in tune_rows if r["method"] == method and r["learning_rate"] == lr]
        if rs:
            means = {v: np.mean([r["accuracy"] for r in g]) for (v,), g in group_rows(rs, [key]).items()}
            out[f"bam.{key}"] = max(means, key=means.get)
    if "bam.radius" in out:
        out["bam.lam"] = out["bam.radius"]  # alpha = 1
    return out


def tune_config(table: str, overrides=()):
    """The search's config: the table's, evaluated on ``bam.tune_validation_size`` held-out training examples."""
    config = apply_overrides(load_config(config_path(table)), list(overrides))
    config.validation_size = config.bam.tune_validation_size  # never the test set
    return config


def _identity(row: dict) -> tuple:
    return tuple(row.get(k) for k in IDENTITY)


def run_cells(config, cells, path: str, out: str, redo: bool = False, quiet: bool = True) -> list[dict]:
    """Train ``cells`` = [(method, ε, seed, overrides)], appending each row to ``path`` as it finishes."""
    done = tables.recorded_runs(path, IDENTITY)
    rows = []
    for i, (method, eps, seed, overrides) in enumerate(cells, 1):
        c = apply_overrides(copy.deepcopy(config), list(overrides))
        probe_row = cell_identity(c, method, eps, seed, config_id(c))  # what this cell's row will be keyed by
        label = f"[{i}/{len(cells)}] {METHODS[method]} eps={eps:g} seed={seed} " + " ".join(overrides)
        if not redo and _identity(probe_row) in done:
            print(f"{label}: on record, skipped", flush=True)
            continue
        tag = "_".join(o.replace("=", "") for o in overrides).replace("/", "_")
        workdir = os.path.join(out, f"{method}_eps{eps:g}_seed{seed}" + (f"_{tag}" if tag else ""))
        row = run_one(c, method, eps, seed, workdir, quiet=quiet)
        tables.append_row(path, row)
        rows.append(row)
        print(
            f"{label}: acc {row['accuracy']:.3f} ({row['evaluated_on']}) | late bias {row['late_bias']:.3f} "
            f"cos {row['late_cosine']:.2f} | {row['wall_s']:.0f} s",
            flush=True,
        )
    return rows


def table_cells(config) -> list:
    return [(m, eps, seed, ()) for eps in config.bam.epsilons for seed in config.bam.seeds for m in METHODS]


def tune_cells(config, stage: int, learning_rate: float | None = None) -> list:
    """Stage 1: DP-SGD's step size. Stage 2 (at the chosen step size): BAM's r (α = 1) and DP-SAT's ρ."""
    b = config.bam
    cells = []
    for seed in b.tune_seeds:
        if stage == 1:
            cells += [("dpsgd", 3.0, seed, (f"optimizer.learning_rate={lr}",)) for lr in b.tune_learning_rates]
        else:
            lr = (f"optimizer.learning_rate={learning_rate}",)
            cells += [("bam", 3.0, seed, (*lr, f"bam.radius={r}", f"bam.lam={r}")) for r in b.tune_radii]
            cells += [("dpsat", 3.0, seed, (*lr, f"bam.sat_radius={r}")) for r in b.tune_sat_radii]
    return cells


def best_learning_rate(rows: list[dict]) -> float:
    """The DP-SGD step size with the highest mean validation accuracy."""
    sgd = [r for r in rows if r["method"] == "dpsgd" and r["evaluated_on"] == "validation"]
    if not sgd:
        raise ValueError("no DP-SGD search rows on record: run stage 1 of --tune first.")
    means = {lr: np.mean([r["accuracy"] for r in g]) for (lr,), g in group_rows(sgd, ["learning_rate"]).items()}
    return max(means, key=means.get)


def tune_text(rows: list[dict]) -> str:
    lines = [
        "| method | step size | r (= λ) | ρ | seeds | validation accuracy | late bias | late cos |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (m, lr, r, rho), g in sorted(
        group_rows(rows, ["method", "learning_rate", "radius", "sat_radius"]).items(),
        key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1], kv[0][2] or 0, kv[0][3] or 0),
    ):
        lines.append(
            f"| {METHODS[m]} | {lr:g} | {'' if r is None else f'{r:g}'} | {'' if rho is None else f'{rho:g}'} "
            f"| {len(g)} | {mean_std([x['accuracy'] for x in g])} | {mean_std([x['late_bias'] for x in g])} "
            f"| {mean_std([x['late_cosine'] for x in g], 2)} |"
        )
    return "\n".join(lines)


COLUMNS = [
    ("accuracy", "test accuracy", 3),
    ("late_bias", "bias ‖E clip − ∇L‖", 3),
    ("late_grad_norm", "‖∇L‖", 3),
    ("late_cosine", "cos(E clip, ∇L)", 3),
    ("late_bias_bound", "bias bound", 3),
    ("late_clipped_fraction", "clipped", 2),
    ("late_norm_median", "median ‖∇ℓ_i‖", 3),
    ("late_oracle_bias", "BAM's own bias", 3),
    ("late_oracle_cosine", "BAM's own cos", 3),
]


def _cell(rows, key, digits):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return mean_std(vals, digits) if len(vals) == len(rows) else ""


def table_text(rows: list[dict]) -> str:
    """Mean ± std over seeds per (ε, method); bias columns are means over the second half of training."""
    rows = [r for r in rows if r["evaluated_on"] == "test"]
    lines = [
        "| ε (spent) | method | seeds | " + " | ".join(name for _, name, _ in COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 3),
    ]
    for (eps,), g in sorted(group_rows(rows, ["epsilon_target"]).items()):
        for m in METHODS:
            mr = [r for r in g if r["method"] == m]
            if not mr:
                continue
            spent = max(r["epsilon_spent"] for r in mr)
            cells = [_cell(mr, key, d) for key, _, d in COLUMNS]
            lines.append(f"| {eps:g} ({spent:.3f}) | {METHODS[m]} | {len(mr)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_text(rows: list[dict], min_seeds: int) -> str:
    """Reproduced at an ε iff, over ≥ min_seeds seeds at equal ε spent (means over the second half of training):
    BAM's actual bias is below DP-SGD's by more than the larger seed std; its alignment cos(E clip, ∇L) is
    above DP-SGD's by more than the larger seed std (with C below the norms ‖E clip‖ ≤ C, so the bias alone
    is within C of ‖∇L‖ and could fall only because the gradient is smaller); and BAM's accuracy exceeds
    DP-SGD's by more than the larger seed std. Otherwise not reproduced (or not testable: too few seeds,
    unequal ε spent)."""
    rows = latest([r for r in rows if r["evaluated_on"] == "test"])
    out = []
    for (eps,), g in sorted(group_rows(rows, ["epsilon_target"]).items()):
        sgd = sorted((r for r in g if r["method"] == "dpsgd"), key=lambda r: r["seed"])
        bam = sorted((r for r in g if r["method"] == "bam"), key=lambda r: r["seed"])
        seeds = sorted({r["seed"] for r in sgd} & {r["seed"] for r in bam})
        if len(seeds) < min_seeds:
            out.append(f"ε = {eps:g}: not testable yet: {len(seeds)} seed(s) with both runs (need {min_seeds}).")
            continue
        sgd = [r for r in sgd if r["seed"] in seeds]
        bam = [r for r in bam if r["seed"] in seeds]
        spent = [r["epsilon_spent"] for r in sgd + bam]
        if max(spent) - min(spent) > 1e-6:
            out.append(f"ε = {eps:g}: not testable: ε spent differs between runs ({min(spent)}..{max(spent)}).")
            continue

        def ms(rs, key):
            v = np.array([r[key] for r in rs])
            return v.mean(), (v.std(ddof=1) if len(v) > 1 else 0.0)

        (b0, sb0), (b1, sb1) = ms(sgd, "late_bias"), ms(bam, "late_bias")
        (a0, sa0), (a1, sa1) = ms(sgd, "accuracy"), ms(bam, "accuracy")
        (c0, sc0), (c1, sc1) = ms(sgd, "late_cosine"), ms(bam, "late_cosine")
        # Paired by seed (the same batches and noise draws): in how many seeds does BAM do better?
        lower = sum(b["late_bias"] < s["late_bias"] for s, b in zip(sgd, bam, strict=True))
        higher = sum(b["accuracy"] > s["accuracy"] for s, b in zip(sgd, bam, strict=True))
        bias_falls = b0 - b1 > max(sb0, sb1)
        aligns = c1 - c0 > max(sc0, sc1)
        acc_gain = a1 - a0 > max(sa0, sa1)
        verdict = "reproduced" if bias_falls and aligns and acc_gain else "not reproduced"
        out.append(
            f"ε = {eps:g} ({len(seeds)} seeds): actual bias {b0:.3f} → {b1:.3f} "
            f"({'falls by more than' if bias_falls else 'does not fall by more than'} the seed std "
            f"{max(sb0, sb1):.3f}; lower in {lower} of {len(seeds)} seeds); alignment {c0:.3f} → {c1:.3f} "
            f"({'rises by more than' if aligns else 'does not rise by more than'} the seed std {max(sc0, sc1):.3f}); "
            f"accuracy {a0:.3f} → {a1:.3f} "
            f"({'+' if a1 >= a0 else ''}{100 * (a1 - a0):.1f} points, seed std {100 * max(sa0, sa1):.1f}; "
            f"higher in {higher} of {len(seeds)} seeds): "
            f"**{verdict}**."
        )
    return "\n".join(f"- {line}" for line in out)


def plot(rows: list[dict], path: str) -> str:
    """Bias, alignment and bias bound over training (mean over seeds), one row of panels per ε."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["evaluated_on"] == "test"]
    epsilons = sorted({r["epsilon_target"] for r in rows})
    keys = [("bias", "actual bias ‖E clip − ∇L‖"), ("cosine", "cos(E clip, ∇L)"), ("bias_bound", "bias bound")]
    fig, axes = plt.subplots(len(epsilons), 3, figsize=(12, 3 * len(epsilons)), squeeze=False)
    for i, eps in enumerate(epsilons):
        for m, label in METHODS.items():
            mr = [r for r in rows if r["epsilon_target"] == eps and r["method"] == m]
            if not mr:
                continue
            steps = [h["step"] for h in mr[0]["history"]]
            for j, (key, title) in enumerate(keys):
                curves = np.array([[h[key] for h in r["history"]] for r in mr if len(r["history"]) == len(steps)])
                style = {"dpsgd": dict(lw=3, alpha=0.5), "dpsat": dict(ls="--"), "bam": {}}[m]  # SAT ≈ SGD: both seen
                axes[i, j].plot(steps, curves.mean(0), label=f"{label} ({len(curves)} seeds)", **style)
                axes[i, j].set_title(f"ε = {eps:g}: {title}", fontsize=9)
                axes[i, j].set_xlabel("step", fontsize=8)
        axes[i, 0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(table: str, overrides=()) -> tuple[str, list[dict]]:
    """The table, verdict and search of ``table`` from its files, and the table's rows (current recipe only)."""
    config = apply_overrides(load_config(config_path(table)), list(overrides))
    rows = table_rows(current_rows(os.path.join(RESULTS, f"{table}.jsonl"), config), config)
    text = table_text(rows) + "\n\nVerdict:\n" + verdict_text(rows, MIN_SEEDS.get(table, 5))
    tune_rows = latest(current_rows(os.path.join(RESULTS, f"{table}_tune.jsonl"), tune_config(table, overrides)))
    if tune_rows:
        text += "\n\nSearch on the validation split (ε = 3):\n" + tune_text(tune_rows)
    return text, rows


def check_tuned(table: str, config, overrides=(), untuned: bool = False) -> None:
    """Refuse a table whose step size, r, λ or ρ differ from the search's choice (or with no search on record)."""
    if untuned:
        return
    rows = latest(current_rows(os.path.join(RESULTS, f"{table}_tune.jsonl"), tune_config(table, overrides)))
    if not rows:
        raise SystemExit(
            f"--table {table}: no search on record for this recipe; run --tune {table} first (or pass --untuned)."
        )
    pick = chosen(rows)
    wrong = {k: v for k, v in pick.items() if float(config[k.split(".")[0]][k.split(".")[1]]) != v}
    if wrong:
        have = " ".join(f"{k}={config[k.split('.')[0]][k.split('.')[1]]:g}" for k in wrong)
        raise SystemExit(
            f"--table {table}: {have} is not what the search on the validation split chose; set "
            + " ".join(f"{k}={v:g}" for k, v in wrong.items())
            + f" in experiments/bam/configs/{table}.py (or pass --untuned)."
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--table", choices=TABLES)
    group.add_argument("--tune", choices=TABLES)
    group.add_argument("--report", choices=TABLES)
    group.add_argument("--quick", action="store_true", help="digits, ε 3, seed 0, 40 epochs (<= 10 minutes)")
    parser.add_argument("--redo", action="store_true", help="train runs already on record again")
    parser.add_argument(
        "--untuned", action="store_true", help="run a table whose hyperparameters the search did not choose"
    )
    parser.add_argument("--verbose", action="store_true", help="show each run's own output")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.report:
        text, rows = report(args.report, args.overrides)
        print(text)
        if rows:
            print("\nfigure:", plot(rows, os.path.join(FIGURES, f"{args.report}_bias.png")))
        return
    if args.quick:
        config = apply_overrides(load_config(config_path("digits", "quick")), args.overrides)
        out = os.path.join(ROOT, "runs", "bam_quick")
        path = os.path.join(out, "quick.jsonl")
        if os.path.exists(path):
            os.remove(path)  # the quick check always trains
        rows = run_cells(config, table_cells(config), path, out, redo=True, quiet=not args.verbose)
        print("\n" + table_text(rows) + "\n\nVerdict (1 seed: a smoke check, not a result):\n" + verdict_text(rows, 1))
        print(f"\ntook {time.perf_counter() - t0:.0f} s")
        return
    name = args.table or args.tune
    out = os.path.join(ROOT, "runs", f"bam_{name}")
    if args.tune:
        config = tune_config(name, args.overrides)
        path = os.path.join(RESULTS, f"{name}_tune.jsonl")
        run_cells(config, tune_cells(config, 1), path, out, args.redo, quiet=not args.verbose)
        lr = best_learning_rate(latest(current_rows(path, config)))
        print(f"stage 1: DP-SGD's step size {lr:g} (highest mean validation accuracy)", flush=True)
        run_cells(config, tune_cells(config, 2, lr), path, out, args.redo, quiet=not args.verbose)
        print("\n" + tune_text(latest(current_rows(path, config))))
        print("chosen:", " ".join(f"{k}={v:g}" for k, v in chosen(latest(current_rows(path, config))).items()))
    else:
        config = apply_overrides(load_config(config_path(name)), args.overrides)
        check_tuned(name, config, args.overrides, args.untuned)
        path = os.path.join(RESULTS, f"{name}.jsonl")
        run_cells(config, table_cells(config), path, out, args.redo, quiet=not args.verbose)
        text, rows = report(name, args.overrides)
        print("\n" + text)
        print("\nfigure:", plot(rows, os.path.join(FIGURES, f"{name}_bias.png")))
    print(f"\ntook {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
