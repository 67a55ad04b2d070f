"""Images read from a prepared TFDS dataset by random access, for datasets larger than the memory budget.

:class:`RecordArray` looks like the ``(n, H, W, C)`` float32 array that :func:`jaxdp.data.load` keeps
in memory (``len``, ``shape``, ``dtype``, ``x[indices]``, ``x[start:stop]``) but holds only the
``tfds.data_source`` of one split: a gather of a Poisson draw's indices reads and decodes just those
records from the array_record files. What it returns equals the in-memory array's rows exactly (same
decoder, same scaling), so batches, masks and privacy are those of the in-memory path.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RecordArray"]


class RecordArray:
    """Rows ``rows`` (all by default) of feature ``key`` of a TFDS data source, as float32 in [0, 1]."""

    def __init__(self, source, key: str = "image", rows: np.ndarray | None = None):
        self.source, self.key = source, key
        self.rows = np.arange(len(source)) if rows is None else np.asarray(rows)
        first = np.asarray(source[int(self.rows[0])][key]) if len(self.rows) else np.zeros((0,), np.uint8)
        self._raw_dtype = first.dtype
        self.shape = (len(self.rows), *first.shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)
        self.nbytes = int(np.prod(self.shape)) * 4

    def __len__(self) -> int:
        return self.shape[0]

    def view(self, indices) -> RecordArray:
        """The rows ``indices`` of this array, still on disk (e.g. a validation split)."""
        out = object.__new__(RecordArray)
        out.__dict__.update(self.__dict__)
        out.rows = self.rows[np.asarray(indices)]
        out.shape = (len(out.rows), *self.shape[1:])
        out.nbytes = int(np.prod(out.shape)) * 4
        return out

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            wanted = self.rows[index]
        else:
            index = np.asarray(index)
            if index.dtype == bool:
                raise TypeError("RecordArray takes integer indices or a slice, not a boolean mask.")
            wanted = self.rows[index.reshape(-1)]
        if len(wanted) == 0:
            return np.zeros((0, *self.shape[1:]), np.float32)
        records = self.source.__getitems__([int(i) for i in wanted])  # batched random access
        x = np.stack([np.asarray(r[self.key]) for r in records]).astype(np.float32)
        if self._raw_dtype == np.uint8:
            x /= 255.0
        if not isinstance(index, slice):
            x = x.reshape(*np.shape(index), *self.shape[1:])
        return x

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            f"this dataset is read from disk ({self.shape}, {self.nbytes / 2**20:,.0f} MiB as float32, above "
            "data_memory_mb); index it (x[indices], x[a:b]) or raise data_memory_mb to load it whole."
        )
