"""`dynq eval`: a quant against its reference on the same text, chunk by chunk as llama-perplexity does it.

The reference's predictions are computed once per (reference content, text, n_ctx, chunks, k) and cached compactly
under the dynq cache; every later evaluation against that reference reads only the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from dynq.core.context import RunContext, context
from dynq.errors import DynqError
from dynq.eval.metrics import Scores
from dynq.eval.reference import CompactReference, log_softmax
from dynq.llamacpp.runtime import LlamaRuntime, token_chunks
from dynq.sources.described import describe

log = logging.getLogger(__name__)

TOP_K = 256
TAIL_SAMPLES = 256


@dataclass(frozen=True)
class EvalResult:
    """A quant judged against its reference; `to_dict` gives the JSON `dynq eval --json` prints."""

    tokens: int
    ppl: float
    ref_ppl: float
    kld_mean: float
    kld_median: float
    kld_p90: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    kld_over_1: float  # share of tokens with KL divergence above 1 nat
    top1: float
    dp_rms: float
    chunks: int
    n_ctx: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scored_positions(n_ctx: int) -> slice:
    """Positions whose next token is scored: the second half of the chunk, as llama-perplexity."""
    return slice(n_ctx // 2, n_ctx - 1)


# Bump when what a cached reference holds, or how it is computed, changes: a reference made by other code (or another
# llama.cpp, whose logits it records) is never read.
REFERENCE_VERSION = 2


def _reference_key(fingerprint: str, text: str, n_ctx: int, n_chunks: int | None, k: int) -> str:
    made_by = f"{REFERENCE_VERSION}:{metadata.version('llama-cpp-python')}"
    h = hashlib.sha256(f"{made_by}:{fingerprint}:{n_ctx}:{n_chunks}:{k}:{TAIL_SAMPLES}".encode())
    h.update(text.encode())
    return h.hexdigest()[:24]


def reference_predictions(
    ref: Path,
    text: str,
    provenance: str,
    n_ctx: int,
    n_chunks: int | None,
    ctx: RunContext,
    k: int = TOP_K,
) -> CompactReference:
    """The reference's compact predictions on `text`, from the cache (keyed by the reference's content) or computed
    once and cached (progress stage "reference")."""
    # the remembered fingerprint: parsing a 150k-token vocabulary again would cost seconds per evaluation
    key = _reference_key(describe(ref, str(ref), ctx.cache_dir).fingerprint(), text, n_ctx, n_chunks, k)
    path = ctx.cache_dir / "references" / f"{ref.stem}-{key}.npz"
    if path.exists():
        return CompactReference.load(path)
    parts = []
    with LlamaRuntime(ref, n_ctx, ctx.threads, logits=True) as rt:
        chunks = token_chunks(rt.tokenize(text), n_ctx, n_chunks, "the evaluation text")
        for i, chunk in enumerate(chunks):
            rows = scored_positions(n_ctx)
            logits = rt.evaluate_chunk(chunk, rows)
            assert logits is not None
            nxt = np.asarray(chunk[rows.start + 1 : rows.stop + 1], dtype=np.int32)
            parts.append(CompactReference.from_logits(logits, nxt, k, TAIL_SAMPLES, seed=i))
            ctx.report("reference", i + 1, len(chunks), "chunks")
    result = CompactReference.concat(parts, n_ctx, provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.save(path)
    return result


def evaluate(
    quant: str | os.PathLike[str],
    ref: str | os.PathLike[str],
    text: str,
    provenance: str,
    *,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    top_k: int = TOP_K,
    ctx: RunContext | None = None,
) -> EvalResult:
    """PPL of both, KLD statistics, top-1 agreement and RMS Δp of `quant` against `ref` on `text`.

    The KL divergence is exact over the reference's `top_k` tokens and sampled over the rest of the vocabulary."""
    ctx = context(ctx)
    quant, ref = Path(quant), Path(ref)
    for path in (quant, ref):  # before the reference's minutes of work, not after them
        if not path.is_file():
            raise DynqError(f"{path}: no such model file")
    reference = reference_predictions(ref, text, provenance, n_ctx, n_chunks, ctx, top_k)
    with LlamaRuntime(quant, n_ctx, ctx.threads, logits=True) as rt:
        chunks = token_chunks(rt.tokenize(text), n_ctx, n_chunks, "the evaluation text")
        scores = score_chunks(rt, quant, reference, chunks, lambda i: ctx.report("eval", i, len(chunks), "chunks"))
    return EvalResult(**scores.summary(), chunks=len(chunks), n_ctx=n_ctx, text=provenance)


def score_chunks(
    rt: LlamaRuntime,
    quant: Path,
    reference: CompactReference,
    chunks: list[list[int]],
    done: Callable[[int], None] | None = None,
) -> Scores:
    """The model `rt` has open (from `quant`) scored against `reference` on `chunks` (the reference's own chunks of
    the text, in order); `done(i)` is called after the i-th chunk."""
    if rt.n_vocab != reference.n_vocab:
        raise DynqError(f"{quant}: vocabulary of {rt.n_vocab} tokens, the reference has {reference.n_vocab}")
    scores = Scores()
    n_ctx = rt.n_ctx
    per_chunk = n_ctx - 1 - n_ctx // 2
    for i, chunk in enumerate(chunks):
        rows = slice(i * per_chunk, (i + 1) * per_chunk)
        expected = np.asarray(chunk[n_ctx // 2 + 1 :], dtype=np.int32)
        if not np.array_equal(reference.next_tokens[rows], expected):
            raise DynqError(f"{quant}: tokenizes the text differently from the reference")
        logits = rt.evaluate_chunk(chunk, scored_positions(n_ctx))
        assert logits is not None
        scores.add(reference, rows, logits)
        if done is not None:
            done(i + 1)
    return scores


def perplexity(path: Path, text: str, n_ctx: int, chunks: int, threads: int, experts_used: int | None = None) -> float:
    """llama-perplexity's number (second half of each chunk scored) on the first `chunks` chunks of `text`;
    `experts_used` overrides a Mixture-of-Experts model's experts per token."""
    nll, count = 0.0, 0
    with LlamaRuntime(path, n_ctx, threads, logits=True, experts_used=experts_used) as rt:
        for chunk in token_chunks(rt.tokenize(text), n_ctx, chunks, "the text"):
            logits = rt.evaluate_chunk(chunk, scored_positions(n_ctx))
            assert logits is not None
            logp = log_softmax(logits)
            nxt = np.asarray(chunk[n_ctx // 2 + 1 :])
            nll -= float(logp[np.arange(nxt.size), nxt].sum())
            count += nxt.size
    return float(np.exp(nll / count))
