"""Encoders of the legacy 32-element block types: Q8_0, Q4_0, Q5_0 (one scale) and Q4_1, Q5_1 (scale and minimum).

llama.cpp rounds against one heuristic scale (or, with an imatrix, picks among 19 or 37 trial scales). Here every
trial scale is refitted by weighted least squares, judged after the fp16 rounding it is stored with (the raw trial
scale, llama.cpp's choice, stays a candidate), and the winner is refined once more: the elements are requantized
against the stored scale and the scale refitted. Weights follow llama.cpp: qw·sqrt(sigma2 + x²) with sigma2 the
row's mean square for Q4/Q5 with an imatrix; without one (llama.cpp's reference path) plain squared error; Q8_0,
where llama.cpp ignores the imatrix, minimizes the importance-weighted error directly.
"""

from __future__ import annotations

import torch

from dynq.kernels.encoders import EncodeFn
from dynq.kernels.encoders.common import Best, Encoded, blocks, ratio, row_importance, stored
from dynq.kernels.encoders.packing import fp16_bytes, pack_bits, u32_bytes

_QK = 32
_GROUP_MAX_EPS = 1e-15

# The trial grid, coarse then fine. A trial maps the block's extreme element to `target` on the integer grid
# (llama.cpp: -(nmax ± 0.9) for Q4_0/Q5_0, nmax ± 0.9 spanning max - min for Q4_1/Q5_1). Targets well inside the
# range use fewer levels, which pays off on tensors whose values already sit on a coarser grid.
_COARSE_STEP = 0.25
_FINE_DELTAS = (-0.2, -0.15, -0.1, -0.05, 0.05, 0.1, 0.15, 0.2)


_SLACK = 1e-6


def _symmetric_targets(nmax: int) -> list[float]:
    """llama.cpp's reference target first (it wins near-ties), then the grid."""
    negative = [-(nmax + 1.25) + _COARSE_STEP * i for i in range(2 * nmax + 6)]
    positive = [nmax - 1 - _COARSE_STEP * i for i in range(5)]
    return [-float(nmax)] + [t for t in negative if t != -nmax] + positive


def _asymmetric_targets(nmax: int) -> list[float]:
    return [float(nmax)] + [nmax + 1.5 - _COARSE_STEP * i for i in range(nmax + 6) if i != 6]


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return ratio(torch.ones_like(d), d)


def _signed_max(xb: torch.Tensor) -> torch.Tensor:
    """The element with the largest magnitude per block, sign kept: [..., 32] -> [..., 1]."""
    return xb.gather(-1, xb.abs().argmax(dim=-1, keepdim=True))


def _block_weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's Q4/Q5 weights per element, [n, nb, 32]: qw·sqrt(sigma2 + x²), or 1 on the reference path."""
    if importance is None:
        return torch.ones_like(blocks(x, _QK))
    qw = row_importance(importance, x)
    assert qw is not None
    sigma2 = (x * x).mean(dim=1, keepdim=True)
    return blocks(qw * torch.sqrt(sigma2 + x * x), _QK)


def _weighted_error(xb: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ w·(x - y)² per block; consumes y (in place)."""
    return y.sub_(xb).square_().mul_(w).sum(dim=-1, keepdim=True)


# --- one scale: y = d·L, L in [-nmax, nmax - 1] ---


def _round_symmetric(xb: torch.Tensor, d: torch.Tensor, nmax: int) -> torch.Tensor:
    """The nearest level for each element against scale d (0 where d is 0)."""
    return torch.round(xb * _inverse(d)).clamp(-nmax, nmax - 1)


def _search_symmetric(xb: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """The best stored scale over the trial grid, judged by the closed-form weighted error: [..., 1]."""
    mx = _signed_max(xb)
    live = mx.abs() >= _GROUP_MAX_EPS
    mx = torch.where(live, mx, torch.ones_like(mx))
    wx = w * xb
    wx2 = (wx * xb).sum(dim=-1, keepdim=True)
    level, scratch = torch.empty_like(xb), torch.empty_like(xb)
    best = Best(mx, torch.zeros_like(mx), torch.zeros_like(mx), slack=_SLACK * wx2)  # (scale, target)

    def trial(target: torch.Tensor | float) -> None:
        torch.mul(xb, target / mx, out=level)
        level.round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, level, out=scratch)
        slx = scratch.sum(dim=-1, keepdim=True)
        torch.mul(w, level, out=scratch).mul_(level)
        sl2 = scratch.sum(dim=-1, keepdim=True)
        target_t = torch.as_tensor(target, device=xb.device).expand_as(mx)
        # llama.cpp's raw trial scale and the least-squares refit, both as fp16 will hold them
        for d in (stored(mx / target), stored(ratio(slx, sl2))):
            best.offer(wx2 - 2 * d * slx + d * d * sl2, d, target_t)

    for target in _symmetric_targets(nmax):
        trial(target)
    coarse = best.params[1]
    for delta in _FINE_DELTAS:
        trial(coarse + delta)
    return torch.where(live, best.params[0], torch.zeros_like(mx))


def _refine_symmetric(xb: torch.Tensor, w: torch.Tensor, d: torch.Tensor, nmax: int) -> torch.Tensor:
    """Requantize against d, refit the scale, and keep whichever stored scale has the lower true error."""
    level = _round_symmetric(xb, d, nmax)
    best_err = _weighted_error(xb, w, d * level)
    refit = stored(ratio((w * xb * level).sum(-1, keepdim=True), (w * level * level).sum(-1, keepdim=True)))
    level = _round_symmetric(xb, refit, nmax)
    return torch.where(_weighted_error(xb, w, refit * level) < best_err, refit, d)


def _fp16_ulp_neighbours(d: torch.Tensor, steps: range) -> list[torch.Tensor]:
    """Stored scales a few fp16 steps away from d in magnitude (same sign), clamped to the finite range."""
    bits = d.abs().to(torch.float16).view(torch.int16).to(torch.int32)
    out = []
    for step in steps:
        b = (bits + step).clamp(0, 0x7BFF).to(torch.int16).view(torch.float16).to(torch.float32)
        out.append(torch.where(d < 0, -b, b))
    return out


def _search_q8(xb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Q8_0: llama.cpp's amax/127 against max/-128 and its fp16 neighbours, by the true weighted error."""
    mx = _signed_max(xb)
    candidates = [stored(mx.abs() / 127), *_fp16_ulp_neighbours(stored(mx / -128), range(-1, 3))]
    level, scratch = torch.empty_like(xb), torch.empty_like(xb)
    best = Best(mx, candidates[0])
    for d in candidates:
        torch.mul(xb, _inverse(d), out=level).round_().clamp_(-128, 127)
        torch.mul(level, d, out=scratch).sub_(xb).square_().mul_(w)
        best.offer(scratch.sum(dim=-1, keepdim=True), d)
    return _refine_symmetric(xb, w, best.params[0], 128)


# --- scale and minimum: y = d·L + m, L in [0, nmax] ---


def _fit_min(swx: torch.Tensor, sw: torch.Tensor, sl: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The stored minimum that best fits the levels once the scale d is fixed."""
    return stored(ratio(swx - d * sl, sw))


def _search_asymmetric(xb: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best stored (scale, minimum) over the trial grid, by the closed-form weighted error."""
    lo = xb.amin(dim=-1, keepdim=True)
    span = xb.amax(dim=-1, keepdim=True) - lo
    live = span > 0
    span = torch.where(live, span, torch.ones_like(span))
    shifted = xb - lo
    wx = w * xb
    sw, swx, swx2 = w.sum(-1, keepdim=True), wx.sum(-1, keepdim=True), (wx * xb).sum(-1, keepdim=True)
    level, scratch = torch.empty_like(xb), torch.empty_like(xb)
    lo16 = stored(lo)
    # (scale, minimum, target)
    best = Best(lo, torch.zeros_like(lo), lo16, torch.zeros_like(lo), slack=_SLACK * swx2)

    def trial(target: torch.Tensor | float) -> None:
        torch.mul(shifted, target / span, out=level)
        level.round_().clamp_(0, nmax)
        torch.mul(w, level, out=scratch)
        sl = scratch.sum(dim=-1, keepdim=True)
        sl2 = scratch.mul_(level).sum(dim=-1, keepdim=True)
        sxl = torch.mul(wx, level, out=scratch).sum(dim=-1, keepdim=True)
        det = sw * sl2 - sl * sl
        d_fit = stored(torch.where(det > 0, ratio(sw * sxl - swx * sl, det), torch.zeros_like(det)))
        d_raw = stored(span / target)
        target_t = torch.as_tensor(target, device=xb.device).expand_as(lo)
        pairs = ((d_raw, lo16), (d_raw, _fit_min(swx, sw, sl, d_raw)), (d_fit, _fit_min(swx, sw, sl, d_fit)))
        for d, m in pairs:
            err = swx2 + d * d * sl2 + m * m * sw - 2 * d * sxl - 2 * m * swx + 2 * d * m * sl
            best.offer(err, d, m, target_t)

    for target in _asymmetric_targets(nmax):
        trial(target)
    coarse = best.params[2]
    for delta in _FINE_DELTAS:
        trial(coarse + delta)
    d, m = best.params[0], best.params[1]
    return torch.where(live, d, torch.zeros_like(d)), m


def _round_asymmetric(xb: torch.Tensor, d: torch.Tensor, m: torch.Tensor, nmax: int) -> torch.Tensor:
    return torch.round((xb - m) * _inverse(d)).clamp(0, nmax)


def _decode_asymmetric(d: torch.Tensor, m: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """gguf-py's (d·q) + m, two float32 roundings."""
    return d * level + m


def _refine_asymmetric(
    xb: torch.Tensor, w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, nmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Requantize against the stored pair, refit both by weighted least squares, keep the better pair."""
    level = _round_asymmetric(xb, d, m, nmax)
    best_err = _weighted_error(xb, w, _decode_asymmetric(d, m, level))
    sw, swx = w.sum(-1, keepdim=True), (w * xb).sum(-1, keepdim=True)
    for _ in range(2):
        sl, sl2 = (w * level).sum(-1, keepdim=True), (w * level * level).sum(-1, keepdim=True)
        sxl = (w * xb * level).sum(-1, keepdim=True)
        det = sw * sl2 - sl * sl
        d_new = stored(torch.where(det > 0, ratio(sw * sxl - swx * sl, det), d))
        m_new = _fit_min(swx, sw, sl, d_new)
        level = _round_asymmetric(xb, d_new, m_new, nmax)
        err = _weighted_error(xb, w, _decode_asymmetric(d_new, m_new, level))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        d = torch.where(better, d_new, d)
        m = torch.where(better, m_new, m)
    return d, m


# --- byte layouts ---


def _nibbles(level: torch.Tensor) -> torch.Tensor:
    """16 bytes per block: element j in the low nibble of byte j, element j+16 in the high nibble."""
    low = level.to(torch.int32) & 0xF
    pairs = torch.stack((low[..., :16], low[..., 16:]), dim=-1)
    return pack_bits(pairs.reshape(*level.shape[:-1], _QK), 4)


def _fifth_bits(level: torch.Tensor) -> torch.Tensor:
    """qh: bit j of a little-endian u32 holds bit 4 of element j."""
    high = (level.to(torch.int64) >> 4) & 1
    shifts = torch.arange(_QK, device=level.device, dtype=torch.int64)
    return u32_bytes((high << shifts).sum(dim=-1))


def _rows(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    return torch.cat(parts, dim=-1).reshape(n, -1)


def _encode_symmetric(x: torch.Tensor, importance: torch.Tensor | None, nmax: int) -> Encoded:
    xb = blocks(x, _QK)
    w = _block_weights(x, importance)
    d = _refine_symmetric(xb, w, _search_symmetric(xb, w, nmax), nmax)
    level = _round_symmetric(xb, d, nmax)
    values = (d * level).reshape(x.shape)
    q = (level + nmax).to(torch.int32)
    parts = [fp16_bytes(d.squeeze(-1))]
    if nmax == 16:
        parts.append(_fifth_bits(q))
    parts.append(_nibbles(q))
    return Encoded(_rows(parts, x.shape[0]), values)


def _encode_asymmetric(x: torch.Tensor, importance: torch.Tensor | None, nmax: int) -> Encoded:
    xb = blocks(x, _QK)
    w = _block_weights(x, importance)
    d, m = _refine_asymmetric(xb, w, *_search_asymmetric(xb, w, nmax), nmax)
    level = _round_asymmetric(xb, d, m, nmax)
    values = _decode_asymmetric(d, m, level).reshape(x.shape)
    q = level.to(torch.int32)
    parts = [fp16_bytes(d.squeeze(-1)), fp16_bytes(m.squeeze(-1))]
    if nmax == 31:
        parts.append(_fifth_bits(q))
    parts.append(_nibbles(q))
    return Encoded(_rows(parts, x.shape[0]), values)


def encode_q8_0(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    xb = blocks(x, _QK)
    qw = row_importance(importance, x)
    w = torch.ones_like(xb) if qw is None else blocks(qw, _QK)
    d = _search_q8(xb, w)
    level = _round_symmetric(xb, d, 128)
    q = (level.to(torch.int32) & 0xFF).to(torch.uint8)
    return Encoded(_rows([fp16_bytes(d.squeeze(-1)), q], x.shape[0]), (d * level).reshape(x.shape))


def encode_q4_0(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    return _encode_symmetric(x, importance, 8)


def encode_q5_0(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    return _encode_symmetric(x, importance, 16)


def encode_q4_1(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    return _encode_asymmetric(x, importance, 15)


def encode_q5_1(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    return _encode_asymmetric(x, importance, 31)


ENCODERS: dict[str, EncodeFn] = {
    "Q8_0": encode_q8_0,
    "Q4_0": encode_q4_0,
    "Q4_1": encode_q4_1,
    "Q5_0": encode_q5_0,
    "Q5_1": encode_q5_1,
}
