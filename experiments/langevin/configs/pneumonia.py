"""DP-SGLD vs DP-SGD on a medical binary task (the paper used the Pediatric Pneumonia chest X-rays). NOT run here.

Command:   python -m experiments.langevin.run --config experiments/langevin/configs/pneumonia.py
Data:      not shipped and not in TFDS: export it yourself as data/pediatric_pneumonia_64.npz with
           x_train (n, 64, 64, 1) uint8, y_train (n,) in {0: normal, 1: pneumonia}, x_test, y_test (the format
           jaxdp.data documents for `npz:` datasets), or override langevin.base_dataset=npz:/your/file.npz.
           A stratified 10% of the training images is held out for tuning and temperature scaling.
Protocol:  the Fashion-MNIST one (configs/fashion_mnist.py); choose eta_0 and the burn-in on the held-out split
           with `--tune` before reading the test numbers. No measured result: there is no data on this machine.
"""

import os

import ml_collections

from jaxdp.config import check_variant, config_module

_fmnist = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist.py"))
VARIANTS = ("smoke",)


def get_config(arg=None):
    check_variant(__file__, arg, VARIANTS)
    config = _fmnist.get_config(arg)
    config.workdir = "runs/langevin_pneumonia" + ("_smoke" if arg == "smoke" else "")
    config.model.kwargs = ml_collections.ConfigDict({"features": (16, 32, 32)})
    config.langevin.base_dataset = "npz:data/pediatric_pneumonia_64.npz"
    config.langevin.holdout = 500
    config.langevin.train_size = 0
    return config
