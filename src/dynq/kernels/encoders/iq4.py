"""Encoders of the non-linear 4-bit types IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks of eight
32-element blocks with 6-bit sub-scales): y = scale·kvalues[q].

Each 32-element block's scale comes from a wider trial grid than llama.cpp's 15 trials, on both signs, with the
least-squares refit of every trial. IQ4_NL then stores it in fp16 and requantizes against the stored value. IQ4_XS
tries several super-block scales, and for each picks every sub-scale among its three nearest 6-bit values by the
true error of the requantized block, then refits the super-block scale once. Weights follow llama.cpp with an
imatrix: qw·sqrt(sigma2 + x²), sigma2 = 2·Σx²/super-block size. Without one llama.cpp weighs by x², which lets the
small values go badly wrong once the search is exhaustive; x² + sigma2/4 (llama.cpp's IQ2_S rule) does not.
"""

from __future__ import annotations

import torch

from dynq.kernels.encoders import EncodeFn
from dynq.kernels.encoders.common import Best, Encoded, blocks, ratio, row_importance, stored
from dynq.kernels.encoders.packing import fp16_bytes, pack_bits, u16_bytes

_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_QK = 32
_QK_K = 256
_HALF_BINS = 256  # |2v| beyond the outer kvalues all map to the ends
_GROUP_MAX_EPS = 1e-15
# Where a trial maps the block's largest-magnitude element on the kvalues axis (llama.cpp: -134 .. -120 and +127),
# coarse then fine around the coarse winner.
# llama.cpp-like -127 comes first so that it wins near-ties.
_COARSE_TARGETS = [-127.0] + [-142.5 + 2.5 * i for i in range(16)] + [99.0 + 4.0 * i for i in range(8)]
_SLACK = 1e-6
_FINE_DELTAS = (-1.2, -0.6, 0.6, 1.2)
# Super-block scale trials for IQ4_XS: the largest sub-scale maps to this 6-bit level (llama.cpp: -32).
_SUPER_TARGETS = (-32.0, -31.5, -31.0, -30.0, 31.0, 30.5)


class _Table:
    """kvalues and a lookup of the nearest one by half-unit bins, on the device of the rows.

    Every midpoint between neighbouring kvalues is a multiple of 0.5, so floor(2v) decides the nearest kvalue
    exactly (a midpoint goes up, as llama.cpp's best_index_int8); a table lookup is much faster than bucketize."""

    def __init__(self, device: torch.device) -> None:
        self.values = torch.tensor(_KVALUES, dtype=torch.float32, device=device)
        twice_mids = self.values[1:] + self.values[:-1]
        bins = torch.arange(-_HALF_BINS, _HALF_BINS + 1, device=device, dtype=torch.float32)
        self.index = (bins.unsqueeze(-1) >= twice_mids).sum(dim=-1)
        self.value = self.values[self.index]

    def _bins(self, v: torch.Tensor) -> torch.Tensor:
        return (v * 2).floor_().clamp_(-_HALF_BINS, _HALF_BINS).add_(_HALF_BINS).to(torch.int64).reshape(-1)

    def nearest(self, v: torch.Tensor) -> torch.Tensor:
        """Index of the nearest kvalue per element."""
        return self.index.index_select(0, self._bins(v)).reshape(v.shape)

    def nearest_value(self, v: torch.Tensor) -> torch.Tensor:
        return self.value.index_select(0, self._bins(v)).reshape(v.shape)


def _weights(x: torch.Tensor, importance: torch.Tensor | None, super_block: int) -> torch.Tensor:
    """llama.cpp's IQ4 weights, [n, k/32, 32]; without an imatrix x² plus a floor (see the module docs)."""
    xs = blocks(x, super_block)
    sigma2 = (xs * xs).sum(dim=-1, keepdim=True) * (2.0 / super_block)
    if importance is None:
        return blocks((xs * xs + 0.25 * sigma2).reshape(x.shape), _QK)
    qw = row_importance(importance, x)
    assert qw is not None
    return blocks((blocks(qw, super_block) * torch.sqrt(sigma2 + xs * xs)).reshape(x.shape), _QK)


def _quantized_sums(
    xb: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, inv_scale: torch.Tensor, table: _Table
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σw·x·q and Σw·q² per block with q = the nearest kvalue of x·inv_scale."""
    q = table.nearest_value(xb * inv_scale)
    sqx = (wx * q).sum(dim=-1, keepdim=True)
    sq2 = q.mul_(q).mul_(w).sum(dim=-1, keepdim=True)
    return sqx, sq2


def _block_scales(xb: torch.Tensor, w: torch.Tensor, table: _Table, to_fp16: bool) -> torch.Tensor:
    """The best scale per 32-element block [..., 1] (stored in fp16 during the search when `to_fp16`)."""
    mx = xb.gather(-1, xb.abs().argmax(dim=-1, keepdim=True))
    live = mx.abs() >= _GROUP_MAX_EPS
    mx = torch.where(live, mx, torch.ones_like(mx))
    wx = w * xb
    wx2 = (wx * xb).sum(dim=-1, keepdim=True)
    best = Best(mx, torch.zeros_like(mx), torch.zeros_like(mx), slack=_SLACK * wx2)  # (scale, target)

    def trial(target: torch.Tensor | float) -> None:
        sqx, sq2 = _quantized_sums(xb, w, wx, target / mx, table)
        target_t = torch.as_tensor(target, device=xb.device).expand_as(mx)
        for d in (mx / target, ratio(sqx, sq2)):
            d = stored(d) if to_fp16 else d
            best.offer(wx2 - 2 * d * sqx + d * d * sq2, d, target_t)

    for target in _COARSE_TARGETS:
        trial(target)
    coarse = best.params[1]
    for delta in _FINE_DELTAS:
        trial(coarse + delta)
    return torch.where(live, best.params[0], torch.zeros_like(mx))


def _requantize(xb: torch.Tensor, scale: torch.Tensor, table: _Table) -> torch.Tensor:
    """Nearest kvalue index per element against the given (stored) scale."""
    return table.nearest(xb * ratio(torch.ones_like(scale), scale))


def _block_error(xb: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ w·(x - y)² per block; consumes y."""
    return y.sub_(xb).square_().mul_(w).sum(dim=-1, keepdim=True)


def _nibbles(index: torch.Tensor) -> torch.Tensor:
    """16 bytes per 32-element block: element j in the low nibble of byte j, element j+16 in the high nibble."""
    q = index.to(torch.int32)
    pairs = torch.stack((q[..., :16], q[..., 16:]), dim=-1)
    return pack_bits(pairs.reshape(*q.shape[:-1], _QK), 4)


def encode_iq4_nl(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    table = _Table(x.device)
    xb = blocks(x, _QK)
    w = _weights(x, importance, _QK)
    d = _block_scales(xb, w, table, to_fp16=True)
    index = _requantize(xb, d, table)
    # one refit against the requantized values, kept where it lowers the true error
    q = table.values[index]
    refit = stored(ratio((w * xb * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)))
    refit_index = _requantize(xb, refit, table)
    better = _block_error(xb, w, refit * table.values[refit_index]) < _block_error(xb, w, d * q)
    d = torch.where(better, refit, d)
    index = torch.where(better, refit_index, index)
    values = (d * table.values[index]).reshape(x.shape)
    data = torch.cat((fp16_bytes(d.squeeze(-1)), _nibbles(index)), dim=-1).reshape(x.shape[0], -1)
    return Encoded(data, values)


def _sub_scales(
    xs: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, d: torch.Tensor, table: _Table
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a super-block scale d [..., 1, 1]: the best 6-bit level l per sub-block [..., 8, 1] among the three
    nearest to scale/d, and the super-block's total error with them [..., 1, 1]."""
    nearest = torch.round(scales * ratio(torch.ones_like(d), d)).clamp(-32, 31)
    best = Best(scales, nearest)
    wx = w * xs
    for step in (0, -1, 1):
        level = (nearest + step).clamp(-32, 31)
        dl = d * level
        sqx, sq2 = _quantized_sums(xs, w, wx, ratio(torch.ones_like(dl), dl), table)
        best.offer(dl * (dl * sq2 - 2 * sqx), level)  # error less the constant Σw·x²
    return best.params[0], best.err.sum(dim=-2, keepdim=True)


def _super_scale(xs: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, table: _Table) -> torch.Tensor:
    """The stored super-block scale [..., 1, 1] with the lowest total error over the trials and one refit."""
    mx = scales.gather(-2, scales.abs().argmax(dim=-2, keepdim=True))
    best = Best(mx, torch.zeros_like(mx))
    for target in _SUPER_TARGETS:
        d = stored(mx / target)
        _, err = _sub_scales(xs, w, scales, d, table)
        best.offer(err, d)
    # refit d to the chosen levels and their requantized values
    d = best.params[0]
    level, _ = _sub_scales(xs, w, scales, d, table)
    q = table.values[_requantize(xs, d * level, table)] * level
    refit = stored(ratio((w * xs * q).sum((-2, -1), keepdim=True), (w * q * q).sum((-2, -1), keepdim=True)))
    _, err = _sub_scales(xs, w, scales, refit, table)
    best.offer(err, refit)
    return best.params[0]


def encode_iq4_xs(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    table = _Table(x.device)
    n = x.shape[0]
    w = _weights(x, importance, _QK_K).reshape(n, -1, 8, _QK)
    xs = x.reshape(n, -1, 8, _QK)
    scales = _block_scales(xs, w, table, to_fp16=False)
    d = _super_scale(xs, w, scales, table)
    level, _ = _sub_scales(xs, w, scales, d, table)
    dl = d * level
    index = _requantize(xs, dl, table)
    values = (dl * table.values[index]).reshape(x.shape)
    biased = (level.squeeze(-1) + 32).to(torch.int32)  # [n, nb, 8]
    shifts = torch.arange(0, 16, 2, device=x.device, dtype=torch.int32)
    scales_h = u16_bytes(((biased >> 4) << shifts).sum(dim=-1))
    scales_l = pack_bits(biased & 0xF, 4)
    qs = _nibbles(index).reshape(n, -1, 128)
    data = torch.cat((fp16_bytes(d.reshape(n, -1)), scales_h, scales_l, qs), dim=-1).reshape(n, -1)
    return Encoded(data, values)


ENCODERS: dict[str, EncodeFn] = {"IQ4_NL": encode_iq4_nl, "IQ4_XS": encode_iq4_xs}
