"""DP-SGD on MNIST with the classic DP MNIST CNN (tanh, 26,010 parameters; Papernot et al. 2020).

Command:   jaxdp train --config configs/mnist_cnn.py data_dir=/path/to/tensorflow_datasets
           (smoke: configs/mnist_cnn.py:smoke)
Data:      TFDS mnist prepared in array_record form under data_dir (see README, "Data and batches").
Hardware / runtime / result: NOT RUN YET — MNIST is not available on the project's machines.
           Expected from the literature for this model: ~95-97% test accuracy at epsilon ~3.
Privacy:   Poisson q = 256/60000, 40 epochs, sigma calibrated to epsilon = 3 at delta = 1e-5 (RDP).
"""

import os

import ml_collections

from jaxdp.config import config_module

_base = config_module(os.path.join(os.path.dirname(__file__), "digits.py"))


def get_config(arg=None):
    config = _base.get_config(arg)
    config.dataset = "mnist"
    config.workdir = "runs/mnist_cnn" + ("_smoke" if arg == "smoke" else "")
    config.model.name = "dp_mnist_cnn"
    config.model.kwargs = ml_collections.ConfigDict()
    config.batch_size = 256
    config.epochs = 2 if arg == "smoke" else 40
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 4.0
    config.optimizer.momentum = 0.0
    return config
