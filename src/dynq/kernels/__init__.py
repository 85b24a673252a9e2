"""Kernel backends: encode float32 rows into a GGML type, behind one small protocol."""

from __future__ import annotations

from typing import Protocol

from dynq.core.arrays import F32Array, U8Array
from dynq.core.qtypes import QType
from dynq.errors import DynqError


class KernelBackend(Protocol):
    name: str
    threads: int

    def encode(self, qtype: QType, rows: F32Array, importance: F32Array | None) -> U8Array:
        """Encode `rows` (float32 [n, k]) to `qtype`: uint8 [n, row_bytes(k)].

        `importance` (float32 [k]) weighs each column's error: the imatrix's per-column mean of x²."""
        ...


BACKENDS = ("ggml", "torch")


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def choose_backend(backend: str | None, device: str | None) -> tuple[str, str]:
    """(backend, device) for the options given: by default torch on a CUDA GPU when one is present, else ggml."""
    if backend is None:
        backend = "torch" if device == "cuda" or (device is None and cuda_available()) else "ggml"
    if device is None:
        device = "cuda" if backend == "torch" and cuda_available() else "cpu"
    return backend, device


def get_backend(name: str, threads: int, device: str | None = None) -> KernelBackend:
    """A backend by name; `device` (cpu, cuda) applies to torch only."""
    if name == "ggml":
        if device not in (None, "cpu"):
            raise DynqError(f"the ggml backend runs on the CPU only, not on {device}; use the torch backend")
        from dynq.kernels.ggml import GgmlBackend

        return GgmlBackend(threads)
    if name == "torch":
        from dynq.kernels.torch_backend import TorchBackend

        return TorchBackend(device, threads)
    raise DynqError(f"unknown kernel backend '{name}'; available: {', '.join(BACKENDS)}")
