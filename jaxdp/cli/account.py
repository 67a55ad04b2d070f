"""``jaxdp account``: ε per accountant and attack risk of a (planned) run, as a table or JSON.

``--epochs K`` counts steps exactly as ``jaxdp train epochs=K`` runs them: K whole epochs of
:func:`jaxdp.sampling.steps_per_epoch` = round(N / B) steps (round(1 / q) from ``--sampling-rate``);
the header and the JSON say how many steps that is. The arguments are checked before the
accountants (and JAX, which they import) are loaded, so bad input answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from typing import TYPE_CHECKING

from jaxdp import rules
from jaxdp.sampling import steps_per_epoch

if TYPE_CHECKING:
    from jaxdp.accounting import (
        attack_risk,
        calibrate_noise_multiplier,
        calibrate_noise_multiplier_for_attack_risk,
        gdp_mu,
        make_accountant,
    )

# jaxdp.accounting imports JAX (2-3 s here): its names are loaded once the arguments are known good (PEP 562).
_ACCOUNTING = (
    "attack_risk",
    "calibrate_noise_multiplier",
    "calibrate_noise_multiplier_for_attack_risk",
    "gdp_mu",
    "make_accountant",
)


def __getattr__(name: str):
    if name in _ACCOUNTING:
        value = getattr(importlib.import_module("jaxdp.accounting"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FPRS = (0.01, 0.001)
# The one calibration rule: an explicit --calibrate-with is used for either target; without it, an epsilon
# target is calibrated with rdp (jaxdp train's default privacy.accountant, so both give the same sigma) and a
# TPR target with pld (the tight privacy profile; rdp's profile is looser and would ask for more noise).
CALIBRATE_WITH_DEFAULT = {"target_epsilon": "rdp", "target_tpr": "pld"}


def calibration_accountant(args: argparse.Namespace) -> str:
    """The accountant that calibrates sigma: --calibrate-with if given, else the default for the target."""
    if args.calibrate_with:
        return args.calibrate_with
    return CALIBRATE_WITH_DEFAULT["target_epsilon" if args.target_epsilon is not None else "target_tpr"]


def _check_delta(args: argparse.Namespace, q: float) -> float:
    """Training's δ rule: δ <= 1/N with --dataset-size, else δ <= q (above 1/N for any N with q*N >= 1)."""
    return rules.check_delta(args.delta, dataset_size=args.dataset_size or None, sampling_rate=q, name="--delta")


def epoch_steps(args: argparse.Namespace, q: float) -> int:
    """Steps in one epoch, by jaxdp train's rule (:func:`jaxdp.sampling.steps_per_epoch`): round(N / B)
    with --batch-size and --dataset-size, else round(1 / q), which is N / B for q = B / N."""
    if args.dataset_size and args.batch_size:
        return steps_per_epoch(args.dataset_size, args.batch_size)
    return steps_per_epoch(1.0, q)


def _whole_epochs(epochs: float, per_epoch: int) -> int:
    """--epochs as jaxdp train's ``epochs`` (an int >= 1: a run is whole epochs)."""
    if not (math.isfinite(epochs) and epochs >= 1 and float(epochs).is_integer()):
        partial = max(1, round(epochs * per_epoch)) if math.isfinite(epochs) and epochs > 0 else None
        hint = f" or --steps {partial} for {epochs:g} epochs of {per_epoch} steps" if partial else ""
        raise ValueError(
            f"--epochs={epochs:g} is not a whole number of epochs >= 1; jaxdp train runs whole epochs "
            f"(epochs is an int >= 1) of {per_epoch} steps: use --epochs {max(1, math.ceil(epochs)) if partial else 1}"
            f"{hint}."
        )
    return int(epochs)


def _resolve(args: argparse.Namespace) -> tuple[float, int]:
    if args.sampling_rate is not None:
        q = args.sampling_rate
    else:
        if not args.dataset_size:
            raise ValueError("--batch-size needs --dataset-size (q = batch_size / dataset_size).")
        if not 0 < args.batch_size <= args.dataset_size:
            raise ValueError(f"--batch-size={args.batch_size} must lie in 1..{args.dataset_size} (the dataset size).")
        q = args.batch_size / args.dataset_size
    q = rules.check_sampling_rate(q, "--sampling-rate")
    if args.steps is not None:
        steps = args.steps
    else:  # exactly the steps of `jaxdp train epochs=K`: K x round(N / B)
        steps = _whole_epochs(args.epochs, epoch_steps(args, q)) * epoch_steps(args, q)
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1 (from --steps or --epochs).")
    return q, steps


def run(args: argparse.Namespace) -> str:
    """Compute the report for parsed ``jaxdp account`` arguments; return the text to print."""
    q, steps = _resolve(args)
    delta = _check_delta(args, q)
    for name in _ACCOUNTING:  # now load the accountants (and JAX); a name already set (a test's stub) stays
        if name not in globals():
            __getattr__(name)
    if args.steps is None:
        per_epoch = epoch_steps(args, q)
        counted = (
            f"{steps // per_epoch} epochs x {per_epoch} steps"
            f" (round({'N/B' if args.dataset_size and args.batch_size else '1/q'}), as jaxdp train counts an epoch)"
        )
    else:
        per_epoch, counted = None, None
    names = [n.strip() for n in args.accountants.split(",") if n.strip()]
    calibration = None
    calibrated_with = None if args.noise_multiplier is not None else calibration_accountant(args)
    t0 = time.perf_counter()
    if args.noise_multiplier is not None:
        sigma = rules.check_noise_multiplier(args.noise_multiplier, "--noise-multiplier", allow_zero=False)
    elif args.target_epsilon is not None:
        sigma = calibrate_noise_multiplier(args.target_epsilon, delta, q, steps, accountant=calibrated_with)
        calibration = f"epsilon <= {args.target_epsilon} with {calibrated_with}"
    else:
        sigma = calibrate_noise_multiplier_for_attack_risk(
            args.target_tpr, args.fpr, q, steps, accountant=calibrated_with
        )
        calibration = f"TPR <= {args.target_tpr} at FPR {args.fpr} with {calibrated_with}"
    calibration_s = time.perf_counter() - t0
    rows = []
    for name in names:
        acc = make_accountant(name, sampling_rate=q, noise_multiplier=sigma).compose(steps)
        r = attack_risk(acc, delta=delta, fprs=FPRS)
        rows.append(
            {
                "accountant": name,
                "upper_bound": acc.is_upper_bound,
                "epsilon": r.epsilon,
                "advantage": r.advantage,
                **{f"tpr_at_fpr_{f}": r.tpr_at_fpr[f] for f in FPRS},
            }
        )
    mu = gdp_mu(q, sigma, steps)
    result = {
        "sampling_rate": q,
        "noise_multiplier": sigma,
        "steps": steps,
        "epochs": steps // per_epoch if per_epoch else None,
        "steps_per_epoch": per_epoch,
        "delta": delta,
        "mu_clt": mu,
        "calibrated_to": calibration,
        "calibrated_with": calibrated_with,
        "calibration_seconds": calibration_s if calibration else None,
        "accountants": rows,
    }
    if args.json:
        return json.dumps(result)
    lines = [
        f"q={q:.6g}  steps={steps}"
        + (f" = {counted}" if counted else "")
        + f"  delta={delta:g}  sigma={sigma:.4f}"
        + (f"  (calibrated to {calibration} in {calibration_s:.2f} s)" if calibration else "")
        + f"  mu-GDP (CLT)={mu:.4f}",
        "",
        "| accountant | epsilon | max advantage | TPR @ FPR=1% | TPR @ FPR=0.1% |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        note = "" if r["upper_bound"] else " (CLT approx.)"
        lines.append(
            f"| {r['accountant']}{note} | {r['epsilon']:.4f} | {r['advantage']:.4f} "
            f"| {r['tpr_at_fpr_0.01']:.4f} | {r['tpr_at_fpr_0.001']:.5f} |"
        )
    return "\n".join(lines)
