"""What every ``jaxdp`` command prints for bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import sys

__all__ = ["fail"]


def fail(message: str) -> int:
    """Print ``jaxdp: error: message`` on stderr; return the exit code of bad input (2)."""
    print(f"jaxdp: error: {message}", file=sys.stderr)
    return 2
