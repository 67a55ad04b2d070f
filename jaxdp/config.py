"""Python config files (``get_config(arg)``) and command-line overrides.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``;
``path.py:arg`` passes ``arg`` (e.g. ``configs/digits.py:smoke``), which the file
checks with :func:`check_variant` (an unknown one is a one-line error listing the
known variants). Overrides are
``key.sub=value`` (or ``--config.key.sub=value``); an unknown key or a value of
the wrong type is an error that names it.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
from collections.abc import Sequence

import ml_collections

__all__ = ["ConfigError", "apply_overrides", "check_variant", "config_module", "load_config"]


class ConfigError(ValueError):
    """Bad config file, key or value (the CLI prints it on one line, exit code 2)."""


def config_module(path: str):
    """Import a config file as a module (configs import their base with this, e.g.
    ``_base = config_module(os.path.join(os.path.dirname(__file__), "digits.py"))``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found; pass e.g. --config configs/digits.py")
    module_spec = importlib.util.spec_from_file_location(f"_jaxdp_config_{abs(hash(path))}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"config file {path!r} is not a Python file; configs are .py files with get_config().")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def check_variant(path: str, arg: str | None, known: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``arg`` is None or one of ``known`` (a config's variants).

    Every ``get_config(arg)`` calls it first, e.g. ``check_variant(__file__, arg, ("smoke",))``, so that
    ``--config configs/digits.py:big`` is one line naming the variant, the known ones and the fix.
    """
    if arg is None or arg in known:
        return
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    options = ", ".join(f"{shown}:{k}" for k in known)
    raise ConfigError(
        f"{shown}:{arg}: unknown variant {arg!r}; the known variants are {', '.join(map(repr, known)) or 'none'}: "
        f"use {options + ' or ' if options else ''}{shown} (no variant)."
    )


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path.py`` or ``path.py:arg`` and return its locked ``get_config(arg)``.

    A variant the file rejects (a ``ValueError`` from ``get_config``, e.g. by :func:`check_variant`) is a
    :class:`ConfigError`, so the command line prints it on one line.
    """
    path, _, arg = spec.partition(":")
    module = config_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg=None) function.")
    if arg and not inspect.signature(module.get_config).parameters:
        raise ConfigError(f"{spec}: {path} has no variants (its get_config() takes no argument); use {path}.")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except ValueError as e:  # the file's own check of its variant
        raise ConfigError(f"{spec}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config() in {path!r} returned {type(config).__name__}, not an ml_collections.ConfigDict."
        )
    config.lock()
    return config


def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``key.sub=value`` overrides in order; unknown keys and bad types raise ConfigError."""
    for item in overrides:
        text = item[len("--config.") :] if item.startswith("--config.") else item.lstrip("-")
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. privacy.l2_clip_norm=0.5).")
        parent = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(parent, ml_collections.ConfigDict) or part not in parent:
                scope = ".".join(parts[:i]) or "<top level>"
                known = ", ".join(sorted(parent.keys())) if isinstance(parent, ml_collections.ConfigDict) else "none"
                raise ConfigError(f"unknown config key {key!r}: {part!r} is not under {scope} (known: {known}).")
            if i < len(parts) - 1:
                parent = parent[part]
        leaf = parts[-1]
        old = parent[leaf]
        value = _parse_value(raw)
        if value is None:
            pass  # None is "unset" for any key; the run's validation says whether that is allowed
        elif isinstance(old, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"config key {key!r} is a bool; got {raw!r} (use true or false).")
        elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(old, (tuple, list)) and isinstance(value, (int, float)):
            value = (value,)
        elif old is not None and not isinstance(value, type(old)):
            if isinstance(old, str):
                value = raw
            else:
                raise ConfigError(f"config key {key!r} expects {type(old).__name__} (now {old!r}); got {raw!r}.")
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        with parent.unlocked():
            parent[leaf] = value
    return config
