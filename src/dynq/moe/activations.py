"""The input every dense FFN block sees, token by token, captured from llama.cpp's own forward pass.

The FFN input is the second operand of the `blk.N.ffn_up.weight` matrix multiplication (the normed hidden state);
the scheduler's eval callback hands it over as the graph runs, chunk by chunk as llama.cpp's tools cut a text.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dynq.calib.collector import GgmlTensor, OpNames, tensor_view
from dynq.calib.runtime import LlamaRuntime, token_chunks
from dynq.core.context import RunContext, context

_FFN_UP = re.compile(rb"blk\.(\d+)\.ffn_up\.weight")


def ffn_inputs(
    model_path: str | Path, text: str, *, n_ctx: int, chunks: int, ctx: RunContext | None = None
) -> dict[int, npt.NDArray[np.float32]]:
    """Block index → its FFN inputs [tokens, n_embd] over the first `chunks` chunks of `text` (progress in chunks)."""
    ctx = context(ctx)
    op_name = OpNames()
    parts: dict[int, list[npt.NDArray[np.float32]]] = {}
    failures: list[BaseException] = []

    def on_eval(t_ptr: int, ask: bool, _user: int) -> bool:
        try:  # an exception cannot cross the C boundary: keep it and stop the graph
            t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
            if op_name(t.op) != "MUL_MAT":
                return not ask
            m = _FFN_UP.fullmatch(t.src[0].contents.name)
            if ask:
                return m is not None
            if m is not None:
                x = tensor_view(t.src[1].contents, np.float32)
                parts.setdefault(int(m.group(1)), []).append(np.array(x.reshape(-1, x.shape[-1])))
            return True
        except BaseException as e:
            failures.append(e)
            return False

    with LlamaRuntime(model_path, n_ctx, ctx.threads, eval_callback=on_eval) as rt:
        cut = token_chunks(rt.tokenize(text), n_ctx, chunks, "the calibration text")
        for i, chunk in enumerate(cut):
            rt.evaluate_chunk(chunk)
            if failures:
                raise failures[0]
            ctx.report("activations", i + 1, len(cut), "chunks")
    return {block: np.concatenate(xs) for block, xs in sorted(parts.items())}
