"""`dynq eval`: a quant against its reference on the same text, chunk by chunk as llama-perplexity does it.

The reference's predictions are computed once per (reference file, text, n_ctx, chunks, k) and cached compactly
under the dynq cache; every later evaluation against that reference reads only the cache.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynq.calib.runtime import LlamaRuntime
from dynq.errors import DynqError
from dynq.eval.metrics import Scores
from dynq.eval.reference import CompactReference
from dynq.paths import cache_dir

log = logging.getLogger(__name__)

TOP_K = 256
TAIL_SAMPLES = 256


@dataclass(frozen=True)
class EvalProgress:
    stage: str  # "reference" or "quant"
    chunk: int
    n_chunks: int


def chunks_of(tokens: list[int], n_ctx: int, n_chunks: int | None) -> list[list[int]]:
    available = len(tokens) // n_ctx
    if available < 1:
        raise DynqError(f"evaluation text has {len(tokens)} tokens; at least {n_ctx} (one chunk) are needed")
    count = available if n_chunks is None else min(n_chunks, available)
    return [tokens[i * n_ctx : (i + 1) * n_ctx] for i in range(count)]


def scored_positions(n_ctx: int) -> slice:
    """Positions whose next token is scored: the second half of the chunk, as llama-perplexity."""
    return slice(n_ctx // 2, n_ctx - 1)


def _reference_key(ref: Path, text: str, n_ctx: int, n_chunks: int | None, k: int) -> str:
    st = ref.stat()
    h = hashlib.sha256(f"{ref.resolve()}:{st.st_size}:{st.st_mtime_ns}:{n_ctx}:{n_chunks}:{k}:{TAIL_SAMPLES}".encode())
    h.update(text.encode())
    return h.hexdigest()[:24]


def reference_predictions(
    ref: Path,
    text: str,
    provenance: str,
    n_ctx: int,
    n_chunks: int | None,
    threads: int,
    k: int = TOP_K,
    progress: Callable[[EvalProgress], None] | None = None,
) -> CompactReference:
    path = cache_dir() / "references" / f"{ref.stem}-{_reference_key(ref, text, n_ctx, n_chunks, k)}.npz"
    if path.exists():
        return CompactReference.load(path)
    parts = []
    with LlamaRuntime(ref, n_ctx, threads, logits=True) as rt:
        chunks = chunks_of(rt.tokenize(text), n_ctx, n_chunks)
        for i, chunk in enumerate(chunks):
            logits = rt.evaluate_chunk(chunk)
            assert logits is not None
            rows = scored_positions(n_ctx)
            nxt = np.asarray(chunk[rows.start + 1 : rows.stop + 1], dtype=np.int32)
            parts.append(CompactReference.from_logits(logits[rows], nxt, k, TAIL_SAMPLES, seed=i))
            if progress is not None:
                progress(EvalProgress("reference", i + 1, len(chunks)))
    result = CompactReference.concat(parts, n_ctx, provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.save(path)
    return result


def evaluate(
    quant: Path,
    ref: Path,
    text: str,
    provenance: str,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    threads: int = 1,
    progress: Callable[[EvalProgress], None] | None = None,
    top_k: int = TOP_K,
) -> dict[str, Any]:
    """PPL of both, KLD statistics, top-1 agreement and RMS Δp of `quant` against `ref` on `text`.

    The KL divergence is exact over the reference's `top_k` tokens and sampled over the rest of the vocabulary."""
    reference = reference_predictions(ref, text, provenance, n_ctx, n_chunks, threads, top_k, progress)
    scores = Scores()
    per_chunk = n_ctx - 1 - n_ctx // 2
    with LlamaRuntime(quant, n_ctx, threads, logits=True) as rt:
        if rt.n_vocab != reference.n_vocab:
            raise DynqError(f"{quant}: vocabulary of {rt.n_vocab} tokens, the reference has {reference.n_vocab}")
        chunks = chunks_of(rt.tokenize(text), n_ctx, n_chunks)
        for i, chunk in enumerate(chunks):
            rows = slice(i * per_chunk, (i + 1) * per_chunk)
            expected = np.asarray(chunk[n_ctx // 2 + 1 :], dtype=np.int32)
            if not np.array_equal(reference.next_tokens[rows], expected):
                raise DynqError(f"{quant}: tokenizes the text differently from the reference {ref}")
            logits = rt.evaluate_chunk(chunk)
            assert logits is not None
            scores.add(reference, rows, logits[scored_positions(n_ctx)])
            if progress is not None:
                progress(EvalProgress("quant", i + 1, len(chunks)))
    return scores.summary() | {"chunks": len(chunks), "n_ctx": n_ctx, "text": provenance}
