"""The per-configuration subprocess of ``jaxdp bench``: ``python -m jaxdp.bench {config|scale} JOB OUT``."""

import sys

from jaxdp.bench.measure import worker_main

sys.exit(worker_main(sys.argv[1:]))
