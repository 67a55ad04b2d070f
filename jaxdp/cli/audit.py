"""``jaxdp audit``: run :func:`jaxdp.audit.audit_config` and print the bounds, the f-DP test and the verdict."""

from __future__ import annotations

import json

from jaxdp.cli.output import fail
from jaxdp.config import ConfigError


def run(config, args) -> int:
    """``jaxdp audit``: run the canary audit of a config and print the verdict; exit 1 on a violation."""
    from jaxdp.audit import audit_config

    try:
        result, plan, n_train = audit_config(
            config,
            num_canaries=args.canaries,
            confidence=args.confidence,
            sabotage=args.sabotage,
            tests=("epsilon", "fdp") if args.test == "both" else (args.test,),
        )
    except ConfigError as e:
        return fail(str(e))
    b = result.bound
    pct = f"{100 * b.confidence:g}%"
    print(
        f"jaxdp audit: {config.dataset} N={n_train} + {b.num_canaries} gradient canaries ({result.num_included} "
        f"included, each with probability 1/2) | q={plan.sampling_rate:.4f} steps={plan.num_steps} "
        f"sigma={plan.noise_multiplier:.4f} C={plan.l2_clip_norm} delta={b.delta:g}"
        + (f" | SABOTAGED: {result.sabotage}" if result.sabotage else "")
    )
    print(f"  accountant epsilon ({result.accountant}, upper bound): {result.claimed_epsilon:.3f}")
    print(
        f"  empirical epsilon lower bound ({pct} confidence): {b.epsilon:.3f}"
        f"  (one-run audit: {b.num_correct} of {b.num_guesses} guesses correct)"
        + ("" if result.epsilon_passed else "  -> VIOLATION")
    )
    f = result.fdp
    if f is not None:
        ratio = "none seen" if f.noise_ratio is None else f"{f.noise_ratio:.3g}"
        print(
            f"  f-DP test against the claimed mechanism's PLD curve: p-value {f.p_value:.3g} "
            f"({f.num_correct} of {f.num_guesses} guesses correct)" + ("" if f.passed else "  -> VIOLATION")
        )
        print(
            f"    certified noise ratio sigma'/sigma: {ratio}  (< 1: leaks at least as much as the claimed mechanism "
            "with that fraction of its noise)"
        )
    failed = [name for name, ok in (("epsilon", result.epsilon_passed), ("fdp", result.fdp_passed)) if not ok]
    failed = [name for name in failed if name in result.tests]
    if result.passed:
        print(
            f"  passed: no test certifies a violation (took {result.wall_time_s:.1f} s). "
            "A pass does not prove privacy; see README 'Auditing'."
        )
    else:
        print(
            f"  FAILED ({' and '.join(failed)}): the mechanism leaks more than claimed (at {pct} confidence); "
            f"took {result.wall_time_s:.1f} s."
        )
    print(json.dumps({"dataset": config.dataset, **result.to_dict()}), flush=True)
    return 0 if result.passed else 1
