"""Kernel backends: encode float32 rows into a GGML type, behind one small protocol."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from dynq.errors import DynqError
from dynq.types import QType

F32Array = npt.NDArray[np.float32]
U8Array = npt.NDArray[np.uint8]


class KernelBackend(Protocol):
    name: str

    def encode(self, qtype: QType, rows: F32Array, importance: F32Array | None) -> U8Array:
        """Encode `rows` (float32 [n, k]) to `qtype`: uint8 [n, row_bytes(k)].

        `importance` (float32 [k]) weighs each column's error: the imatrix's per-column mean of x²."""
        ...


def get_backend(name: str, threads: int) -> KernelBackend:
    if name == "ggml":
        from dynq.kernels.ggml import GgmlBackend

        return GgmlBackend(threads)
    raise DynqError(f"unknown kernel backend '{name}'; available: ggml")
