"""Complex CNN on k-space with real phase vs normalised real CNNs at equal ε: accuracy, mean ± std over seeds.

    python -m experiments.complex_valued.run --tune digits                # step size per model, validation split
    python -m experiments.complex_valued.run --table digits               # 5 seeds x eps {1, 3, 10} x 7 models
    python -m experiments.complex_valued.run --tune fashion_mnist data_dir=/work/data/tfds
    python -m experiments.complex_valued.run --table fashion_mnist data_dir=/work/data/tfds   # 3 seeds x eps 3
    python -m experiments.complex_valued.run --quick                      # digits, eps 3, seed 0, every model
    python -m experiments.complex_valued.run --report digits              # table and verdict from the files

Every run of one (ε, seed) has the same privacy plan: the same Poisson q, steps, C and δ, σ calibrated to
the target ε (RDP), and the same noise seed (2000 + seed); only the input and the network differ
(configs/digits.py, MODELS). Each model's step size is chosen by ``--tune`` on a validation split held out
of the training set at ε = 3 (the test set is never evaluated), and ``--table`` refuses step sizes the search
did not choose.

Each finished run is appended at once to experiments/complex_valued/results/<table>.jsonl (the search to
<table>_tune.jsonl); a rerun skips runs already there (``--redo`` trains them again), so a table cut off
midway is finished by running the same command again. Rows carry a recipe hash: rows trained under another
recipe are never mixed in. Overrides are key=value and apply to every run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import time

import jax
import numpy as np

from experiments import tables
from experiments.tables import group_rows, load_rows, mean_std
from jaxdp.config import apply_overrides, config_module, load_config
from jaxdp.train import TrainCallback, train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results")
TABLES = ("digits", "fashion_mnist")
MIN_SEEDS = {"digits": 5, "fashion_mnist": 3}
LABELS = {
    "complex": "complex CNN, k-space (ConjugateMish, whitening WS)",
    "complex_cardioid": "complex CNN, k-space (cardioid, whitening WS)",
    "complex_image": "complex CNN, complex image (ConjugateMish, whitening WS)",
    "magnitude": "real CNN, magnitude image",
    "reim": "real CNN, k-space (Re, Im)",
    "magnitude_wide": "real CNN, magnitude image, wide",
    "reim_wide": "real CNN, k-space (Re, Im), wide",
    "image_reim": "real CNN, complex image (Re, Im)",
}
COMPLEX_MODELS = ("complex", "complex_cardioid", "complex_image")
_DIGITS = config_module(os.path.join(HERE, "configs", "digits.py"))  # MODELS and apply_model
RECIPE_VERSION = 1  # raise when what a run measures changes, so old rows are not reused
IDENTITY = ("model", "epsilon_target", "seed", "learning_rate", "config_id")
# What config_id leaves out: where runs are written, what a cell sets itself (its identity above) and the
# lists that only say which cells to run. Everything else (data, network, epochs, C, batch, δ...) is in it.
_NOT_IN_ID = {
    "workdir", "data_dir", "seed", "privacy.noise_seed", "privacy.target_epsilon", "optimizer.learning_rate",
    "validation_size", "cv.models", "cv.epsilons", "cv.seeds", "cv.learning_rates", "cv.tune_learning_rates",
    "cv.tune_seeds", "cv.tune_validation_size",
}  # fmt: skip


def config_path(table: str, variant: str | None = None) -> str:
    return os.path.join(HERE, "configs", f"{table}.py") + (f":{variant}" if variant else "")


def config_id(config) -> str:
    """A short hash of one model's recipe (config minus ``_NOT_IN_ID``): rows of other recipes never mix."""
    return tables.config_id(config, _NOT_IN_ID, RECIPE_VERSION)


def model_config(config, model: str):
    """``config`` set up for ``model`` (dataset, network, its step size, workdir)."""
    config = copy.deepcopy(config)
    config.cv.model = model
    return _DIGITS.apply_model(config)


class ParameterCount(TrainCallback):
    """Reports the number of trained reals (a complex parameter counts twice) and the largest |parameter|."""

    def on_end(self, params, workdir):
        leaves = jax.tree_util.tree_leaves(params)
        reals = sum(int(np.prod(v.shape)) * (2 if np.iscomplexobj(v) else 1) for v in leaves)
        return {"num_reals": reals, "num_complex_leaves": sum(bool(np.iscomplexobj(v)) for v in leaves)}


def cell_identity(config, epsilon: float, seed: int) -> dict:
    return {
        "model": config.cv.model,
        "epsilon_target": float(epsilon),
        "seed": seed,
        "learning_rate": float(config.optimizer.learning_rate),
        "config_id": config_id(config),
    }


def run_one(config, epsilon: float, seed: int, workdir: str, quiet: bool = True) -> dict:
    """Train one (model, ε, seed) of ``config`` (validation_size > 0: evaluated on the validation split)."""
    identity = cell_identity(config, epsilon, seed)
    config = apply_overrides(
        copy.deepcopy(config),
        [
            f"privacy.target_epsilon={epsilon}",
            f"seed={seed}",
            # A fixed noise seed makes this research table reproducible (and pairs the models of one seed);
            # a real private run keeps it secret.
            f"privacy.noise_seed={2000 + seed}",
            f"workdir={workdir}",
        ],
    )
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        with contextlib.redirect_stderr(out) if quiet else contextlib.nullcontext():
            s = train(config, progress=not quiet, callbacks=[ParameterCount()], overwrite=True)
    return {
        **identity,
        "dataset": s["dataset"],
        "network": s["model"],
        "model_kwargs": dict(config.model.kwargs),
        "num_reals": s["num_reals"],
        "complex_parameters": s["num_complex_leaves"] > 0,
        "evaluated_on": s["evaluated_on"],
        "epsilon_spent": s["epsilon"],
        "delta": s["delta"],
        "noise_multiplier": s["noise_multiplier"],
        "l2_clip_norm": s["l2_clip_norm"],
        "steps": s["steps"],
        "accuracy": s["test_accuracy"],
        "train_accuracy": s["train_accuracy"],
        "clipping_impl": s["clipping_impl"],
        "examples_per_sec": s["examples_per_sec"],
        "wall_s": time.perf_counter() - t0,
        "not_covered_by_epsilon": ["train_accuracy"],  # read from the training data without noise
    }


def run_cells(config, cells, path: str, out: str, redo: bool = False, quiet: bool = True) -> list[dict]:
    """Train ``cells`` = [(model, ε, seed, overrides)], appending each row to ``path`` as it finishes."""
    done = tables.recorded_runs(path, IDENTITY)
    rows = []
    for i, (model, eps, seed, overrides) in enumerate(cells, 1):
        c = model_config(apply_overrides(copy.deepcopy(config), list(overrides)), model)
        label = f"[{i}/{len(cells)}] {model} eps={eps:g} seed={seed} lr={c.optimizer.learning_rate:g}"
        if not redo and _identity(cell_identity(c, eps, seed)) in done:
            print(f"{label}: on record, skipped", flush=True)
            continue
        workdir = os.path.join(out, f"{model}_eps{eps:g}_seed{seed}_lr{c.optimizer.learning_rate:g}")
        row = run_one(c, eps, seed, workdir, quiet=quiet)
        tables.append_row(path, row)
        rows.append(row)
        print(
            f"{label}: acc {row['accuracy']:.3f} ({row['evaluated_on']}) eps spent {row['epsilon_spent']:.3f} "
            f"| {row['examples_per_sec']:,.0f} ex/s | {row['wall_s']:.0f} s",
            flush=True,
        )
    return rows


def _identity(row: dict) -> tuple:
    return tuple(row.get(k) for k in IDENTITY)


def latest(rows: list[dict]) -> list[dict]:
    """One row per run: the last one written (``--redo`` appends, it does not rewrite the file)."""
    return tables.latest(rows, IDENTITY)


def current_rows(path: str, config) -> list[dict]:
    """The rows on record in ``path`` trained under one of ``config``'s models' recipes (latest per run)."""
    ids = {config_id(model_config(config, m)) for m in config.cv.models}
    return latest([r for r in load_rows(path) if r.get("config_id") in ids])


def table_cells(config) -> list:
    return [(m, eps, seed, ()) for eps in config.cv.epsilons for seed in config.cv.seeds for m in config.cv.models]


def tune_cells(config) -> list:
    cells = []
    for seed in config.cv.tune_seeds:
        for lr in config.cv.tune_learning_rates:
            cells += [(m, 3.0, seed, (f"cv.learning_rates.{m}={lr}",)) for m in config.cv.models]
    return cells


def tune_config(table: str, overrides=()):
    """The search's config: the table's, evaluated on ``cv.tune_validation_size`` held-out training examples."""
    config = apply_overrides(load_config(config_path(table)), list(overrides))
    config.validation_size = config.cv.tune_validation_size  # never the test set
    return config


def chosen(tune_rows: list[dict]) -> dict[str, float]:
    """Per model, the step size with the highest mean validation accuracy."""
    out = {}
    for (model,), g in group_rows([r for r in tune_rows if r["evaluated_on"] == "validation"], ["model"]).items():
        means = {lr: np.mean([r["accuracy"] for r in rs]) for (lr,), rs in group_rows(g, ["learning_rate"]).items()}
        out[model] = max(means, key=means.get)
    return out


def check_tuned(table: str, config, overrides=(), untuned: bool = False) -> None:
    """Refuse a table whose step sizes differ from the search's choice (or with no search on record)."""
    if untuned:
        return
    tune = tune_config(table, overrides)
    pick = chosen(current_rows(os.path.join(RESULTS, f"{table}_tune.jsonl"), tune))
    missing = [m for m in config.cv.models if m not in pick]
    if missing:
        raise SystemExit(
            f"--table {table}: no search on record for {', '.join(missing)} under this recipe; run --tune {table} "
            "first (or pass --untuned)."
        )
    wrong = {m: lr for m, lr in pick.items() if m in config.cv.models and float(config.cv.learning_rates[m]) != lr}
    if wrong:
        raise SystemExit(
            f"--table {table}: the step sizes are not what the search on the validation split chose; set "
            + " ".join(f"cv.learning_rates.{m}={lr:g}" for m, lr in wrong.items())
            + f" in experiments/complex_valued/configs/{table}.py (or pass --untuned)."
        )


def tune_text(rows: list[dict]) -> str:
    lines = ["| model | step size | seeds | validation accuracy |", "|---|---|---|---|"]
    pick = chosen(rows)
    for (m, lr), g in sorted(
        group_rows(rows, ["model", "learning_rate"]).items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])
    ):
        mark = " (chosen)" if pick.get(m) == lr else ""
        lines.append(f"| {LABELS[m]} | {lr:g}{mark} | {len(g)} | {mean_std([r['accuracy'] for r in g])} |")
    return "\n".join(lines)


def _order(model: str) -> int:
    return list(LABELS).index(model)


def table_text(rows: list[dict]) -> str:
    """Mean ± std over seeds per (ε, model), with the input and the size of each network. (Speed is the
    bench's: the tables ran beside each other, so their runs' examples/s measure a shared CPU.)"""
    rows = [r for r in rows if r["evaluated_on"] == "test"]
    lines = [
        "| ε (spent ≤) | model | input | features | reals | seeds | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for (eps,), g in sorted(group_rows(rows, ["epsilon_target"]).items()):
        spent = max(r["epsilon_spent"] for r in g)
        for (m,), mr in sorted(group_rows(g, ["model"]).items(), key=lambda kv: _order(kv[0][0])):
            r0 = mr[0]
            lines.append(
                f"| {eps:g} ({spent:.3f}) | {LABELS[m]} | {r0['dataset']} | {tuple(r0['model_kwargs']['features'])} "
                f"| {r0['num_reals']:,} | {len(mr)} | {mean_std([r['accuracy'] for r in mr])} |"
            )
    return "\n".join(lines)


def verdict_text(rows: list[dict], min_seeds: int, models=None) -> str:
    """Reproduced at an ε iff the complex CNN on k-space (the paper's input, the authors' layers) matches or
    beats every normalised real control there: over ≥ ``min_seeds`` seeds at equal ε spent, its mean accuracy
    is at least each control's mean minus the larger of the two seed stds (a tie within the seed spread
    counts as matching). Otherwise not reproduced, naming the controls that beat it; or not testable (too few
    seeds, unequal ε spent). The complex CNN on the complex image gets the same test on a line of its own
    (``complex_image``: not the paper's input, so it does not decide the verdict). ``models`` (the table's
    ``cv.models``) names the controls that must all be there: an ε missing one of them is not testable."""
    rows = [r for r in rows if r["evaluated_on"] == "test"]
    out = []
    for (eps,), g in sorted(group_rows(rows, ["epsilon_target"]).items()):
        by_model = {m: sorted(rs, key=lambda r: r["seed"]) for (m,), rs in group_rows(g, ["model"]).items()}
        controls = sorted((m for m in (models or by_model) if m not in COMPLEX_MODELS), key=_order)
        missing = [LABELS[m] for m in controls if m not in by_model]
        for cm in ("complex", "complex_image"):
            if cm in by_model and missing:
                out.append(f"ε = {eps:g}, {LABELS[cm]}: not testable: no runs of {'; '.join(missing)}.")
            elif cm in by_model:
                out.append(_verdict_line(eps, cm, by_model, controls, min_seeds))
    return "\n".join(f"- {line}" for line in out)


def _verdict_line(eps: float, cm: str, by_model: dict, controls: list[str], min_seeds: int) -> str:
    head = f"ε = {eps:g}, {LABELS[cm]}"
    seeds = set.intersection(*({r["seed"] for r in by_model[m]} for m in [cm, *controls]))
    if len(seeds) < min_seeds or not controls:
        return f"{head}: not testable yet: {len(seeds)} seed(s) with every run (need {min_seeds})."
    sel = {m: [r for r in by_model[m] if r["seed"] in seeds] for m in [cm, *controls]}
    spent = [r["epsilon_spent"] for rs in sel.values() for r in rs]
    if max(spent) - min(spent) > 1e-6:
        return f"{head}: not testable: ε spent differs between runs ({min(spent)}..{max(spent)})."
    c_mean, c_std = _mean_std(sel[cm])
    parts, beaten_by = [], []
    for m in controls:
        mean, std = _mean_std(sel[m])
        wins = sum(a["accuracy"] >= b["accuracy"] for a, b in zip(sel[cm], sel[m], strict=True))
        parts.append(f"{LABELS[m]} {mean:.3f} ± {std:.3f} (complex ≥ it in {wins} of {len(seeds)} seeds)")
        if c_mean < mean - max(c_std, std):
            beaten_by.append(LABELS[m])
    verdict = "reproduced" if not beaten_by else "not reproduced"
    if cm != "complex":
        verdict = "matches every control" if not beaten_by else "does not match every control"
    why = "" if not beaten_by else f": beaten beyond the seed spread by {'; '.join(beaten_by)}"
    return f"{head} ({len(seeds)} seeds): {c_mean:.3f} ± {c_std:.3f} vs " + "; ".join(parts) + f" → **{verdict}**{why}."


def _mean_std(rows: list[dict]) -> tuple[float, float]:
    v = np.array([r["accuracy"] for r in rows])
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def report(table: str, overrides=()) -> tuple[str, list[dict]]:
    """The table, verdict and search of ``table`` from its files (current recipe only), and the table's rows."""
    config = apply_overrides(load_config(config_path(table)), list(overrides))
    rows = current_rows(os.path.join(RESULTS, f"{table}.jsonl"), config)
    lrs = {m: float(config.cv.learning_rates[m]) for m in config.cv.models}
    rows = [r for r in rows if lrs.get(r["model"]) == r["learning_rate"]]  # the step sizes the config names
    text = table_text(rows) + "\n\nVerdict:\n" + verdict_text(rows, MIN_SEEDS.get(table, 5), config.cv.models)
    tune_rows = current_rows(os.path.join(RESULTS, f"{table}_tune.jsonl"), tune_config(table, overrides))
    if tune_rows:
        text += "\n\nSearch on the validation split (ε = 3):\n" + tune_text(tune_rows)
    return text, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--table", choices=TABLES)
    group.add_argument("--tune", choices=TABLES)
    group.add_argument("--report", choices=TABLES)
    group.add_argument("--quick", action="store_true", help="digits, ε 3, seed 0, every model (<= 10 minutes)")
    parser.add_argument("--redo", action="store_true", help="train runs already on record again")
    parser.add_argument("--untuned", action="store_true", help="run a table whose step sizes the search did not choose")
    parser.add_argument("--verbose", action="store_true", help="show each run's own output")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    quiet = not args.verbose
    # The runs of a table compile the same few steps again and again (one per model and ε): keep XLA's
    # executables on disk (runs/ is not committed). Only this research script does so; the noise seeds of
    # these public-data runs are fixed anyway.
    jax.config.update("jax_compilation_cache_dir", os.path.join(ROOT, "runs", "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.report:
        print(report(args.report, args.overrides)[0])
        return None
    if args.quick:
        config = apply_overrides(load_config(config_path("digits")), args.overrides)
        out = os.path.join(ROOT, "runs", "complex_quick")
        path = os.path.join(out, "quick.jsonl")
        if os.path.exists(path):
            os.remove(path)  # the quick check always trains
        cells = [(m, 3.0, 0, ()) for m in config.cv.models]
        rows = run_cells(config, cells, path, out, redo=True, quiet=quiet)
        verdict = verdict_text(rows, 1, config.cv.models)
        print("\n" + table_text(rows) + "\n\nVerdict (1 seed: a smoke check, not a result):\n" + verdict)
        print(f"\ntook {time.perf_counter() - t0:.0f} s")
        return rows
    name = args.table or args.tune
    out = os.path.join(ROOT, "runs", f"complex_{name}")
    if args.tune:
        config = tune_config(name, args.overrides)
        path = os.path.join(RESULTS, f"{name}_tune.jsonl")
        rows = run_cells(config, tune_cells(config), path, out, args.redo, quiet=quiet)
        every = current_rows(path, config)
        print("\n" + tune_text(every))
        print("chosen:", " ".join(f"cv.learning_rates.{m}={lr:g}" for m, lr in chosen(every).items()))
    else:
        config = apply_overrides(load_config(config_path(name)), args.overrides)
        check_tuned(name, config, args.overrides, args.untuned)
        path = os.path.join(RESULTS, f"{name}.jsonl")
        rows = run_cells(config, table_cells(config), path, out, args.redo, quiet=quiet)
        print("\n" + report(name, args.overrides)[0])
    print(f"\ntook {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
