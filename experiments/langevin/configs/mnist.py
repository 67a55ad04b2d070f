"""DP-SGLD on MNIST (TFDS) with the small CNN: the paper's main setting.

Command:   python -m experiments.langevin.run --config experiments/langevin/configs/mnist.py \
               --baseline-config experiments/langevin/configs/mnist.py   (set data_dir below or override)
Data:      TFDS mnist prepared as array_record under data_dir (see jaxdp/data); not available on the
           project's CI machine, so this recipe has NOT been run by us yet (no measured result).
Privacy:   Poisson q = 256/60000, 15 epochs (3,510 steps), sigma calibrated to the target epsilon, delta = 1e-5.
"""

import os

from jaxdp.config import check_variant, config_module

_digits = config_module(os.path.join(os.path.dirname(__file__), "digits.py"))

import ml_collections  # noqa: E402


def get_config(arg=None):
    check_variant(__file__, arg, ("smoke",))
    config = _digits.get_config(arg)
    config.dataset = "mnist"
    config.data_dir = ""  # e.g. data_dir=/data/tensorflow_datasets
    config.workdir = "runs/langevin_mnist" + ("_smoke" if arg == "smoke" else "")
    config.model.name = "cnn"
    config.model.kwargs = ml_collections.ConfigDict({"features": (16, 32)})
    config.batch_size = 256
    config.epochs = 2 if arg == "smoke" else 15
    config.langevin.temperature = 1.0  # lr = 2 B^2 tau / (N sigma^2 C^2) ~ 2 for sigma ~ 1
    return config
