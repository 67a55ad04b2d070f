"""One process of a 2-process loopback run: joins ``jax.distributed``, takes process 0's secret through
:func:`jaxdp.train.privacy_seed` (the path ``jaxdp train`` uses) and prints the secret and its key's data
as JSON. Process 0 uses a fixed secret above 2**64; process 1 passes a different one that must be replaced.

Usage: python tests/multihost_key_check.py PORT PROCESS_ID SECRET
"""

import json
import sys

import jax

from jaxdp import distributed, keys
from jaxdp.train import privacy_seed


def main(port: str, process_id: str, secret: str) -> None:
    distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
    got = privacy_seed(int(secret))
    data = jax.random.key_data(keys.key_from_secret(got)).tolist()
    print(json.dumps({"secret": str(got), "key_data": data, "processes": jax.process_count()}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
