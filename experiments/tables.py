"""What every experiment's table script shares: mean ± std cells and saving the table."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± std"`` over seeds (sample std; 0 for a single seed), with thousands separators."""
    v = np.asarray(values, dtype=np.float64)
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():,.{digits}f} ± {std:,.{digits}f}"


def save_table(out: str, text: str, results: list[dict], heading: str) -> None:
    """Print ``heading`` and the markdown ``text``; write ``out/table.md`` and ``out/results.json``."""
    print(f"\n{heading}\n\n{text}")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
