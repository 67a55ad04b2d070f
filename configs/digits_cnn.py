"""The digits recipe with the small CNN instead of the MLP (imports the base config).

Command:   jaxdp train --config configs/digits_cnn.py        (smoke: configs/digits_cnn.py:smoke)
Privacy:   identical to configs/digits.py (same sampler, C, sigma, steps): epsilon ~= 3 at delta = 1e-5.
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location("_digits_base", os.path.join(os.path.dirname(__file__), "digits.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
    config = _base.get_config(arg)
    config.model.name = "cnn"
    config.model.kwargs = ml_collections.ConfigDict({"features": (16, 32)})
    config.workdir = "runs/digits_cnn" + ("_smoke" if arg == "smoke" else "")
    return config
