"""BAM on CIFAR-10 with WRN-16-4: the library's De et al. recipe (configs/cifar10_wrn16_4.py) plus BAM.

epsilon = 8, delta = 1e-5, C = 1, batch 4096 (chunks of 512), K = 16 augmentations, EMA, as in
configs/cifar10_wrn16_4.py. BAM's r = 0.1 and alpha = 0.31 (lambda = alpha * r = 0.031) are the values
in the authors' WRN config (configs/cifar10_dp_wrn.yaml of their public RePrAAIMI code, which trains a
WRN-16-2 with batch 512 x 8 accumulation and K = 8); DP-SAT's rho = 0.03 is from DP-SAT's CIFAR-10 example.
Command:   python -m experiments.bam.run --config experiments/bam/configs/cifar10_wrn16_4.py \\
               --epsilons 8 --set data_dir=/path/to/tensorflow_datasets
           (smoke: experiments/bam/configs/cifar10_wrn16_4.py:smoke, on TFDS mock data in the tests)
Data:      TFDS cifar10 prepared in array_record form under data_dir.
Hardware / runtime / result: NOT RUN — no CIFAR-10 and no accelerator on the project's machines.
"""

import os

from jaxdp.config import check_variant, config_module

_here = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(os.path.dirname(os.path.dirname(_here)))
_base = config_module(os.path.join(_root, "configs", "cifar10_wrn16_4.py"))
_bam = config_module(os.path.join(_here, "digits.py"))


def get_config(arg=None):
    check_variant(__file__, arg, ("smoke",))
    config = _base.get_config(arg)
    config.workdir = "runs/bam_cifar10_wrn16_4" + ("_smoke" if arg == "smoke" else "")
    with config.unlocked():
        config.bam = _bam.get_config().bam
    config.bam.radius = 0.1
    config.bam.lam = 0.031
    config.bam.sat_radius = 0.03
    return config
