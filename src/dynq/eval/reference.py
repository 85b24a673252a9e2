"""The reference model's predictions, kept compactly.

llama-perplexity's `--kl-divergence-base` file stores the whole vocabulary for every position (two bytes per
token id: ~300 KB per position at a 152k vocabulary). dynq keeps, per scored position: the reference's top-k tokens
with their log-probabilities (exact head of the distribution), S tokens drawn from the rest of the distribution by
stratified sampling with their log-probabilities, the mass of that rest, and the actual next token's log-prob.

KL(P||Q) = Σ_top p (log p − log q) + P_rest · E_{i~P_rest}[log p_i − log q_i]; the second term is estimated from
the samples, without bias. Truncating to the top-k alone (one bucket for the rest) underestimates KLD badly for
good quants, whose divergence lives in the tail: −10% at k = 64 and still −0.7% at k = 4096 on Qwen2.5-1.5B
Q4_K, where top-256 plus 256 samples lands within 0.01% (bench/results/agreement.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dynq.core.arrays import F32Array
from dynq.core.atomic import atomic_path
from dynq.errors import DynqError


def log_softmax(logits: F32Array) -> npt.NDArray[np.float64]:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    out: npt.NDArray[np.float64] = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


@dataclass
class CompactReference:
    """Per scored position (rows): reference top-k ids and log-probs, the rest mass, the next token's log-prob."""

    top_ids: npt.NDArray[np.int32]  # [n, k]
    top_logp: npt.NDArray[np.float32]  # [n, k], descending
    tail_ids: npt.NDArray[np.int32]  # [n, S], drawn from the distribution outside the top-k
    tail_logp: npt.NDArray[np.float32]  # [n, S]
    tail_mass: npt.NDArray[np.float32]  # [n], probability outside the top-k
    next_tokens: npt.NDArray[np.int32]  # [n]
    next_logp: npt.NDArray[np.float32]  # [n]
    n_ctx: int
    n_vocab: int
    text_provenance: str

    @staticmethod
    def from_logits(
        logits: F32Array, next_tokens: npt.NDArray[np.int32], k: int, samples: int = 0, seed: int = 0
    ) -> CompactReference:
        logp = log_softmax(logits)
        n, vocab = logp.shape
        k = min(k, vocab)
        top = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
        order = np.take_along_axis(logp, top, axis=-1).argsort(axis=-1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=-1)
        tail_ids = np.zeros((n, samples), np.int32)
        tail_mass = np.zeros(n, np.float32)
        if samples and k < vocab:
            rng = np.random.default_rng(seed)
            for row in range(n):
                p = np.exp(logp[row])
                p[top[row]] = 0.0
                cdf = np.cumsum(p)
                tail_mass[row] = cdf[-1]
                # stratified: one draw in each of `samples` equal slices of the tail's mass
                u = (np.arange(samples) + rng.random(samples)) / samples * cdf[-1]
                tail_ids[row] = np.minimum(np.searchsorted(cdf, u, side="right"), vocab - 1)
        rows = np.arange(n)
        return CompactReference(
            top.astype(np.int32),
            np.take_along_axis(logp, top, axis=-1).astype(np.float32),
            tail_ids,
            np.take_along_axis(logp, tail_ids.astype(np.int64), axis=-1).astype(np.float32),
            tail_mass,
            next_tokens.astype(np.int32),
            logp[rows, next_tokens].astype(np.float32),
            0,
            vocab,
            "",
        )

    @staticmethod
    def concat(parts: list[CompactReference], n_ctx: int, provenance: str) -> CompactReference:
        return CompactReference(
            np.concatenate([p.top_ids for p in parts]),
            np.concatenate([p.top_logp for p in parts]),
            np.concatenate([p.tail_ids for p in parts]),
            np.concatenate([p.tail_logp for p in parts]),
            np.concatenate([p.tail_mass for p in parts]),
            np.concatenate([p.next_tokens for p in parts]),
            np.concatenate([p.next_logp for p in parts]),
            n_ctx,
            parts[0].n_vocab,
            provenance,
        )

    @property
    def nbytes(self) -> int:
        arrays = (self.top_ids, self.top_logp, self.tail_ids, self.tail_logp, self.tail_mass, self.next_tokens,
                  self.next_logp)  # fmt: skip
        return sum(a.nbytes for a in arrays)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez(
                f, top_ids=self.top_ids, top_logp=self.top_logp, tail_ids=self.tail_ids, tail_logp=self.tail_logp,
                tail_mass=self.tail_mass, next_tokens=self.next_tokens, next_logp=self.next_logp,
                meta=np.array([self.n_ctx, self.n_vocab]),
                provenance=np.array(self.text_provenance),
            )  # fmt: skip

    @staticmethod
    def load(path: Path) -> CompactReference:
        try:
            with np.load(path) as z:
                n_ctx, n_vocab = (int(v) for v in z["meta"])
                return CompactReference(
                    z["top_ids"], z["top_logp"], z["tail_ids"], z["tail_logp"], z["tail_mass"], z["next_tokens"],
                    z["next_logp"], n_ctx, n_vocab, str(z["provenance"]),
                )  # fmt: skip
        except (OSError, KeyError, ValueError) as e:
            raise DynqError(f"{path}: not a dynq reference cache ({e}); delete it to rebuild") from None
