"""The input every dense FFN block sees, token by token, captured from llama.cpp's own forward pass.

The FFN input is the second operand of the `blk.N.ffn_up.weight` matrix multiplication (the normed hidden state);
the scheduler's eval callback hands it over as the graph runs, chunk by chunk as llama.cpp's tools cut a text.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dynq.calib.collector import GgmlTensor, OpNames, run_watching, tensor_view
from dynq.core.context import RunContext, context

_FFN_UP = re.compile(rb"blk\.(\d+)\.ffn_up\.weight")


def ffn_inputs(
    model_path: str | Path, text: str, *, n_ctx: int, chunks: int, ctx: RunContext | None = None
) -> dict[int, npt.NDArray[np.float32]]:
    """Block index → its FFN inputs [tokens, n_embd] over the first `chunks` chunks of `text` (progress in chunks)."""
    ctx = context(ctx)
    op_name = OpNames()
    parts: dict[int, list[npt.NDArray[np.float32]]] = {}

    def block_of(t: GgmlTensor) -> int | None:
        m = _FFN_UP.fullmatch(t.src[0].contents.name) if op_name(t.op) == "MUL_MAT" else None
        return int(m.group(1)) if m else None

    def keep(t: GgmlTensor) -> None:
        if (block := block_of(t)) is not None:
            x = tensor_view(t.src[1].contents, np.float32)
            parts.setdefault(block, []).append(np.array(x.reshape(-1, x.shape[-1])))

    run_watching(model_path, text, n_ctx, chunks, lambda t: block_of(t) is not None, keep, "activations", ctx)
    return {block: np.concatenate(xs) for block, xs in sorted(parts.items())}
