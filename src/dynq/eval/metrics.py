"""How the field judges a quant against its reference, with llama-perplexity's definitions: perplexity over the
second half of every chunk, KL divergence per token (mean, median, tail percentiles, max), top-1 agreement, and the
RMS of the change in the probability of the actual next token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dynq.core.arrays import F32Array
from dynq.eval.reference import CompactReference, log_softmax

F64Array = npt.NDArray[np.float64]


def kld_estimate(ref: CompactReference, rows: slice, q_logp: F64Array) -> F64Array:
    """KL(ref || quant) per position: exact over the reference's top-k, sampled over the rest (unbiased)."""
    p_logp = ref.top_logp[rows].astype(np.float64)
    q_top = np.take_along_axis(q_logp, ref.top_ids[rows].astype(np.int64), axis=-1)
    head: F64Array = (np.exp(p_logp) * (p_logp - q_top)).sum(axis=-1)
    if ref.tail_ids.shape[1] == 0:
        return head
    q_tail = np.take_along_axis(q_logp, ref.tail_ids[rows].astype(np.int64), axis=-1)
    tail = ref.tail_mass[rows].astype(np.float64) * (ref.tail_logp[rows].astype(np.float64) - q_tail).mean(axis=-1)
    out: F64Array = head + tail
    return out


def kld_full(ref_logits: F32Array, q_logp: F64Array) -> F64Array:
    p_logp = log_softmax(ref_logits)
    out: F64Array = (np.exp(p_logp) * (p_logp - q_logp)).sum(axis=-1)
    return out


@dataclass
class Scores:
    """Per-position results, appended chunk by chunk."""

    nll_quant: list[F64Array] = field(default_factory=list)
    nll_ref: list[F64Array] = field(default_factory=list)
    kld: list[F64Array] = field(default_factory=list)
    top1: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    dp: list[F64Array] = field(default_factory=list)

    def add(self, ref: CompactReference, rows: slice, quant_logits: F32Array) -> None:
        q_logp = log_softmax(quant_logits)
        nxt = ref.next_tokens[rows].astype(np.int64)
        q_next = q_logp[np.arange(len(nxt)), nxt]
        self.nll_quant.append(-q_next)
        self.nll_ref.append(-ref.next_logp[rows].astype(np.float64))
        self.kld.append(kld_estimate(ref, rows, q_logp))
        self.top1.append(q_logp.argmax(axis=-1) == ref.top_ids[rows, 0])
        self.dp.append(np.exp(q_next) - np.exp(ref.next_logp[rows].astype(np.float64)))

    def summary(self) -> dict[str, Any]:
        kld = np.concatenate(self.kld)
        dp = np.concatenate(self.dp)
        return {
            "tokens": int(kld.size),
            "ppl": float(np.exp(np.concatenate(self.nll_quant).mean())),
            "ref_ppl": float(np.exp(np.concatenate(self.nll_ref).mean())),
            "kld_mean": float(kld.mean()),
            "kld_median": float(np.median(kld)),
            "kld_p90": float(np.percentile(kld, 90)),
            "kld_p99": float(np.percentile(kld, 99)),
            "kld_p999": float(np.percentile(kld, 99.9)),
            "kld_max": float(kld.max()),
            "kld_over_1": float((kld > 1.0).mean()),  # the share of tokens whose distribution the quant lost
            "top1": float(np.concatenate(self.top1).mean()),
            "dp_rms": float(np.sqrt((dp**2).mean())),
        }
