"""``jaxdp data prepare``: arguments to :func:`jaxdp.data.prepare.prepare`."""

from __future__ import annotations

import time

from jaxdp.cli.output import fail


def run(args) -> int:
    """Prepare ``args.name`` in ``args.data_dir``; print what was written and the command that trains on it."""
    from jaxdp.data import load
    from jaxdp.data.prepare import PrepareError, prepare

    t0 = time.perf_counter()
    try:
        path = prepare(args.name, args.data_dir, source=args.source, verify=not args.no_verify)
        dataset = load(args.name, args.data_dir)
    except PrepareError as e:
        return fail(str(e))
    how = f"from {args.source}" if args.source else "from TFDS's download"
    print(
        f"jaxdp: prepared {args.name} {how} in {path} ({time.perf_counter() - t0:.1f} s): "
        f"train {dataset.x_train.shape}, test {dataset.x_test.shape}, {dataset.num_classes} classes"
    )
    print(f"jaxdp: train on it with: jaxdp train --config CONFIG dataset={args.name} data_dir={args.data_dir}")
    return 0
