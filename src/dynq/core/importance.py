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

# The importance (mean x² per column) a matrix's largest column may have for the encoders to weigh it as asked. The
# encoders sum importance times weight² and square such sums in float32: llama.cpp's and dynq's write an all-zero or
# damaged tensor from about 1e15 (weights near 20) or 1e-17 (weights near 2e-4) on, silently. Real imatrices peak
# between about 1e-6 and 1e9 per matrix (massive activations included), so this band leaves both sides a margin of
# a thousand and more.
IMPORTANCE_MIN = 1e-12
IMPORTANCE_MAX = 1e12


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
        has_data = self.has_data()[:, None]
        safe = np.where(self.counts > 0, self.counts, 1.0).astype(np.float32)[:, None]
        with np.errstate(over="ignore", under="ignore"):  # an extreme quotient is what problem() reports
            return np.where(has_data, self.sums / safe, np.float32(1.0)).astype(np.float32)

    def has_data(self) -> np.ndarray:
        """Per matrix: whether it saw tokens and some of its sums are above zero (else importance() is ones)."""
        return np.asarray((self.counts > 0) & np.any(self.sums > 0, axis=1))

    def problem(self) -> str | None:
        """What makes this entry unusable (NaN, Inf or negative values, or an importance the encoders cannot weigh),
        or None."""
        if not (np.isfinite(self.sums).all() and np.isfinite(self.counts).all()):
            return "holds NaN or Inf"
        if (self.sums < 0).any() or (self.counts < 0).any():
            return "holds negative sums or counts"
        with_data = self.has_data()
        if not with_data.any():
            return None
        peaks = self.importance()[with_data].max(axis=1)  # each matrix's largest column
        high, low = float(peaks.max()), float(peaks.min())
        harm = "the tensor would be written as zeros or damaged"
        if not high <= IMPORTANCE_MAX:
            return f"has an importance (sum / tokens) of {high:.3g}, above {IMPORTANCE_MAX:g}: {harm}"
        if low < IMPORTANCE_MIN:
            return f"has a matrix whose importance (sum / tokens) peaks at {low:.3g}, below {IMPORTANCE_MIN:g}: {harm}"
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
