"""Importance data for a model: per weight matrix, the sum of squared input activations per column and the tokens
seen, one row per matrix (per expert for 3-D expert tensors). What a quantizer wants is the mean: `importance()`
gives it the way llama-quantize computes it (a matrix that saw no token gets all ones). File formats are gguf_io's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

F32Array = npt.NDArray[np.float32]


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
        """Per-column mean of x², [n_mat, row_length]; ones for a matrix without data (as llama-quantize does)."""
        counts = self.counts[:, None]
        safe = np.where(counts > 0, counts, 1.0).astype(np.float32)
        return np.where(counts > 0, self.sums / safe, np.float32(1.0)).astype(np.float32)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
