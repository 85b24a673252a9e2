"""Importance data for a model: per weight matrix, the sum of squared input activations per column and the tokens
seen, one row per matrix (per expert for 3-D expert tensors). What a quantizer wants is the mean: `importance()`
gives it the way llama-quantize computes it (a matrix that saw no token gets all ones). File formats are gguf_io's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dynq.core.arrays import F32Array
from dynq.core.tensors import TensorInfo
from dynq.errors import DynqError


@dataclass
class ImatrixEntry:
    sums: F32Array  # shape [n_mat, row_length]: sum of x² per column
    counts: F32Array  # shape [n_mat]: tokens seen per matrix

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])

    @property
    def row_length(self) -> int:
        return int(self.sums.shape[1])

    def with_row_length(self, row_length: int) -> ImatrixEntry | None:
        """The same data laid out as rows of `row_length` (.dat files store one flat vector), or None if it
        does not divide."""
        total = self.sums.size
        if total % row_length:
            return None
        sums = self.sums.reshape(-1, row_length)
        counts = self.counts if self.counts.size == sums.shape[0] else np.full(sums.shape[0], self.counts[0])
        return ImatrixEntry(sums, counts.astype(np.float32))

    def importance(self) -> F32Array:
        """Per-column mean of x², [n_mat, row_length]; ones for a matrix without data (as llama-quantize does), and
        for one whose sums are all zero (an all-zero weighting would make the encoders write zeros)."""
        counts = self.counts[:, None]
        has_data = (counts > 0) & np.any(self.sums > 0, axis=1, keepdims=True)
        safe = np.where(counts > 0, counts, 1.0).astype(np.float32)
        return np.where(has_data, self.sums / safe, np.float32(1.0)).astype(np.float32)

    def problem(self) -> str | None:
        """What makes this entry unusable (NaN, Inf or negative values), or None."""
        if not (np.isfinite(self.sums).all() and np.isfinite(self.counts).all()):
            return "holds NaN or Inf"
        if (self.sums < 0).any() or (self.counts < 0).any():
            return "holds negative sums or counts"
        return None


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: str | None = field(default=None, compare=False)  # the file it was read from, if any

    def check(self, origin: str) -> None:
        """Stop on an entry no quantizer can use, naming it (llama.cpp aborts inside ggml or writes zeros)."""
        for name, entry in self.entries.items():
            if (problem := entry.problem()) is not None:
                raise DynqError(f"{origin}: imatrix entry {name} {problem}; the imatrix is damaged, collect it again")


def n_matrices(info: TensorInfo) -> int:
    """Matrices a tensor holds: its experts for a 3-D expert tensor, else one."""
    return info.shape[2] if len(info.shape) == 3 else 1


def importance_rows(info: TensorInfo, imatrix: Imatrix | None) -> F32Array | None:
    """The imatrix's per-column importance of `info`, one row per matrix (expert), or None when it has no usable
    entry (none, or one whose length does not divide into the tensor's rows)."""
    entry = imatrix.entries.get(info.name) if imatrix is not None else None
    if entry is None or (shaped := entry.with_row_length(info.row_length)) is None:
        return None
    rows = shaped.importance()
    if rows.shape[0] not in (1, n_matrices(info)):
        raise DynqError(f"imatrix entry {info.name} has {rows.shape[0]} matrices, tensor {n_matrices(info)}")
    return rows


def importance_row(importance: F32Array | None, matrix: int) -> F32Array | None:
    """Matrix `matrix`'s row of a tensor's importance (one row serves every matrix when only one is given)."""
    return None if importance is None else importance[min(matrix, importance.shape[0] - 1)]
