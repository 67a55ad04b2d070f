"""BAM vs DP-SAT vs DP-SGD on Fashion-MNIST with a CNN, C below the per-example gradient norms.

Command:   python -m experiments.bam.run --table fashion_mnist data_dir=/work/data/tfds    (3 seeds x eps 3)
           python -m experiments.bam.run --tune fashion_mnist data_dir=/work/data/tfds     (the search)
Data:      TFDS fashion_mnist prepared with `jaxdp data prepare` (README, "Data and batches"). The runs train on
           a stratified subset of 10,000 of the 60,000 training images (so that 3 seeds x 3 methods fit this
           2-core machine); the search holds out 2,000 of those as its validation split; the 10,000 test
           images only report.
Regime:    C = 0.1, below the median per-example gradient norm (measured by the probe: README), CNN (16, 32),
           B = 256, 15 epochs (585 steps).
Privacy:   Poisson q = 256/10000, sigma calibrated to the target epsilon (RDP), delta = 1e-5.
"""

import os

import ml_collections

from jaxdp.config import check_variant, config_module

_digits = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
VARIANTS = ("smoke",)


def get_config(arg=None):
    check_variant(__file__, arg, VARIANTS)
    smoke = arg == "smoke"
    config = _digits.get_config(arg)
    config.dataset = "fashion_mnist"
    config.data_dir = ""  # e.g. data_dir=/work/data/tfds
    config.workdir = "runs/bam_fashion_mnist" + ("_smoke" if smoke else "")
    config.model.kwargs = ml_collections.ConfigDict({"features": (16, 32)})
    config.batch_size = 256
    config.epochs = 1 if smoke else 15
    config.checkpoint.every_epochs = 5
    config.optimizer.learning_rate = 0.01  # chosen on the validation split (--tune): README
    # r and rho: chosen by validation accuracy at epsilon = 3 (--tune fashion_mnist, 1 seed; README, "The search").
    config.bam.radius = 0.1  # r (the top of the authors' range (0, 0.1]; also the best on validation here)
    config.bam.lam = 0.1  # lambda = r (alpha = 1)
    config.bam.sat_radius = 0.1  # rho
    config.bam.train_size = 2000 if smoke else 10000
    config.bam.epsilons = (3.0,)
    config.bam.seeds = (0,) if smoke else (0, 1, 2)
    config.bam.tune_validation_size = 2000
    config.bam.tune_learning_rates = (0.003, 0.01, 0.03)
    config.bam.tune_radii = (0.01, 0.03, 0.1)
    config.bam.tune_sat_radii = (0.03, 0.1)
    config.bam.tune_seeds = (100,)
    return config
