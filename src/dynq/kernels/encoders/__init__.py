"""dynq's own GGUF encoders in PyTorch: batched over rows, imatrix-weighted, the same code on CPU and CUDA.

Each encoder maps float32 rows [n, k] (k a multiple of the block size) and an optional per-column importance [k]
to an `Encoded`: the bytes llama.cpp reads and the values a decoder reads back from them. Modules register their
encoders in `ENCODERS` by type name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dynq.kernels.encoders.common import Encoded

EncodeFn = Callable[[torch.Tensor, torch.Tensor | None], Encoded]


def encoders() -> dict[str, EncodeFn]:
    """Every type the torch backend encodes, by GGML type name."""
    from dynq.kernels.encoders import iq1, iq2, iq3, iq4, kquants, legacy, ternary

    table: dict[str, EncodeFn] = {}
    for module in (legacy, ternary, iq4, kquants, iq2, iq3, iq1):
        table.update(module.ENCODERS)
    return table


__all__ = ["EncodeFn", "Encoded", "encoders"]
