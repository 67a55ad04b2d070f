"""DP-SGD vs DP-SGLD at the same ε: accuracy, ECE, NLL, Brier (mean ± std over seeds) + reliability diagrams.

    python -m experiments.langevin.run                       # the README table (~3 min on 2 CPU cores)
    python -m experiments.langevin.run --epsilons 3 --seeds 0 --config experiments/langevin/configs/digits.py:smoke

Three predictors per (ε, seed), all at exactly the same privacy:
  * DP-SGLD: mean predictive probabilities over the thinned post-burn-in samples;
  * DP-SGD (same run): the final iterate of that very trajectory;
  * DP-SGD (tuned recipe): configs/digits.py (Adam), the library's best DP-SGD here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time

from experiments.langevin.langevin import PosteriorPredictive, learning_rate_for_temperature, noise_for_temperature
from experiments.tables import mean_std, save_table
from jaxdp import accounting, metrics
from jaxdp.config import apply_overrides, load_config
from jaxdp.data import load as load_data
from jaxdp.plan import steps_per_epoch
from jaxdp.train import train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def langevin_config(spec: str, epsilon: float, seed: int, workdir: str, overrides=()):
    """The experiment config with σ calibrated and the learning rate (or σ) set by the temperature."""
    config = apply_overrides(
        load_config(spec),
        [
            *overrides,
            f"privacy.target_epsilon={epsilon}",
            f"seed={seed}",
            # A fixed noise seed makes this research table reproducible; a real private run keeps it secret.
            f"privacy.noise_seed={1000 + seed}",
            f"workdir={workdir}",
        ],
    )
    n = len(load_data(config.dataset, config.data_dir or None).x_train)
    steps = config.epochs * steps_per_epoch(n, config.batch_size)
    q = config.batch_size / n
    sigma = accounting.calibrate_noise_multiplier(
        epsilon, config.privacy.delta, q, steps, accountant=config.privacy.accountant
    )
    lv = config.langevin
    common = dict(dataset_size=n, batch_size=config.batch_size, l2_clip_norm=config.privacy.l2_clip_norm)
    if lv.mode == "lr":
        lr = learning_rate_for_temperature(lv.temperature, noise_multiplier=sigma, **common)
        config.optimizer.learning_rate = float(lr)
        tau = lv.temperature
    elif lv.mode == "noise":
        sigma, tau = noise_for_temperature(
            lv.temperature, learning_rate=config.optimizer.learning_rate, privacy_noise_multiplier=sigma, **common
        )
        config.privacy.noise_multiplier = float(sigma)
    else:
        raise ValueError(f"langevin.mode={lv.mode!r} must be 'lr' or 'noise'.")
    burn_in = int(lv.burn_in_fraction * steps)
    return config, PosteriorPredictive(burn_in=burn_in, thin=lv.thin), {"sigma": sigma, "tau": tau, "steps": steps}


def _quiet_train(config, callbacks):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # The cell's workdir is this table's: a rerun of the table trains it again.
        return train(config, progress=False, callbacks=callbacks, overwrite=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(HERE, "configs", "digits.py"))
    parser.add_argument("--baseline-config", default=os.path.join(ROOT, "configs", "digits.py"))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "langevin"))
    parser.add_argument("--bins", type=int, default=15)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for the DP-SGLD runs (key=value)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    results = []  # one dict per (method, epsilon, seed)
    for eps in args.epsilons:
        for seed in args.seeds:
            workdir = os.path.join(args.out, f"eps{eps:g}_seed{seed}")
            config, collector, info = langevin_config(args.config, eps, seed, workdir, args.set)
            summary = _quiet_train(config, [collector])
            labels = collector.labels
            base_spec = args.baseline_config + (":smoke" if args.config.endswith(":smoke") else "")
            base = apply_overrides(
                load_config(base_spec),
                [
                    f"privacy.target_epsilon={eps}",
                    f"seed={seed}",
                    f"privacy.noise_seed={1000 + seed}",
                    f"workdir={workdir}_tuned_dpsgd",
                ],
            )
            final_only = PosteriorPredictive(burn_in=0)
            base_summary = _quiet_train(base, [final_only])
            for method, probs, s in [
                ("DP-SGLD", collector.mean_probs, summary),
                ("DP-SGD (same run, final iterate)", collector.final_probs, summary),
                ("DP-SGD (tuned Adam recipe)", final_only.final_probs, base_summary),
            ]:
                row = {"method": method, "epsilon_target": eps, "seed": seed, "epsilon_spent": s["epsilon"]}
                row.update(metrics.uncertainty_metrics(probs, labels, args.bins))
                if method == "DP-SGLD":
                    row.update(
                        sigma=info["sigma"], tau=info["tau"], lr=config.optimizer.learning_rate, samples=collector.count
                    )
                results.append(row)
                if seed == args.seeds[0]:
                    tag = method.split(" ")[0] + (
                        "_final" if "final" in method else "_tuned" if "tuned" in method else ""
                    )
                    metrics.reliability_diagram(
                        probs,
                        labels,
                        os.path.join(args.out, f"reliability_{tag}_eps{eps:g}.png"),
                        num_bins=args.bins,
                        title=f"{method.split(' (')[0]} eps={eps:g}",
                    )
            print(
                f"eps={eps:g} seed={seed}: sigma={info['sigma']:.3f} tau={info['tau']:.3f} "
                f"lr={config.optimizer.learning_rate:.3f} samples={collector.count} "
                f"| SGLD acc {results[-3]['accuracy']:.3f} ece {results[-3]['ece']:.3f} "
                f"| SGD acc {results[-2]['accuracy']:.3f} ece {results[-2]['ece']:.3f} "
                f"| tuned acc {results[-1]['accuracy']:.3f} ece {results[-1]['ece']:.3f}",
                flush=True,
            )
    table = ["| method | ε | accuracy | ECE | NLL | Brier |", "|---|---|---|---|---|---|"]
    for eps in args.epsilons:
        for method in dict.fromkeys(r["method"] for r in results):
            rows = [r for r in results if r["method"] == method and r["epsilon_target"] == eps]
            cells = [mean_std([r[key] for r in rows]) for key in ("accuracy", "ece", "nll", "brier")]
            spent = max(r["epsilon_spent"] for r in rows)
            table.append(f"| {method} | {eps:g} (spent ≤ {spent:.3f}) | " + " | ".join(cells) + " |")
    heading = f"{len(args.seeds)} seeds, mean ± std; {args.bins}-bin ECE; took {time.perf_counter() - t0:.0f} s"
    save_table(args.out, "\n".join(table), results, heading)
    return results


if __name__ == "__main__":
    main()
