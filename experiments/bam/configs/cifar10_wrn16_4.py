"""BAM on CIFAR-10 with WRN-16-4: the library's De et al. recipe (configs/cifar10_wrn16_4.py) in the BAM authors'
final setting.

The authors' final configuration, as read from their public code: WRN-16-4 (GroupNorm, weight standardisation),
epsilon = 8, delta = 1e-5, C = 1, batch 256 x 16 accumulation steps = 4,096, K = 6 augmentations, NAdam 2e-3 with
a parameter EMA and reduce-on-plateau, and BAM with alpha = 1 (lambda = r) and r drawn in (0, 0.1] by their
search. Here: the same, except that reduce-on-plateau is left out (jaxdp has no loss-driven schedule) and r is the
top of that range (0.1; no search could run here). DP-SAT's rho = 0.03 is from DP-SAT's CIFAR-10 example.
Command:   python -m experiments.bam.run ... is digits / Fashion-MNIST only; run this recipe with
           jaxdp train-like code: train(load_config(".../cifar10_wrn16_4.py"), **method_hooks(config.bam))
           (smoke: experiments/bam/configs/cifar10_wrn16_4.py:smoke, on TFDS mock data in the tests)
Data:      TFDS cifar10 prepared in array_record form under data_dir.
Hardware / runtime / result: NOT RUN: no CIFAR-10 and no accelerator on the project's machines.
"""

import os

import ml_collections

from jaxdp.config import check_variant, config_module

_here = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(os.path.dirname(os.path.dirname(_here)))
_base = config_module(os.path.join(_root, "configs", "cifar10_wrn16_4.py"))


def get_config(arg=None):
    check_variant(__file__, arg, ("smoke",))
    smoke = arg == "smoke"
    config = _base.get_config(arg)
    config.workdir = "runs/bam_cifar10_wrn16_4" + ("_smoke" if smoke else "")
    config.batch_size = 64 if smoke else 4096
    config.physical_batch_size = 64 if smoke else 256  # 256 x 16 accumulation steps, as the authors
    config.augment.multiplicity = 2 if smoke else 6
    config.optimizer.name = "nadam"
    config.optimizer.learning_rate = 2e-3
    with config.unlocked():
        config.bam = ml_collections.ConfigDict()
        config.bam.method = "bam"  # dpsgd | dpsat | bam
        config.bam.radius = 0.1  # r: the top of the authors' search range (0, 0.1]
        config.bam.lam = 0.1  # lambda = alpha * r with alpha = 1, as the authors' final code
        config.bam.sat_radius = 0.03
    return config
