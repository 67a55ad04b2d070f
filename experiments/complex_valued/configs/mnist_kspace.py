"""Complex-valued DP-SGD on k-space of MNIST (TFDS): the larger image set.

Command:   jaxdp train --config experiments/complex_valued/configs/mnist_kspace.py:complex data_dir=/path/to/tfds
           (variants: complex | reim; the magnitude baseline is the plain mnist image)
Data:      TFDS mnist prepared as array_record under data_dir; not available on the project's machines,
           so this recipe has NOT been run by us (no measured result).
Privacy:   Poisson q = 256/60000, 15 epochs, sigma calibrated to privacy.target_epsilon (RDP), delta = 1e-5.
"""

import os

from jaxdp.config import config_module

_digits = config_module(os.path.join(os.path.dirname(__file__), "digits_kspace.py"))


def get_config(arg=None):
    config = _digits.get_config(arg)
    variant = (set((arg or "complex").split(",")) - {"smoke"}).pop()
    config.dataset = {"complex": "mnist_kspace", "magnitude": "mnist", "reim": "mnist_kspace_reim"}[variant]
    config.workdir = config.workdir.replace("runs/complex_", "runs/complex_mnist_")
    config.batch_size = 256
    config.epochs = 2 if "smoke" in (arg or "") else 15
    return config
