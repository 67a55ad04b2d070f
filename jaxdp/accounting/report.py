"""``jaxdp account``: ε per accountant and attack risk of a (planned) run, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import math
import time

from jaxdp.accounting._base import check_delta, make_accountant
from jaxdp.accounting._calibrate import calibrate_noise_multiplier
from jaxdp.accounting._gdp import gdp_mu
from jaxdp.accounting._risk import attack_risk, calibrate_noise_multiplier_for_attack_risk
from jaxdp.sampling import steps_per_epoch

FPRS = (0.01, 0.001)


def _resolve(args: argparse.Namespace) -> tuple[float, int]:
    if args.sampling_rate is not None:
        q = args.sampling_rate
    else:
        if not args.dataset_size:
            raise ValueError("--batch-size needs --dataset-size (q = batch_size / dataset_size).")
        if not 0 < args.batch_size <= args.dataset_size:
            raise ValueError(f"--batch-size={args.batch_size} must lie in 1..{args.dataset_size} (the dataset size).")
        q = args.batch_size / args.dataset_size
    if not 0 < q <= 1:
        raise ValueError(f"--sampling-rate={q!r} must lie in (0, 1].")
    if args.steps is not None:
        steps = args.steps
    elif args.dataset_size and args.batch_size:
        steps = round(args.epochs * steps_per_epoch(args.dataset_size, args.batch_size))
    else:
        steps = round(args.epochs * steps_per_epoch(1.0, q))
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1 (from --steps or --epochs).")
    return q, steps


def run(args: argparse.Namespace) -> str:
    """Compute the report for parsed ``jaxdp account`` arguments; return the text to print."""
    q, steps = _resolve(args)
    delta = check_delta(args.delta)
    names = [n.strip() for n in args.accountants.split(",") if n.strip()]
    calibration = None
    t0 = time.perf_counter()
    if args.noise_multiplier is not None:
        sigma = args.noise_multiplier
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"--noise-multiplier={sigma!r} must be a finite number > 0.")
    elif args.target_epsilon is not None:
        sigma = calibrate_noise_multiplier(args.target_epsilon, delta, q, steps, accountant=args.calibrate_with)
        calibration = f"epsilon <= {args.target_epsilon} ({args.calibrate_with})"
    else:
        sigma = calibrate_noise_multiplier_for_attack_risk(
            args.target_tpr,
            args.fpr,
            q,
            steps,
            accountant=args.calibrate_with if args.calibrate_with != "rdp" else "pld",
        )
        calibration = f"TPR <= {args.target_tpr} at FPR {args.fpr}"
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
        "delta": delta,
        "mu_clt": mu,
        "calibrated_to": calibration,
        "calibration_seconds": calibration_s if calibration else None,
        "accountants": rows,
    }
    if args.json:
        return json.dumps(result)
    lines = [
        f"q={q:.6g}  steps={steps}  delta={delta:g}  sigma={sigma:.4f}"
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
