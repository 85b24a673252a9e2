"""The reference model's predictions, kept compactly: per scored position the top-k log-probabilities, the
probability mass left outside them, the log-probability of the actual next token and the argmax.

llama-perplexity's `--kl-divergence-base` file stores the whole vocabulary for every position (two bytes per
token id: ~300 KB per position at a 152k vocabulary). The compact form stores k ids and log-probs; the KL divergence
is then computed over the top-k plus one bucket for the rest (a lower bound of the full sum by the log-sum
inequality, off by a small fraction when k covers most of the mass). `dynq eval` reports that error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dynq.errors import DynqError

F32Array = npt.NDArray[np.float32]


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
    next_tokens: npt.NDArray[np.int32]  # [n]
    next_logp: npt.NDArray[np.float32]  # [n]
    n_ctx: int
    n_vocab: int
    text_provenance: str

    @staticmethod
    def from_logits(logits: F32Array, next_tokens: npt.NDArray[np.int32], k: int) -> CompactReference:
        logp = log_softmax(logits)
        top = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
        order = np.take_along_axis(logp, top, axis=-1).argsort(axis=-1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=-1)
        rows = np.arange(len(next_tokens))
        return CompactReference(
            top.astype(np.int32),
            np.take_along_axis(logp, top, axis=-1).astype(np.float32),
            next_tokens.astype(np.int32),
            logp[rows, next_tokens].astype(np.float32),
            0,
            logits.shape[-1],
            "",
        )

    @staticmethod
    def concat(parts: list[CompactReference], n_ctx: int, provenance: str) -> CompactReference:
        return CompactReference(
            np.concatenate([p.top_ids for p in parts]),
            np.concatenate([p.top_logp for p in parts]),
            np.concatenate([p.next_tokens for p in parts]),
            np.concatenate([p.next_logp for p in parts]),
            n_ctx,
            parts[0].n_vocab,
            provenance,
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.top_ids, self.top_logp, self.next_tokens, self.next_logp))

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.savez(
                f, top_ids=self.top_ids, top_logp=self.top_logp, next_tokens=self.next_tokens,
                next_logp=self.next_logp, meta=np.array([self.n_ctx, self.n_vocab]),
                provenance=np.array(self.text_provenance),
            )  # fmt: skip
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> CompactReference:
        try:
            with np.load(path) as z:
                n_ctx, n_vocab = (int(v) for v in z["meta"])
                return CompactReference(
                    z["top_ids"], z["top_logp"], z["next_tokens"], z["next_logp"], n_ctx, n_vocab,
                    str(z["provenance"]),
                )  # fmt: skip
        except (OSError, KeyError, ValueError) as e:
            raise DynqError(f"{path}: not a dynq reference cache ({e}); delete it to rebuild") from None
