"""DP-SGLD vs DP-SGD on the built-in digits, in a regime where DP-SGD is over-confident.

Command:   python -m experiments.langevin.run --table digits          (smoke: configs/digits.py:smoke)
Hardware:  2 CPU cores. Runtime: see experiments/langevin/README.md (measured).
Data:      digits' 1,437 training images minus a stratified held-out split of 287 (kept for tuning and for
           fitting temperature scaling; never trained on), so 1,150 train; the 360 test images only report.
Regime:    a (256, 256) MLP trained long (200 epochs of B = 128, plain SGD): the final iterate fits the
           training set and its test confidence runs ahead of its accuracy (measured: README).
Privacy:   Poisson q = 128/1150, 1,800 steps, sigma calibrated to the target epsilon (RDP), delta = 1e-5;
           every step (burn-in included) is accounted; posterior samples are post-processing.
"""

import os

import ml_collections

from jaxdp.config import check_variant, config_module

_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_base = config_module(os.path.join(_root, "configs", "digits.py"))
VARIANTS = ("smoke",)


def get_config(arg=None):
    check_variant(__file__, arg, VARIANTS)
    smoke = arg == "smoke"
    config = _base.get_config("smoke" if smoke else None)
    config.workdir = "runs/langevin_digits" + ("_smoke" if smoke else "")
    config.model.kwargs = ml_collections.ConfigDict({"hidden": (64,) if smoke else (256, 256)})
    config.batch_size = 128
    config.epochs = 4 if smoke else 200
    config.optimizer.name = "sgd"  # SGLD is plain SGD: no momentum, no Adam
    config.optimizer.momentum = 0.0
    config.optimizer.learning_rate = 0.1  # eta_0 (burn-in, and DP-SGD throughout): chosen on the held-out split
    config.optimizer.weight_decay = 1e-4  # the Gaussian prior N(0, tau / (N * weight_decay))
    config.checkpoint.every_epochs = 50
    with config.unlocked():
        config.langevin = ml_collections.ConfigDict()
        # Run A, DP-SGD: the library's digits optimizer (Adam), trained as long; None = the SGD of run B.
        config.langevin.baseline_optimizer = "adam"
        config.langevin.baseline_learning_rate = 0.005  # chosen on the held-out split (README, "Tuning")
        config.langevin.baseline_momentum = 0.0
        config.langevin.base_dataset = "digits"
        config.langevin.holdout = 287  # held out of the training data (20%): tuning + temperature scaling
        config.langevin.train_size = 0  # 0 = the rest of the training data
        config.langevin.burn_in_epochs = 2 if smoke else 100  # >= the measured loss plateau (README)
        config.langevin.sample_lr_scale = 0.25  # eta_s / eta_0 in the sampling phase: eta_s * lambda_max < 1
        config.langevin.samples_per_epoch = 1  # thinning: one sample per epoch (every ~9 steps)
        config.langevin.curvature_examples = 1150  # training examples for the Hessian's lambda_max
        config.langevin.epsilons = (3.0, 8.0)
        config.langevin.seeds = (0, 1) if smoke else (0, 1, 2, 3, 4)
    return config
