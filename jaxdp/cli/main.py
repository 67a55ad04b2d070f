"""``jaxdp`` command line.

jaxdp train --config configs/NAME.py[:arg] [key=value ...] [--resume | --overwrite] [--no-progress]
jaxdp account --sampling-rate Q (--noise-multiplier S | --target-epsilon E | --target-tpr T) --steps N
jaxdp audit --config configs/NAME.py[:arg] [key=value ...] [--canaries M] [--confidence 0.95] [--test both|epsilon|fdp]
jaxdp data prepare NAME --data_dir DIR [--source FILES_DIR] [--no_verify]
jaxdp bench [--quick | --full | --accelerator] [--models ...] [--batch-sizes ...] [--epsilons 1 2 4 8] [--devices 1 2 4 8]
            [--out DIR] [--explain]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from jaxdp.cli.output import fail
from jaxdp.config import ConfigError, apply_overrides, load_config

USAGE_EXAMPLE = "jaxdp train --config configs/digits.py privacy.l2_clip_norm=0.5"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdp", description="Differentially private training in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a model privately from a config file",
        description=f"Train from a Python config; override keys as key=value or --config.key=value. e.g. {USAGE_EXAMPLE}",
    )
    train.add_argument("--config", required=True, help="path to a config .py file, optionally path.py:arg")
    train.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bar (drawn on stderr only when it is a terminal); the epoch lines are printed either way",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in workdir (no checkpoint: start from the beginning). The config "
        "must be the checkpoint's, except for epochs (to extend a run with a fixed privacy.noise_multiplier; never "
        "below the checkpoint's epoch), optimizer.learning_rate, checkpoint.*, workdir, data_dir, data_memory_mb, "
        "data_prefetch, physical_batch_size, microbatch_size, clipping_impl and distributed.*; any other "
        "difference is refused, naming the keys",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a workdir that holds a run: deletes its checkpoints/, metrics.jsonl, summary.json and "
        "tensorboard/ (other files stay) once the config has been checked, before the first step. Without "
        "--resume or --overwrite a workdir holding a run is refused",
    )
    train.add_argument("overrides", nargs="*", help="key=value config overrides")

    account = sub.add_parser(
        "account",
        help="epsilon per accountant and membership-inference risk of a (planned) run",
        description="e.g. jaxdp account --sampling-rate 0.004267 --noise-multiplier 1.1 --steps 14062",
    )
    rate = account.add_mutually_exclusive_group(required=True)
    rate.add_argument("--sampling-rate", type=float, help="Poisson sampling rate q")
    rate.add_argument("--batch-size", type=int, help="expected batch size (with --dataset-size)")
    account.add_argument(
        "--dataset-size",
        type=int,
        help="N, with --batch-size or --epochs; also checks delta <= 1/N as jaxdp train does "
        "(without N, delta <= the sampling rate q is checked)",
    )
    noise = account.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float, help="sigma")
    noise.add_argument("--target-epsilon", type=float, help="calibrate sigma to this epsilon")
    noise.add_argument("--target-tpr", type=float, help="calibrate sigma to this membership-inference TPR at --fpr")
    length = account.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="number of noisy steps of the run (each samples a batch)")
    length.add_argument("--epochs", type=float, help="epochs of dataset_size / batch_size steps")
    account.add_argument(
        "--delta",
        type=float,
        default=1e-5,
        help="delta of the (epsilon, delta) guarantee reported: in (0, 1), and <= 1/N with --dataset-size, "
        "else <= q (default 1e-5)",
    )
    account.add_argument("--fpr", type=float, default=0.01, help="FPR for --target-tpr (default 0.01)")
    account.add_argument(
        "--calibrate-with",
        default=None,
        help="accountant that calibrates sigma, for either target (default: rdp for --target-epsilon, as jaxdp "
        "train; pld for --target-tpr); the header names the one used",
    )
    account.add_argument("--accountants", default="rdp,pld,prv,gdp", help="comma-separated accountants to report")
    account.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    audit = sub.add_parser(
        "audit",
        help="empirical lower bound on epsilon and f-DP test of a training recipe (one-run canary audit)",
        description="Train the config's recipe once with gradient canaries (each included with probability 1/2); "
        "report the accountant's epsilon beside an empirical lower bound (Steinke, Nasr & Jagielski 2023) and test "
        "the canary scores against the claimed mechanism's whole privacy curve (one-run f-DP audit, Mahloujifar, "
        "Melis & Chaudhuri 2024). Exit code 1 when either certifies a violation. "
        "e.g. jaxdp audit --config configs/digits.py --canaries 1000",
    )
    audit.add_argument("--config", required=True, help="path to a config .py file, optionally path.py:arg")
    audit.add_argument("--canaries", type=int, default=1000, help="number of canaries m (default 1000)")
    audit.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    audit.add_argument(
        "--test",
        choices=("both", "epsilon", "fdp"),
        default="both",
        help="tests that decide the exit code: the epsilon lower bound, the f-DP test, or both (default)",
    )
    audit.add_argument(
        "--sabotage",
        choices=("noise_off", "clipping_off", "half_noise"),
        help="run a deliberately broken mechanism (no noise / no clipping / sigma/2) against the same claim, "
        "to see the audit fail; never for real runs",
    )
    audit.add_argument("overrides", nargs="*", help="key=value config overrides")

    bench = sub.add_parser(
        "bench",
        help="throughput per epsilon: private vs non-private step, memory, accuracy, device scale-out",
        description="For models x batch sizes x target epsilons: calibrate sigma, time the private and the "
        "non-private step side by side in one process, read memory, train a fixed budget for accuracy; then time "
        "the private step on 1, 2, 4, 8 forced CPU devices. Writes a markdown table to stdout and CSV, JSON, "
        "markdown and PNG to --out. e.g. jaxdp bench --models mnist_cnn --epsilons 1 8",
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="small grid (default): 3 model configurations, then the scale-out on 1, 2, 4, 8 forced CPU devices "
        "(7 stages, one line each as it starts and ends); the mlp-only grid took 74 s on 2 busy CPU cores",
    )
    size.add_argument("--full", action="store_true", help="more batch sizes, epochs and timing repeats")
    size.add_argument(
        "--accelerator",
        action="store_true",
        help="the accelerator suite (make bench-gpu): WRN-16-4 and the transformer at batch 1024 in float32 and "
        "bfloat16, epsilon 1 and 8, auto beside vmap, no accuracy runs or scale-out, to benchmarks/out/accelerator; any option given "
        "overrides it (a tiny grid: --models mlp --batch-sizes 16)",
    )
    bench.add_argument(
        "--models", nargs="+", default=None, help="mnist_cnn, wrn16_4, transformer (default) and/or mlp (tiny)"
    )
    bench.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: per model, quick or full")
    bench.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        help="what the models compute in, a row each: float32 (default; --accelerator: float32 bfloat16), bfloat16, "
        "float16 (mixed precision: parameters, clipped sum and noise stay float32)",
    )
    bench.add_argument("--epsilons", nargs="+", type=float, default=None, help="default: 1 2 4 8")
    bench.add_argument("--delta", type=float, default=1e-5)
    bench.add_argument("--accountant", default="rdp", help="accountant used to calibrate sigma (default rdp)")
    bench.add_argument(
        "--clipping-impl",
        nargs="+",
        default=["auto", "vmap"],
        help="clipping implementations timed side by side (default: auto vmap; the first trains the accuracy runs)",
    )
    bench.add_argument(
        "--devices", nargs="*", type=int, default=None, help="forced CPU device counts (default 1 2 4 8; none: skip)"
    )
    bench.add_argument("--epochs", type=int, default=None, help="epochs of each accuracy run (0: no accuracy runs)")
    bench.add_argument("--repeats", type=int, default=None, help="interleaved timing blocks (default 5, --full 9)")
    bench.add_argument("--out", default=None, help="output folder (default benchmarks/out)")
    bench.add_argument(
        "--data_dir",
        "--data-dir",
        default=None,
        help="TFDS data directory with a prepared fashion_mnist for the mnist_cnn row (default: $TFDS_DATA_DIR, "
        "else ~/tensorflow_datasets; without it that row trains on the upsampled digits and says so)",
    )
    bench.add_argument(
        "--in-process", action="store_true", help="measure every configuration in this process (no subprocesses)"
    )
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    bench.add_argument(
        "--explain",
        action="store_true",
        help="only print, per model and batch size, how the ghost path takes each parameter's norms (Gram, "
        "direct, embedding, per-parameter) and the costs it compares, or why it does not cover the model; "
        "traces shapes, times nothing",
    )

    data = sub.add_parser("data", help="prepare a TFDS dataset once so that training reads it offline")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="build a TFDS dataset (array_record) in --data_dir, from TFDS's download or from local files",
        description="Build the TFDS dataset that `jaxdp train dataset=NAME data_dir=DIR` reads, with TFDS's own "
        "builder. Without --source TFDS downloads the files; with it they are read from a folder (mnist, "
        "fashion_mnist, kmnist: the four original IDX files, gzipped or not) and checked against known checksums. "
        "e.g. jaxdp data prepare fashion_mnist --data_dir ~/tensorflow_datasets "
        "--source /usr/share/datasets/fashion-mnist",
    )
    prep.add_argument("name", help="TFDS dataset name, e.g. fashion_mnist")
    prep.add_argument("--data_dir", "--data-dir", required=True, help="TFDS data directory to write (data_dir=)")
    prep.add_argument("--source", default=None, help="folder with the dataset's original files (no network)")
    prep.add_argument(
        "--no_verify",
        "--no-verify",
        action="store_true",
        help="accept local files whose checksums are not known (structural checks still run)",
    )
    return parser


def _latest_checkpoint(directory: str) -> int | None:
    """The latest committed checkpoint's epoch (orbax gives an unfinished write a suffixed name), read cheaply."""
    try:
        epochs = [int(name) for name in os.listdir(directory) if name.isdigit()]
    except OSError:
        return None
    return max(epochs, default=None)


def _resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted ``jaxdp train``: the same, with --resume (no --overwrite)."""
    args = [a for a in argv if a != "--overwrite"]
    return shlex.join(["jaxdp", *args, *([] if "--resume" in args else ["--resume"])])


def _interrupted(config, argv: list[str], started: float) -> str:
    """One line after Ctrl-C during ``jaxdp train``: where the last checkpoint is and how to continue."""
    directory = os.path.abspath(os.path.join(config.workdir, "checkpoints"))
    latest = _latest_checkpoint(directory)
    if "--overwrite" in argv and (latest is None or os.path.getmtime(os.path.join(directory, str(latest))) < started):
        # Stopped before this run wrote a checkpoint: --resume would continue the run being replaced.
        return (
            f"jaxdp: interrupted before this run's first checkpoint; start again with: {shlex.join(['jaxdp', *argv])}"
        )
    command = _resume_command(argv)
    if latest is None:
        return f"jaxdp: interrupted before the first checkpoint (none under {directory}); start again with: {command}"
    return f"jaxdp: interrupted; the last checkpoint is epoch {latest} ({directory}/{latest}); continue with: {command}"


def main(argv: list[str] | None = None) -> int:
    """``jaxdp ...``; Ctrl-C is one line and exit code 130, a closed output pipe (``| head``) a quiet exit 141."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader gone before the end (``| head``) shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Nothing more can be written where stdout went; silence the interpreter's own last flush too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a tool killed by the closed pipe
    except KeyboardInterrupt:
        print("jaxdp: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = list(getattr(args, "overrides", []))
    for item in unknown:
        if args.command not in ("train", "audit"):
            parser.error(f"unrecognised argument {item!r}")
        if item.startswith("--config.") or ("=" in item and not item.startswith("-")):
            overrides.append(item)  # also key=value after an option (argparse leaves those unparsed)
        else:
            parser.error(f"unrecognised argument {item!r}; overrides look like key=value or --config.key=value")
    if args.command == "data":
        from jaxdp.cli import data

        return data.run(args)
    if args.command in ("train", "bench", "audit"):
        from jaxdp.host import keep_freed_memory

        keep_freed_memory()  # each step's XLA temporaries reuse the last step's pages (see jaxdp.host)
    if args.command == "bench":
        from jaxdp.cli import bench

        return bench.run(args)
    if args.command == "account":
        from jaxdp.cli import account

        try:
            print(account.run(args))
        except ValueError as e:
            return fail(str(e))
        return 0
    try:  # train and audit: one config, bad files/keys/values are one line
        config = apply_overrides(load_config(args.config), overrides)
    except ConfigError as e:
        return fail(str(e))
    if args.command == "train":
        started = time.time()  # a checkpoint older than this is the previous run's (see _interrupted)
        try:
            from jaxdp.train import TrainingError, train  # heavy imports only once the config is known good

            try:
                train(config, progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite)
            except ConfigError as e:
                # Bad values found before the first step are one line; an error
                # during training is a bug and keeps its traceback.
                return fail(str(e))
            except TrainingError as e:  # diverged, checkpoint not written: says what to do, exit 1
                print(f"jaxdp: error: {e}", file=sys.stderr)
                return 1
        except KeyboardInterrupt:  # Ctrl-C: where the last checkpoint is and the command that continues
            print(_interrupted(config, argv, started), file=sys.stderr)
            return 130
    if args.command == "audit":
        from jaxdp.cli import audit

        return audit.run(config, args)
    return 0
