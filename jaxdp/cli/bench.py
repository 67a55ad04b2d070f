"""``jaxdp bench``: arguments to :func:`jaxdp.bench.run_bench`."""

from __future__ import annotations

from jaxdp.cli.output import fail


def run(args) -> int:
    """``jaxdp bench``: run the grid of parsed arguments; bad arguments are one line, exit 2."""
    import os

    from jaxdp.bench import ACCELERATOR_SUITE, DEFAULT_MODELS, MODELS, BenchError, run_bench

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
    # Options left out take the grid's defaults: the accelerator suite's with --accelerator.
    suite = ACCELERATOR_SUITE if args.accelerator else {}
    given = {
        "models": args.models,
        "batch_sizes": args.batch_sizes,
        "dtypes": args.dtypes,
        "epsilons": args.epsilons,
        "devices": args.devices,
        "epochs": args.epochs,
        "out_dir": args.out,
    }
    # What neither gives is left to run_bench's own defaults.
    grid = {**suite, **{k: v for k, v in given.items() if v is not None}}
    if args.accelerator:
        import jax

        if jax.default_backend() == "cpu" and args.models is None:
            print(
                "jaxdp bench --accelerator: no GPU or TPU here (backend cpu); WRN-16-4 at batch 1024 takes very "
                "long on a CPU. A tiny grid: --models mlp --batch-sizes 16",
                flush=True,
            )
    try:
        run_bench(
            **grid,
            delta=args.delta,
            accountant=args.accountant,
            clipping_impl=args.clipping_impl,
            full=args.full,
            repeats=args.repeats,
            isolate=not args.in_process,
            progress=not args.no_progress,
        )
    except BenchError as e:
        return fail(str(e))
    return 0
