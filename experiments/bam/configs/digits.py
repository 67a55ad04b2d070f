"""BAM vs DP-SAT vs DP-SGD on the built-in digits: the base recipe of configs/digits.py.

Command:   python -m experiments.bam.run                    (the README table: 3 methods x eps {1,3,8} x 3 seeds)
           one run: python -m experiments.bam.run --methods bam --epsilons 3 --seeds 0
Hardware:  2 CPU cores. Runtime and results: experiments/bam/README.md (measured).
Privacy:   as configs/digits.py (Poisson q = 512/1437, 120 steps, sigma calibrated to the target epsilon,
           RDP, delta = 1e-5). BAM's per-example gradient uses only that example, DP-SAT's ascent only the
           previous privatised gradient: the plan and the accounting are those of DP-SGD.
"""

import os

from jaxdp.config import check_variant, config_module

_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_base = config_module(os.path.join(_root, "configs", "digits.py"))

import ml_collections  # noqa: E402


def get_config(arg=None):
    check_variant(__file__, arg, ("smoke",))
    config = _base.get_config("smoke" if arg == "smoke" else None)
    config.workdir = "runs/bam_digits" + ("_smoke" if arg == "smoke" else "")
    with config.unlocked():
        config.bam = ml_collections.ConfigDict()
        config.bam.method = "bam"  # dpsgd | dpsat | bam
        # Chosen by a sweep at epsilon = 3 on seeds 10-12 (not the table's seeds): see the README.
        config.bam.radius = 0.1  # BAM's finite-difference radius r
        config.bam.lam = 0.1  # BAM's lambda (alpha = lam / r = 1: per-example SAM)
        config.bam.sat_radius = 0.1  # DP-SAT's ascent radius rho
    return config
