"""DP-SGLD on a medical binary task (the paper used the Pediatric Pneumonia chest X-ray set).

Command:   python -m experiments.langevin.run --config experiments/langevin/configs/pneumonia.py \
               --baseline-config experiments/langevin/configs/pneumonia.py
Data:      not shipped and not in TFDS: export it yourself as data/pediatric_pneumonia_64.npz with
           x_train (n, 64, 64, 1) uint8, y_train (n,) in {0: normal, 1: pneumonia}, x_test, y_test
           (the format jaxdp.data documents for `npz:` datasets), or override dataset=npz:/your/file.npz.
           Not run by us (no data here): no measured result yet.
Privacy:   Poisson sampling, batch 256, 20 epochs, sigma calibrated to the target epsilon, delta = 1e-5.
"""

import os

from jaxdp.config import check_variant, config_module

_digits = config_module(os.path.join(os.path.dirname(__file__), "digits.py"))

import ml_collections  # noqa: E402


def get_config(arg=None):
    check_variant(__file__, arg, ("smoke",))
    config = _digits.get_config(arg)
    config.dataset = "npz:data/pediatric_pneumonia_64.npz"
    config.workdir = "runs/langevin_pneumonia" + ("_smoke" if arg == "smoke" else "")
    config.model.name = "cnn"
    config.model.kwargs = ml_collections.ConfigDict({"features": (16, 32, 32)})
    config.batch_size = 256
    config.epochs = 2 if arg == "smoke" else 20
    config.langevin.temperature = 1.0
    return config
