"""What every experiment's table script shares: mean ± std cells, saving a table, and the results files.

A results file is JSON lines, one finished run a line, appended as each run ends (:func:`append_row`), so a
table cut off midway keeps every run it finished; a rerun skips the runs on record. Rows carry a recipe
hash (:func:`config_id`), so a changed recipe never reuses or mixes rows trained under the old one."""

from __future__ import annotations

import hashlib
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


def config_id(config, not_in_id: set[str], version: int) -> str:
    """A short hash of ``config`` (an ml_collections ConfigDict) minus the dotted keys in ``not_in_id``.

    A key in ``not_in_id`` that names a sub-dict (e.g. ``"cv.learning_rates"``) leaves out all of it.

    ``not_in_id`` holds what a cell sets itself (seed, ε, ...) and where runs are written; ``version`` is
    raised when what a run measures changes, so old rows are not reused.
    """

    def flat(d, prefix=""):
        for k, v in d.items():
            if f"{prefix}{k}" in not_in_id:
                continue
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    text = json.dumps([version, sorted(flat(config.to_dict()))], default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def load_rows(path: str) -> list[dict]:
    """The rows of a results file ([] if there is none); a cut-off last line (a run killed while writing it) is
    skipped with a message, a damaged line elsewhere raises."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
            print(f"{path}: its last line is cut off (a run killed while writing?); ignored.", flush=True)
    return rows


def drop_cut_off_tail(path: str) -> None:
    """Before appending: cut a last line left without its newline (a run killed while writing it), so the
    next row does not join it. That line's run never finished writing; it is trained again."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def append_row(path: str, row: dict) -> None:
    """Append one finished run's row to ``path`` (one line, flushed to disk before returning)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def recorded_runs(path: str, identity: Sequence[str]) -> set[tuple]:
    """Before a table appends to ``path``: make its folder, cut a half-written last line
    (:func:`drop_cut_off_tail`), and return the runs on record (their values of the ``identity`` keys)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    drop_cut_off_tail(path)
    return {tuple(r.get(k) for k in identity) for r in load_rows(path)}


def latest(rows: list[dict], identity: Sequence[str]) -> list[dict]:
    """One row per run (its values of the ``identity`` keys): the last one written (a redone run is appended,
    the file is never rewritten)."""
    return list({tuple(r.get(k) for k in identity): r for r in rows}.values())


def group_rows(rows: list[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows grouped by their values of ``keys`` (insertion order kept)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return groups
