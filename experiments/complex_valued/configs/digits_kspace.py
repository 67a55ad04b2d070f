"""Complex-valued DP-SGD on k-space of the built-in digits, and its two real-valued baselines.

Command:   jaxdp train --config experiments/complex_valued/configs/digits_kspace.py:complex
           (variants: complex | magnitude | reim, each also as e.g. complex,smoke)
           The table: .venv/bin/python -m experiments.complex_valued.run
Hardware:  2 CPU cores. Runtime and results: experiments/complex_valued/README.md (measured).
Privacy:   the digits recipe: Poisson q = 512/1437, 120 steps, sigma calibrated to privacy.target_epsilon
           (RDP), delta = 1e-5. Complex gradients are clipped over Re and Im together and get
           N(0, sigma^2 C^2) on each part: the same mechanism as a real one in twice the dimensions.
"""

import os
import sys

import ml_collections

_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if _root not in sys.path:
    sys.path.insert(0, _root)
import experiments.complex_valued.kspace  # noqa: E402,F401  (registers the k-space datasets)
from jaxdp.config import config_module  # noqa: E402

_base = config_module(os.path.join(_root, "configs", "digits.py"))

VARIANTS = {
    # name: (dataset, model, model kwargs)
    "complex": ("digits_kspace", "complex_cnn", {"features": (16, 32), "activation": "cardioid"}),
    "magnitude": ("digits", "cnn", {"features": (16, 32)}),
    "reim": ("digits_kspace_reim", "cnn", {"features": (16, 32)}),
}


def get_config(arg=None):
    parts = set((arg or "complex").split(","))
    smoke = "smoke" in parts
    names = parts - {"smoke"} or {"complex"}
    if len(names) != 1 or not names <= set(VARIANTS):
        raise ValueError(f"variant {arg!r}: use one of {sorted(VARIANTS)}, optionally with ',smoke'.")
    (variant,) = names
    dataset, model, kwargs = VARIANTS[variant]
    config = _base.get_config("smoke" if smoke else None)
    config.dataset = dataset
    config.model.name = model
    config.model.kwargs = ml_collections.ConfigDict(kwargs)
    config.workdir = f"runs/complex_{variant}" + ("_smoke" if smoke else "")
    return config
