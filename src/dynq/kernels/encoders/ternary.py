"""Encoders of the ternary types TQ1_0 (base-3 packing, 1.6875 bits) and TQ2_0 (2 bits): y = d·t, t in {-1, 0, 1}.

llama.cpp ignores the imatrix and takes d = max |x|, which leaves most weights at 0. For a fixed d the best trits
are sign(x) where |x| > d/2, so the non-zero set is always the k largest |x| of the block, and for that set the
best d is the weighted mean of their |x|. Sorting |x| and scanning every k finds the exact weighted optimum; it is
then stored in fp16 and checked against llama.cpp's choice. Weights: the importance if given, else 1.
"""

from __future__ import annotations

import torch

from dynq.kernels.encoders import EncodeFn
from dynq.kernels.encoders.common import Encoded, blocks, fp16_round, row_importance
from dynq.kernels.encoders.packing import fp16_bytes, pack_bits

_QK_K = 256
_FP16_MAX = 65504.0


def _stored(d: torch.Tensor) -> torch.Tensor:
    """The fp16 value the scale field holds, clamped to fp16's finite range (never inf)."""
    return fp16_round(d.clamp(-_FP16_MAX, _FP16_MAX))


def _weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-element weights [n, nb, 256]; blocks whose importance is all zero fall back to 1."""
    qw = row_importance(importance, x)
    if qw is None:
        return torch.ones_like(blocks(x, _QK_K))
    w = blocks(qw, _QK_K)
    return torch.where(w.sum(dim=-1, keepdim=True) > 0, w, torch.ones_like(w))


def _optimal_scale(xb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """argmax over k of (Σ_top-k w|x|)² / Σ_top-k w, and its scale Σw|x| / Σw: [..., 1]."""
    mag, order = xb.abs().sort(dim=-1, descending=True)
    wsorted = w.gather(-1, order)
    cum_w = wsorted.cumsum(dim=-1)
    cum_wx = (wsorted * mag).cumsum(dim=-1)
    positive = cum_w > 0
    safe_w = torch.where(positive, cum_w, torch.ones_like(cum_w))
    score = torch.where(positive, cum_wx * cum_wx / safe_w, torch.zeros_like(cum_w))
    k = score.argmax(dim=-1, keepdim=True)
    return cum_wx.gather(-1, k) / safe_w.gather(-1, k)


def _trits(xb: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Nearest trit per element for the stored scale d (0 where d is 0)."""
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    return torch.round(xb * inv).clamp_(-1, 1)


def _error(xb: torch.Tensor, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return (_trits(xb, d).mul_(d).sub_(xb).square_().mul_(w)).sum(dim=-1, keepdim=True)


def _quantize(x: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored scale [n, nb, 1] and trits [n, nb, 256] with the lowest weighted error."""
    xb = blocks(x, _QK_K)
    w = _weights(x, importance)
    best_d = _stored(xb.abs().amax(dim=-1, keepdim=True))  # llama.cpp's choice
    best_err = _error(xb, w, best_d)
    d_opt = _stored(_optimal_scale(xb, w))
    for step in (0, -1, 1):  # the optimum and its fp16 neighbours
        bits = d_opt.to(torch.float16).view(torch.int16).to(torch.int32) + step
        d = bits.clamp(0, 0x7BFF).to(torch.int16).view(torch.float16).to(torch.float32)
        err = _error(xb, w, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d, best_d)
    return best_d, _trits(xb, best_d)


def _base3_bytes(trits: torch.Tensor, count: int) -> torch.Tensor:
    """Groups [..., count, m] of trits 0..2 -> m bytes: Σ t_n·3^(4-n), stored as ceil(v·256/243)."""
    powers = torch.tensor([81, 27, 9, 3, 1][:count], device=trits.device, dtype=torch.int32).reshape(count, 1)
    v = (trits * powers).sum(dim=-2)
    return ((v * 256 + 242) // 243).to(torch.uint8)


def encode_tq1_0(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    d, t = _quantize(x, importance)
    u = (t + 1).to(torch.int32)
    lead = u.shape[:-1]
    qs0 = _base3_bytes(u[..., :160].reshape(*lead, 5, 32), 5)  # byte m: elements m + 32n
    qs1 = _base3_bytes(u[..., 160:240].reshape(*lead, 5, 16), 5)  # byte m: elements 160 + m + 16n
    qh = _base3_bytes(u[..., 240:].reshape(*lead, 4, 4), 4)  # byte j: elements 240 + j + 4n
    data = torch.cat((qs0, qs1, qh, fp16_bytes(d.squeeze(-1))), dim=-1).reshape(x.shape[0], -1)
    return Encoded(data, (d * t).reshape(x.shape))


def encode_tq2_0(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    d, t = _quantize(x, importance)
    u = (t + 1).to(torch.int32)
    # byte m of 32-byte chunk c holds elements 128c + 32n + m at bits 2n
    chunks = u.reshape(*u.shape[:-1], 2, 4, 32).transpose(-1, -2)
    qs = pack_bits(chunks, 2).reshape(*u.shape[:-1], 64)
    data = torch.cat((qs, fp16_bytes(d.squeeze(-1))), dim=-1).reshape(x.shape[0], -1)
    return Encoded(data, (d * t).reshape(x.shape))


ENCODERS: dict[str, EncodeFn] = {"TQ1_0": encode_tq1_0, "TQ2_0": encode_tq2_0}
