"""DP-SGLD on the built-in digits: the base recipe of configs/digits.py with plain SGD.

Command:   python -m experiments.langevin.run            (the whole table; see README)
           jaxdp-style single run: python -m experiments.langevin.run --epsilons 3 --seeds 0
Hardware:  2 CPU cores. Runtime: see experiments/langevin/README.md (measured).
Privacy:   Poisson q = 512/1437, 120 steps, sigma calibrated to the target epsilon (RDP), delta = 1e-5;
           every step (burn-in included) is accounted; samples are post-processing.
"""

import os

from jaxdp.config import check_variant, config_module

_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_base = config_module(os.path.join(_root, "configs", "digits.py"))

import ml_collections  # noqa: E402


def get_config(arg=None):
    check_variant(__file__, arg, ("smoke",))
    config = _base.get_config("smoke" if arg == "smoke" else None)
    config.workdir = "runs/langevin_digits" + ("_smoke" if arg == "smoke" else "")
    config.optimizer.name = "sgd"  # SGLD is plain SGD: no momentum, no Adam
    config.optimizer.momentum = 0.0
    config.optimizer.weight_decay = 1e-3  # Gaussian prior N(0, tau / (N * weight_decay))
    with config.unlocked():
        config.langevin = ml_collections.ConfigDict()
        config.langevin.temperature = 0.4  # tau; the learning rate is derived from it ("lr" mode)
        config.langevin.mode = "lr"  # "lr": eta from tau; "noise": keep optimizer.learning_rate, top up sigma
        config.langevin.burn_in_fraction = 0.5  # first half of the steps are burn-in (still accounted)
        config.langevin.thin = 1
    return config
