"""The torch kernel backend: dynq's own encoders (kernels/encoders) on CPU or CUDA, behind KernelBackend."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from dynq.core.arrays import F32Array, U8Array
from dynq.core.qtypes import QType
from dynq.errors import DynqError
from dynq.kernels import KernelBackend
from dynq.kernels.encoders import EncodeFn, encoders

log = logging.getLogger(__name__)

# Rows per batch: bounds the encoders' working memory (a few hundred bytes per weight for the lattice searches).
_BATCH_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """torch's thread count is process-wide: set it for one encode call and give the caller's back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchBackend:
    name = "torch"

    def __init__(self, device: str | None = None, threads: int = 1) -> None:
        self.device = device or default_device()
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise DynqError("a CUDA device was asked for, but torch sees no CUDA GPU; use the CPU")
        self.threads = max(1, threads)
        self._encoders: dict[str, EncodeFn] = encoders()
        self._ggml: KernelBackend | None = None

    def _fallback(self, qtype: QType) -> KernelBackend:
        # Types outside dynq's own encoders (MXFP4) still quantize, with llama.cpp's encoder.
        if self._ggml is None:
            from dynq.kernels.ggml import GgmlBackend

            log.warning("the torch backend has no %s encoder; llama.cpp's encodes those tensors", qtype.name)
            self._ggml = GgmlBackend(self.threads)
        return self._ggml

    def encode(self, qtype: QType, rows: F32Array, importance: F32Array | None) -> U8Array:
        encode = self._encoders.get(qtype.name)
        if encode is None:
            return self._fallback(qtype).encode(qtype, rows, importance)
        n_rows, n_per_row = rows.shape
        if n_per_row % qtype.block_size:
            raise DynqError(f"{qtype.name} needs rows that are a multiple of {qtype.block_size}, got {n_per_row}")
        if importance is not None and importance.shape != (n_per_row,):
            raise DynqError(f"importance has {importance.shape[0]} columns, rows have {n_per_row}")
        weights = None if importance is None else torch.from_numpy(np.ascontiguousarray(importance)).to(self.device)
        out = np.empty((n_rows, qtype.row_bytes(n_per_row)), dtype=np.uint8)
        step = max(1, _BATCH_ELEMENTS["cuda" if self.device.startswith("cuda") else "cpu"] // n_per_row)
        with torch.inference_mode(), _intra_op_threads(self.threads):
            for start in range(0, n_rows, step):
                part = np.ascontiguousarray(rows[start : start + step], dtype=np.float32)
                x = torch.from_numpy(part).to(self.device)
                out[start : start + len(part)] = encode(x, weights).data.cpu().numpy()
        return out
