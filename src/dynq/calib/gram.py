"""Gram matrices of the inputs of every weight matrix, collected in the importance matrix's own pass.

Each matrix multiplication of a block weight hands its input x (tokens × d) to the callback; the weights that read
the same input node (q/k/v read the attention norm's output, gate/up the FFN norm's) share one matrix, summed once
per graph by the first of them. Only the upper triangle is computed, a panel of rows at a time, and mirrored at the
end: half the products of a full Xᵀ X. Expert tensors (MUL_MAT_ID) get the importance matrix only; their encoding
keeps the plain encoders (docs/feedback.md says why).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynq.calib.collector import ActivationStats, GgmlTensor, OpNames, run_watching, tensor_view
from dynq.core.arrays import F32Array
from dynq.core.context import RunContext, context
from dynq.core.importance import Imatrix
from dynq.errors import DynqError
from dynq.gguf_io.gram import GramSet

_PANEL = 1024  # rows of the upper triangle per product: large enough for BLAS, small enough to stay in cache


def add_upper(gram: F32Array, x: F32Array) -> None:
    """gram's upper triangle (and diagonal) += that of xᵀ x, for x [tokens, d]."""
    d = x.shape[1]
    for i0 in range(0, d, _PANEL):
        i1 = min(i0 + _PANEL, d)
        gram[i0:i1, i0:] += x[:, i0:i1].T @ x[:, i0:]


def mirrored(upper: F32Array) -> F32Array:
    """The symmetric matrix whose upper triangle `upper` holds."""
    full = np.triu(upper)
    full += np.triu(upper, 1).T
    return full


class GramStats:
    """The callback's accumulator: an upper-triangle sum per distinct input, and which weights read each input."""

    def __init__(self) -> None:
        self.upper: dict[str, F32Array] = {}
        self.tokens: dict[str, int] = {}
        self.inputs: dict[str, str] = {}  # weight -> input key
        self._owner: dict[str, str] = {}  # input key -> the weight whose multiplication sums it
        self._op = OpNames()

    def collect(self, t: GgmlTensor) -> None:
        if self._op(t.op) != "MUL_MAT":
            return
        src0, src1 = t.src[0].contents, t.src[1].contents
        if int(src0.ne[2]) * int(src0.ne[3]) != 1 or any(int(n) == 0 for n in src1.ne):
            return
        weight = src0.name.decode()
        d = int(src1.ne[0])
        key = f"{src1.name.decode() or weight}:{d}"
        known = self.inputs.setdefault(weight, key)
        if known != key:
            raise DynqError(f"{weight}: read input {key} after {known}; inconsistent graph")
        if self._owner.setdefault(key, weight) != weight:
            return  # another weight reads the same input and sums it
        x = np.ascontiguousarray(tensor_view(src1, np.float32).reshape(-1, d))
        if key not in self.upper:
            self.upper[key] = np.zeros((d, d), np.float32)
            self.tokens[key] = 0
        add_upper(self.upper[key], x)
        self.tokens[key] += x.shape[0]

    def to_grams(self, datasets: Sequence[str], chunk_count: int, chunk_size: int) -> GramSet:
        matrices = {key: mirrored(self.upper.pop(key)) for key in sorted(self.upper)}
        return GramSet(matrices, dict(self.tokens), dict(self.inputs), chunk_count, chunk_size, list(datasets))


def collect_gram(
    model_path: str | Path,
    text: str,
    datasets: Sequence[str],
    *,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    ctx: RunContext | None = None,
) -> tuple[Imatrix, GramSet]:
    """Run the model over `text` once: its importance matrix and the Gram matrices of its weights' inputs."""
    ctx = context(ctx)
    stats, grams = ActivationStats(), GramStats()

    def seen(t: GgmlTensor) -> None:
        stats.collect(t)
        grams.collect(t)

    chunks = run_watching(model_path, text, n_ctx, n_chunks, stats.wants, seen, "gram", ctx)
    return stats.to_imatrix(datasets, chunks, n_ctx), grams.to_grams(datasets, chunks, n_ctx)
