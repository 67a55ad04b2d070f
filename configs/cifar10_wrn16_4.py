"""CIFAR-10 with WRN-16-4 (GroupNorm + weight standardisation), augmentation multiplicity and parameter EMA.

The De et al. 2022 recipe ("Unlocking high-accuracy differentially private image classification
through scale"): epsilon = 8, delta = 1e-5, batch 4096, C = 1, sigma ~ 3 (calibrated here), K = 16
augmentations, EMA 0.999, plain SGD.
Command:   jaxdp train --config configs/cifar10_wrn16_4.py data_dir=/path/to/tensorflow_datasets
           (smoke: configs/cifar10_wrn16_4.py:smoke); physical_batch_size / microbatch_size bound memory.
Data:      TFDS cifar10 prepared in array_record form under data_dir.
Hardware / runtime / result: NOT RUN YET — no CIFAR-10 and no accelerator on the project's machines.
           The paper reports ~79.5% test accuracy at epsilon = 8 for WRN-16-4.
"""

import os

import ml_collections

from jaxdp.config import check_variant, config_module

_base = config_module(os.path.join(os.path.dirname(__file__), "digits.py"))
VARIANTS = _base.VARIANTS  # the base's: smoke


def get_config(arg=None):
    check_variant(__file__, arg, VARIANTS)
    config = _base.get_config(arg)
    smoke = arg == "smoke"
    config.dataset = "cifar10"
    config.workdir = "runs/cifar10_wrn16_4" + ("_smoke" if smoke else "")
    config.model.name = "wrn"
    config.model.kwargs = ml_collections.ConfigDict({"depth": 16, "width": 4, "groups": 16})
    config.batch_size = 64 if smoke else 4096
    config.physical_batch_size = 64 if smoke else 512  # chunks of the logical batch (gradient accumulation)
    config.epochs = 1 if smoke else 140  # ~875 steps at q = 4096/50000 (De et al. train ~875 steps for eps 8)
    config.privacy.target_epsilon = 8.0
    config.augment.multiplicity = 2 if smoke else 16
    config.augment.crop_pad = 4
    config.augment.flip = True
    config.ema_decay = 0.999
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 4.0
    config.optimizer.momentum = 0.0
    config.checkpoint.every_epochs = 5
    return config
