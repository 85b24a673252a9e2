"""llama.cpp's own quantizers (`ggml_quantize_chunk` from the libggml bundled with llama-cpp-python) via ctypes.

This is the reference backend. Rows are spread over a thread pool: ctypes releases the GIL during the C call, so
threads run in parallel.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np

from dynq.core.arrays import F32Array, U8Array
from dynq.core.qtypes import QType
from dynq.errors import DynqError

# Rows per C call: large enough to amortize the call, small enough to keep every thread busy.
_CHUNK_ELEMENTS = 1 << 20


@cache
def ggml_library() -> ctypes.CDLL:
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(folder.glob("libggml-base.*")) + sorted(folder.glob("ggml-base.*"))
    if not candidates:
        raise DynqError(f"libggml-base not found in {folder}; reinstall the llama-cpp-python dynq pins (make setup)")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p,
    ]  # fmt: skip
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


class GgmlBackend:
    name = "ggml"

    def __init__(self, threads: int = 1) -> None:
        self.lib = ggml_library()
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._init_lock = threading.Lock()
        self._initialized: set[int] = set()

    def _init_type(self, ggml_type: int) -> None:
        # Grid tables are built lazily by the first call; build them once, before any thread races for them.
        with self._init_lock:
            if ggml_type not in self._initialized:
                self.lib.ggml_quantize_init(ggml_type)
                self._initialized.add(ggml_type)

    def encode(self, qtype: QType, rows: F32Array, importance: F32Array | None) -> U8Array:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n_rows, n_per_row = rows.shape
        ggml_type = int(qtype.ggml.value)
        row_bytes = int(self.lib.ggml_row_size(ggml_type, n_per_row))
        if row_bytes != qtype.row_bytes(n_per_row):
            raise DynqError(f"{qtype.name}: libggml says a row of {n_per_row} is {row_bytes} bytes; version mismatch")
        weights = None
        if importance is not None:
            weights = np.ascontiguousarray(importance, dtype=np.float32)
        elif self.lib.ggml_quantize_requires_imatrix(ggml_type):
            # ggml aborts without weights for these types; llama-quantize only lets token_embd/output through,
            # and for those a uniform importance is the neutral choice.
            weights = np.ones(n_per_row, dtype=np.float32)
        if weights is not None and weights.shape != (n_per_row,):
            raise DynqError(f"importance has {weights.shape[0]} columns, rows have {n_per_row}")
        self._init_type(ggml_type)
        out = np.empty((n_rows, row_bytes), dtype=np.uint8)
        step = max(1, _CHUNK_ELEMENTS // n_per_row)
        starts = range(0, n_rows, step)
        w_ptr = weights.ctypes.data if weights is not None else None

        def run(start: int) -> None:
            count = min(step, n_rows - start)
            # `start` is an element offset into src and selects the output position in dst.
            written = self.lib.ggml_quantize_chunk(
                ggml_type, rows.ctypes.data, out.ctypes.data, start * n_per_row, count, n_per_row, w_ptr
            )
            if written != count * row_bytes:
                raise DynqError(f"{qtype.name}: ggml wrote {written} bytes for {count} rows, expected more")

        if self._pool is None or len(starts) == 1:
            for s in starts:
                run(s)
        else:
            list(self._pool.map(run, starts))
        if not self.lib.ggml_validate_row_data(ggml_type, out.ctypes.data, out.nbytes):
            raise DynqError(f"{qtype.name}: encoded data failed llama.cpp's validation (non-finite scales)")
        return out
