"""Judge an encoder against llama.cpp's: imatrix-weighted squared error of what each file decodes to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf.quants import dequantize

from dynq.core.arrays import F32Array, U8Array
from dynq.core.qtypes import QType
from dynq.kernels import KernelBackend


def decode(qtype: QType, data: U8Array, n_per_row: int) -> F32Array:
    """What llama.cpp reads back from encoded rows (gguf-py's reference dequantizers)."""
    return np.asarray(dequantize(data, qtype.ggml), dtype=np.float32).reshape(data.shape[0], n_per_row)


def weighted_error(x: F32Array, y: F32Array, importance: F32Array | None) -> float:
    """Σ importance_j · (x - y)², the loss llama.cpp's quantizers minimize (float64 sum)."""
    diff2 = (x.astype(np.float64) - y.astype(np.float64)) ** 2
    if importance is not None:
        diff2 = diff2 * importance.astype(np.float64)[None, :]
    return float(diff2.sum())


@dataclass(frozen=True)
class Comparison:
    error: float  # weighted error of the candidate
    reference_error: float  # weighted error of the reference backend (ggml)

    @property
    def ratio(self) -> float:
        if self.reference_error == 0.0:
            return 1.0 if self.error == 0.0 else float("inf")
        return self.error / self.reference_error


def compare(qtype: QType, rows: F32Array, importance: F32Array | None, candidate: KernelBackend,
            reference: KernelBackend) -> Comparison:  # fmt: skip
    k = rows.shape[1]
    mine = decode(qtype, candidate.encode(qtype, rows, importance), k)
    theirs = decode(qtype, reference.encode(qtype, rows, importance), k)
    return Comparison(weighted_error(rows, mine, importance), weighted_error(rows, theirs, importance))
