"""``jaxdp bench``: arguments to :func:`jaxdp.bench.run_bench`."""

from __future__ import annotations

from jaxdp.cli.output import fail


def run(args) -> int:
    """``jaxdp bench``: run the grid of parsed arguments; bad arguments are one line, exit 2."""
    import os

    from jaxdp.bench import DEFAULT_MODELS, MODELS, BenchError, run_bench

    if args.data_dir:  # read by jaxdp.bench.models here and in every measuring subprocess
        os.environ["TFDS_DATA_DIR"] = os.path.abspath(os.path.expanduser(args.data_dir))

    if args.repeats is not None and args.repeats < 1:
        return fail(f"--repeats {args.repeats} is invalid: need at least 1 timing block.")
    if args.explain:
        from jaxdp.bench.explain import explain_markdown

        unknown = [m for m in (args.models or ()) if m not in MODELS]
        if unknown:
            return fail(f"--models {' '.join(unknown)}: not a benchmarked model; choose from {', '.join(MODELS)}.")
        print(explain_markdown(args.models or DEFAULT_MODELS, args.batch_sizes, full=args.full))
        return 0
    try:
        run_bench(
            models=args.models or DEFAULT_MODELS,
            batch_sizes=args.batch_sizes,
            epsilons=args.epsilons,
            delta=args.delta,
            accountant=args.accountant,
            clipping_impl=args.clipping_impl,
            devices=args.devices,
            out_dir=args.out,
            full=args.full,
            epochs=args.epochs,
            repeats=args.repeats,
            isolate=not args.in_process,
            progress=not args.no_progress,
        )
    except BenchError as e:
        return fail(str(e))
    return 0
