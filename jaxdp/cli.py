"""``jaxdp`` command line: ``jaxdp train --config configs/NAME.py[:arg] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

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
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def _fail(message: str) -> int:
    print(f"jaxdp: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = list(args.overrides)
    for item in unknown:
        if item.startswith("--config."):
            overrides.append(item)
        else:
            parser.error(f"unrecognised argument {item!r}; overrides look like key=value or --config.key=value")
    if args.command == "train":
        try:
            config = apply_overrides(load_config(args.config), overrides)
        except ConfigError as e:
            return _fail(str(e))
        from jaxdp.train import train  # heavy imports only once the config is known good

        try:
            train(config, progress=not args.no_progress)
        except ConfigError as e:
            # Bad values found before the first step are one line; an error
            # during training is a bug and keeps its traceback.
            return _fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
