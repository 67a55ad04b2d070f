"""``jaxdp bench``: throughput per epsilon, memory, accuracy and device scale-out, measured side by side.

Nothing else in the library imports this package (``jaxdp bench`` on the command
line and the scripts in ``benchmarks/`` do). Its modules:

* :mod:`jaxdp.bench.timing` — the one timer: interleaved blocks, median
  (:func:`time_interleaved`, :func:`time_per_call`);
* :mod:`jaxdp.bench.models` — the one model table (:data:`MODELS`): model, data, budget;
* :mod:`jaxdp.bench.measure` — one (model, batch): private vs non-private step time,
  memory, the references, accuracy per σ; the device scale-out;
* :mod:`jaxdp.bench.report` — the markdown, CSV, JSON and PNG outputs;
* :mod:`jaxdp.bench.suite` — :func:`run_bench`: option checks, σ per target ε, the grid;
* :mod:`jaxdp.bench.refs` — the reference DP-SGD steps (jax_privacy, optax, Opacus;
  ``pip install 'jaxdp[bench]'``) and :mod:`jaxdp.bench.torch_ref`, the PyTorch twins.

``python -m jaxdp.bench {config|scale} JOB OUT`` is the per-configuration subprocess.
"""

from jaxdp.bench.measure import measure_config, references
from jaxdp.bench.models import DEFAULT_MODELS, MODELS, ModelSpec
from jaxdp.bench.report import flat_rows, render_markdown
from jaxdp.bench.suite import ACCELERATOR_SUITE, DEFAULT_EPSILONS, BenchError, calibrate, run_bench
from jaxdp.bench.timing import Timing, time_interleaved, time_per_call

__all__ = [
    "ACCELERATOR_SUITE",
    "DEFAULT_EPSILONS",
    "DEFAULT_MODELS",
    "MODELS",
    "BenchError",
    "ModelSpec",
    "Timing",
    "calibrate",
    "flat_rows",
    "measure_config",
    "references",
    "render_markdown",
    "run_bench",
    "time_interleaved",
    "time_per_call",
]
