"""The K-quant encoders Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (256-element super-blocks), batched over all blocks.

Each encoder follows llama.cpp's search (quantize_row_qN_K_impl with an imatrix, the _ref path without one):
a scale (and min) per sub-block from a candidate search, then the super-block's fp16 scale(s) and the 4/6/8-bit
sub-scales. It then goes further than llama.cpp: with the stored fp16 fields fixed it re-chooses every sub-scale
(and sub-min) among its integer neighbours by the true error of the requantized elements, refits the fp16
super-block scale(s) by least squares, and repeats, keeping a change only where it lowers the error. That error is
Σ importance·(x - y)² (plain squared error without an imatrix); llama.cpp's own weights steer only the first search.

Shapes: a batch of rows [n, k] is viewed as super-blocks [B, J, S] (B = n·k/256 super-blocks, J sub-blocks of S).
The continuous searches run on super-blocks normalized by their largest |x| (overflow-safe and scale-free); the
refinement and the values run on the real scale, with the float32 operation order of gguf-py's dequantizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynq.kernels.encoders import EncodeFn
from dynq.kernels.encoders.common import FP16_MAX, Encoded, fp16_round
from dynq.kernels.encoders.packing import fp16_bytes, pack_bits

QK_K = 256
_GROUP_MAX_EPS = 1e-15  # llama.cpp's "all zero" threshold for a group's largest value
_ERR_MAX = 1e38  # errors are clamped here so that overflowing blocks compare equal instead of inf - inf = NaN


# ---------------------------------------------------------------------------------------------------------------------
# Small tensor helpers. Comparisons and torch.where are many times slower than arithmetic on CPU, so the candidate
# loops keep their bests with float masks (1.0 where a candidate wins) and blends.


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1/x, and 0 where x is 0 (or so small that 1/x overflows)."""
    return (1.0 / x).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a/b, and 0 where b is 0 (or the quotient overflows)."""
    return (a / b).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _positive(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x > 0, else 0.0."""
    return x.sign().clamp_(min=0.0)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a·b over the last axis, as a batched matrix product (about twice as fast as (a*b).sum on CPU)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _blend(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new where mask is 1, old where it is 0 (exact for the small integers it carries)."""
    return old + mask * (new - old)


def _fp16_field(x: torch.Tensor) -> torch.Tensor:
    """The float32 value an fp16 field holds, clamped to fp16's finite range (a stored scale is never inf/NaN)."""
    x = torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)
    return fp16_round(x.clamp(-FP16_MAX, FP16_MAX))


def _row_blocks(x: torch.Tensor, sub: int) -> torch.Tensor:
    """[n, k] rows -> [B, J, sub] super-blocks split into sub-blocks."""
    return x.reshape(-1, QK_K // sub, sub)


def _block_importance(importance: torch.Tensor | None, x: torch.Tensor, sub: int) -> torch.Tensor | None:
    """The per-column importance [k] laid out like `_row_blocks(x, sub)`."""
    if importance is None:
        return None
    n, k = x.shape
    imp = importance.to(device=x.device, dtype=torch.float32).reshape(1, k // QK_K, QK_K // sub, sub)
    return imp.expand(n, -1, -1, -1).reshape(-1, QK_K // sub, sub)


def _normalize(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Super-blocks divided by their largest |x|, and that largest |x| [B] (0 for zero or subnormal blocks)."""
    amax = xb.abs().amax(dim=(1, 2))
    inv = _safe_reciprocal(amax)
    return xb * inv[:, None, None], amax * _positive(inv)


def _sigma_weights(xn: torch.Tensor, imp: torch.Tensor, factor: float) -> torch.Tensor:
    """llama.cpp's imatrix weights qw·sqrt(sigma2 + x²), sigma2 = factor·Σx²/256 over the super-block."""
    x2 = xn * xn
    sigma2 = factor * x2.sum(dim=(1, 2), keepdim=True) / QK_K
    return imp * torch.sqrt(sigma2 + x2)


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp's per-group solvers, batched over the leading dimensions


def _fit_scale_min(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qkx2/qkx3_quants: x ≈ scale·L - the_min with L in [0, nmax]; returns (scale, the_min ≥ 0).

    Tries nstep+1 inverse scales (rmin + rdelta·i + nmax)/(max - min) and, for each, the weighted least-squares
    (scale, min) of its rounded L (min clamped ≤ 0); keeps the lowest weighted |error| (mad) or squared error."""
    lo = x.amin(dim=-1).clamp(max=0.0)
    span = x.amax(dim=-1) - lo
    inv_span = _safe_reciprocal(span)
    shifted = x - lo.unsqueeze(-1)
    wx = w * x
    sum_w, sum_x, sum_x2 = w.sum(dim=-1), wx.sum(dim=-1), (wx * x).sum(dim=-1)

    def error(
        scale: torch.Tensor, low: torch.Tensor, levels: torch.Tensor, sums: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        if mad:
            diff = levels * scale.unsqueeze(-1) + low.unsqueeze(-1) - x
            return _dot(w, diff.abs_())
        # Σw(scale·l + low - x)² expanded over the sums at hand: no pass over the elements
        sum_l, sum_l2, sum_xl = sums
        err = scale * (scale * sum_l2 + 2 * low * sum_l - 2 * sum_xl) + low * (low * sum_w - 2 * sum_x) + sum_x2
        return err.clamp_(min=0.0)

    def level_sums(levels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        wl = w * levels
        return wl.sum(dim=-1), _dot(wl, levels), _dot(wx, levels)

    levels = (shifted * (nmax * inv_span).unsqueeze(-1)).round_().clamp_(0, nmax)
    best_scale = span / nmax
    best_min = lo
    best_err = error(best_scale, best_min, levels, level_sums(levels))
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) * inv_span
        levels = (shifted * iscale.unsqueeze(-1)).round_().clamp_(0, nmax)
        sums = level_sums(levels)
        sum_l, sum_l2, sum_xl = sums
        det = sum_w * sum_l2 - sum_l * sum_l
        scale = _safe_div(sum_w * sum_xl - sum_x * sum_l, det)
        low = _safe_div(sum_l2 * sum_x - sum_l * sum_xl, det)
        scale = _blend(_positive(low), _safe_div(sum_xl, sum_l2), scale)
        low = low.clamp_(max=0.0)
        err = error(scale, low, levels, sums)
        better = _positive(det) * _positive(best_err - err)
        best_err = _blend(better, err, best_err)
        best_scale = _blend(better, scale, best_scale)
        best_min = _blend(better, low, best_min)
    return best_scale * _positive(span), -best_min


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The value with the largest |x| along the last axis (its sign kept; the positive one on a tie)."""
    hi, lo = x.amax(dim=-1), x.amin(dim=-1)
    return torch.where(hi >= -lo, hi, lo)


def _fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants (rmse_type 1, weights w): x ≈ scale·L with L in [-nmax, nmax-1]; returns (scale, L).

    The 19 inverse scales -(nmax + 0.1·i)/max, i in [-9, 9], each give the least-squares scale of their rounded L;
    the one with the largest Σwxl²/Σwl² wins (the scale is negative when the signed max is positive)."""
    vmax = _signed_max(x)
    inv_max = _safe_reciprocal(vmax) * _positive(vmax.abs() - _GROUP_MAX_EPS)
    wx = w * x
    best_scale = torch.zeros_like(vmax)
    best_fit = torch.zeros_like(vmax)
    best_iscale = -nmax * inv_max
    for i in (0, *range(-9, 0), *range(1, 10)):
        iscale = -(nmax + 0.1 * i) * inv_max
        levels = (x * iscale.unsqueeze(-1)).round_().clamp_(-nmax, nmax - 1)
        sum_lx, sum_l2 = _dot(wx, levels), _dot(w * levels, levels)
        scale = _safe_div(sum_lx, sum_l2)
        better = torch.ones_like(vmax) if i == 0 else _positive(sum_lx * sum_lx - best_fit * sum_l2)
        best_scale = _blend(better, scale, best_scale)
        best_fit = _blend(better, scale * sum_lx, best_fit)
        best_iscale = _blend(better, iscale, best_iscale)
    levels = (x * best_iscale.unsqueeze(-1)).round_().clamp_(-nmax, nmax - 1)
    return best_scale, levels


def _fit_positive(v: torch.Tensor, w: torch.Tensor, nmax: int, passes: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: non-negative v [B, J] ≈ scale·L with L in [0, nmax]; returns (scale [B], L [B, J]).

    Picks the inverse scale (nmax + 0.1·i)/max, i in [-4, 4], with the lowest weighted error, then improves L one
    entry at a time while that raises Σwvl²/Σwl² (llama.cpp sweeps the entries in order; here each pass changes the
    entry that helps most, so all blocks move together), and returns the least-squares scale Σwvl/Σwl²."""
    vmax = v.amax(dim=-1).clamp(min=0.0)
    inv_max = torch.where(vmax >= _GROUP_MAX_EPS, _safe_reciprocal(vmax), torch.zeros_like(vmax))
    best_err = torch.full_like(vmax, float("inf"))
    best_iscale = nmax * inv_max
    for i in (0, -4, -3, -2, -1, 1, 2, 3, 4):
        iscale = (nmax + 0.1 * i) * inv_max
        levels = (v * iscale.unsqueeze(-1)).round_().clamp_(0, nmax)
        diff = v - _safe_reciprocal(iscale).unsqueeze(-1) * levels
        err = (w * diff * diff).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_iscale = torch.where(better, iscale, best_iscale)
    levels = (v * best_iscale.unsqueeze(-1)).round_().clamp_(0, nmax)
    wv = w * v
    sum_lv, sum_l2 = (wv * levels).sum(dim=-1), (w * levels * levels).sum(dim=-1)
    for _ in range(passes):
        rest_lv = sum_lv.unsqueeze(-1) - wv * levels
        rest_l2 = sum_l2.unsqueeze(-1) - w * levels * levels
        usable = (rest_lv > 0) & (rest_l2 > 0)
        proposal = (v * _safe_div(rest_l2, rest_lv)).round_().clamp_(0, nmax)
        new_lv = rest_lv + wv * proposal
        new_l2 = rest_l2 + w * proposal * proposal
        gain = _safe_div(new_lv * new_lv, new_l2) - _safe_div(sum_lv * sum_lv, sum_l2).unsqueeze(-1)
        gain = torch.where(usable & (proposal != levels) & (new_l2 > 0), gain, torch.zeros_like(gain))
        best_gain, at = gain.max(dim=-1, keepdim=True)
        change = (best_gain > 0) & (torch.arange(v.shape[-1], device=v.device) == at)
        levels = torch.where(change, proposal, levels)
        sum_lv, sum_l2 = (wv * levels).sum(dim=-1), (w * levels * levels).sum(dim=-1)
    return _safe_div(sum_lv, sum_l2), levels


def _linear_levels(v: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The _ref paths' sub-scale quantization: L = round(nmax/max·v) ≤ nmax, scale max/nmax."""
    vmax = v.amax(dim=-1).clamp(min=0.0)
    levels = (v * (nmax * _safe_reciprocal(vmax)).unsqueeze(-1)).round_().clamp_(0, nmax)
    return vmax / nmax, levels


# ---------------------------------------------------------------------------------------------------------------------
# Stored-value refinement: asymmetric types (y = d·s·q - dmin·m) and symmetric ones (y = d·s·q)


@dataclass(frozen=True)
class _Target:
    """What the refinement fits: super-blocks x [B, J, S] and the weights w of its squared error."""

    x: torch.Tensor
    w: torch.Tensor
    root_w: torch.Tensor  # sqrt(w): Σw·r² is then one dot product of r·sqrt(w) with itself

    @staticmethod
    def of(x: torch.Tensor, w: torch.Tensor) -> _Target:
        return _Target(x, w, w.clamp(min=0.0).sqrt())

    def error(self, r: torch.Tensor) -> torch.Tensor:
        """Σw·r² per sub-block [B, J] for residuals r (overwritten)."""
        r = r.mul_(self.root_w)
        return _dot(r, r).clamp_(max=_ERR_MAX)


@dataclass
class _Asymmetric:
    d: torch.Tensor  # [B] fp16 super-block scale, as float32
    dmin: torch.Tensor  # [B] fp16 super-block min scale
    scale: torch.Tensor  # [B, J] integer sub-scales (float32)
    low: torch.Tensor  # [B, J] integer sub-mins (float32)
    err: torch.Tensor  # [B, J] weighted squared error of each sub-block with its best levels


def _asym_values(
    d: torch.Tensor, dmin: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """gguf-py's Q2_K/Q4_K/Q5_K dequantization order: (d·s)·q - (dmin·m)."""
    dl = (d.unsqueeze(-1) * scale).unsqueeze(-1)
    ml = (dmin.unsqueeze(-1) * low).unsqueeze(-1)
    return dl * q - ml


def _asym_levels(x: torch.Tensor, st: _Asymmetric, qmax: int) -> torch.Tensor:
    """The best level of every element for the stored scales: round((x + dmin·m)/(d·s)) in [0, qmax]."""
    dl = st.d.unsqueeze(-1) * st.scale
    ml = st.dmin.unsqueeze(-1) * st.low
    return ((x + ml.unsqueeze(-1)) * _safe_reciprocal(dl).unsqueeze(-1)).round_().clamp_(0, qmax)


def _asym_error(t: _Target, shifted: torch.Tensor, dl: torch.Tensor, qmax: int) -> torch.Tensor:
    """Σw(y - x)² per sub-block [B, J] for sub-block scale dl, each element at its best level; shifted = x + ml."""
    r = (shifted * _safe_reciprocal(dl).unsqueeze(-1)).round_().clamp_(0, qmax)
    return t.error(r.mul_(dl.unsqueeze(-1)).sub_(shifted))  # y - x = dl·q - (x + ml)


def _asym_state(
    t: _Target, d: torch.Tensor, dmin: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, qmax: int
) -> _Asymmetric:
    shifted = t.x + (dmin.unsqueeze(-1) * low).unsqueeze(-1)
    return _Asymmetric(d, dmin, scale, low, _asym_error(t, shifted, d.unsqueeze(-1) * scale, qmax))


def _asym_search_sub_scales(t: _Target, st: _Asymmetric, qmax: int, smax: int, radius: int) -> _Asymmetric:
    """Each sub-block's best (s, m) among s ± radius, m ± radius for the stored d, dmin, by true error."""
    best_scale, best_low, best_err = st.scale, st.low, st.err
    d, dmin = st.d.unsqueeze(-1), st.dmin.unsqueeze(-1)
    for dm in range(-radius, radius + 1):
        low = (st.low + dm).clamp_(0, smax)
        shifted = t.x + (dmin * low).unsqueeze(-1)
        for ds in range(-radius, radius + 1):
            if ds == 0 and dm == 0:
                continue
            scale = (st.scale + ds).clamp_(0, smax)
            err = _asym_error(t, shifted, d * scale, qmax)
            better = _positive(best_err - err)
            best_scale = _blend(better, scale, best_scale)
            best_low = _blend(better, low, best_low)
            best_err = torch.minimum(best_err, err)
    return _Asymmetric(st.d, st.dmin, best_scale, best_low, best_err)


def _asym_refit_supers(t: _Target, st: _Asymmetric, qmax: int) -> _Asymmetric:
    """Least-squares d, dmin for the current levels and sub-scales, stored as fp16; kept where it lowers the error."""
    x, w = t.x, t.w
    a = _asym_levels(x, st, qmax).mul_(st.scale.unsqueeze(-1))
    wa = w * a
    s_aa = _dot(wa, a).sum(dim=-1)
    s_ax = _dot(wa, x).sum(dim=-1)
    s_ab = (wa.sum(dim=-1) * st.low).sum(dim=-1)
    s_bb = (w.sum(dim=-1) * st.low * st.low).sum(dim=-1)
    s_bx = (_dot(w, x) * st.low).sum(dim=-1)
    det = s_aa * s_bb - s_ab * s_ab
    joint = det > 1e-6 * s_aa * s_bb
    d = torch.where(joint, _safe_div(s_ax * s_bb - s_ab * s_bx, det), _safe_div(s_ax + st.dmin * s_ab, s_aa))
    dmin = torch.where(joint, _safe_div(s_ab * s_ax - s_aa * s_bx, det), st.dmin)
    negative = dmin < 0  # keep the min scale non-negative, as llama.cpp always stores it
    d = torch.where(negative, _safe_div(s_ax, s_aa), d)
    dmin = torch.where(negative, torch.zeros_like(dmin), dmin)
    cand = _asym_state(t, _fp16_field(d), _fp16_field(dmin), st.scale, st.low, qmax)
    better = cand.err.sum(dim=-1) < st.err.sum(dim=-1)
    return _Asymmetric(
        torch.where(better, cand.d, st.d),
        torch.where(better, cand.dmin, st.dmin),
        st.scale,
        st.low,
        torch.where(better.unsqueeze(-1), cand.err, st.err),
    )


def _asym_refine(t: _Target, st: _Asymmetric, qmax: int, smax: int) -> _Asymmetric:
    """A wide sub-scale search, then rounds of (refit d, dmin; narrow sub-scale search)."""
    st = _asym_search_sub_scales(t, st, qmax, smax, _ASYM_FIRST_RADIUS)
    for _ in range(_ROUNDS):
        st = _asym_refit_supers(t, st, qmax)
        st = _asym_search_sub_scales(t, st, qmax, smax, _ASYM_RADIUS)
    return st


@dataclass
class _Symmetric:
    d: torch.Tensor  # [B] fp16 super-block scale, as float32
    scale: torch.Tensor  # [B, J] signed integer sub-scales (float32)
    err: torch.Tensor  # [B, J] weighted squared error of each sub-block with its best levels


def _sym_values(d: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """gguf-py's Q3_K/Q6_K dequantization order: (d·s)·q."""
    return (d.unsqueeze(-1) * scale).unsqueeze(-1) * q


def _sym_levels(x: torch.Tensor, st: _Symmetric, qmin: int, qmax: int) -> torch.Tensor:
    """The best level of every element for the stored scales: round(x/(d·s)) in [qmin, qmax]."""
    inv = _safe_reciprocal(st.d.unsqueeze(-1) * st.scale).unsqueeze(-1)
    return (x * inv).round_().clamp_(qmin, qmax)


def _sym_error(t: _Target, dl: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Σw(y - x)² per sub-block [B, J] for sub-block scale dl, each element at its best level."""
    r = (t.x * _safe_reciprocal(dl).unsqueeze(-1)).round_().clamp_(qmin, qmax)
    return t.error(r.mul_(dl.unsqueeze(-1)).sub_(t.x))


def _sym_state(t: _Target, d: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> _Symmetric:
    return _Symmetric(d, scale, _sym_error(t, d.unsqueeze(-1) * scale, qmin, qmax))


def _sym_search_sub_scales(
    t: _Target, st: _Symmetric, qmin: int, qmax: int, smin: int, smax: int, radius: int, step: int = 1
) -> _Symmetric:
    """Each sub-block's best sub-scale among s ± step, s ± 2·step, … within radius for the stored d, by true error."""
    best_scale, best_err = st.scale, st.err
    for ds in range(-radius, radius + 1, step):
        if ds == 0:
            continue
        scale = (st.scale + ds).clamp_(smin, smax)
        err = _sym_error(t, st.d.unsqueeze(-1) * scale, qmin, qmax)
        better = _positive(best_err - err)
        best_scale = _blend(better, scale, best_scale)
        best_err = torch.minimum(best_err, err)
    return _Symmetric(st.d, best_scale, best_err)


def _sym_refit_super(t: _Target, st: _Symmetric, qmin: int, qmax: int) -> _Symmetric:
    """Least-squares d for the current levels and sub-scales, stored as fp16; kept where it lowers the error."""
    a = _sym_levels(t.x, st, qmin, qmax).mul_(st.scale.unsqueeze(-1))
    wa = t.w * a
    d = _safe_div(_dot(wa, t.x).sum(dim=-1), _dot(wa, a).sum(dim=-1))
    cand = _sym_state(t, _fp16_field(d), st.scale, qmin, qmax)
    better = cand.err.sum(dim=-1) < st.err.sum(dim=-1)
    return _Symmetric(torch.where(better, cand.d, st.d), st.scale, torch.where(better.unsqueeze(-1), cand.err, st.err))


def _sym_refine(t: _Target, st: _Symmetric, qmin: int, qmax: int, smin: int, smax: int) -> _Symmetric:
    """A coarse-to-fine wide sub-scale search, then rounds of (refit d; narrow sub-scale search)."""
    radius, step = _SYM_COARSE
    st = _sym_search_sub_scales(t, st, qmin, qmax, smin, smax, radius, step)
    st = _sym_search_sub_scales(t, st, qmin, qmax, smin, smax, step // 2)
    for _ in range(_ROUNDS):
        st = _sym_refit_super(t, st, qmin, qmax)
        st = _sym_search_sub_scales(t, st, qmin, qmax, smin, smax, _SYM_RADIUS)
    return st


# ---------------------------------------------------------------------------------------------------------------------
# Byte layouts


def _pack_2bit_planes(q: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K qs: [B, 256] levels 0..3 -> [B, 64]; byte 32h + l holds element 128h + 32s + l at bits 2s."""
    b = q.shape[0]
    return pack_bits(q.reshape(b, 2, 4, 32).transpose(-1, -2), 2).reshape(b, 64)


def _pack_bit_planes(bits: torch.Tensor) -> torch.Tensor:
    """Q3_K hmask / Q5_K qh: [B, 256] bits -> [B, 32]; byte l holds element 32b + l at bit b."""
    b = bits.shape[0]
    return pack_bits(bits.reshape(b, 8, 32).transpose(-1, -2), 1).reshape(b, 32)


def _pack_nibble_pairs(q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K qs: [B, 256] nibbles -> [B, 128]; byte 32c + l holds element 64c + l low, 64c + 32 + l high."""
    b = q.shape[0]
    return pack_bits(q.reshape(b, 4, 2, 32).transpose(-1, -2), 4).reshape(b, 128)


def _pack_k4_scales(scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 scale bytes (get_scale_min_k4's layout) from eight 6-bit scales and mins [B, 8]."""
    s, m = scale.to(torch.int32), low.to(torch.int32)
    first = s[:, :4] | ((s[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (s[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat((first, second, third), dim=-1).to(torch.uint8)


def _pack_q3_scales(biased: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 scale bytes from sixteen 6-bit biased scales [B, 16]."""
    s = biased.to(torch.int32)
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    high = pack_bits((s >> 4).reshape(-1, 4, 4).transpose(-1, -2), 2).reshape(-1, 4).to(torch.int32)
    return torch.cat((low, high), dim=-1).to(torch.uint8)


def _pack_q6_levels(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K ql [B, 128] and qh [B, 64] from [B, 256] levels 0..63."""
    b = q.shape[0]
    lo = (q & 0xF).reshape(b, 2, 2, 2, 32).permute(0, 1, 3, 4, 2)  # half, group of 32, l, nibble
    ql = pack_bits(lo, 4).reshape(b, 128)
    qh = pack_bits((q >> 4).reshape(b, 2, 4, 32).transpose(-1, -2), 2).reshape(b, 64)
    return ql, qh


def _rows(data: torch.Tensor, values: torch.Tensor, x: torch.Tensor) -> Encoded:
    n = x.shape[0]
    return Encoded(data=data.reshape(n, -1), values=values.reshape(n, -1))


# ---------------------------------------------------------------------------------------------------------------------
# Encoders

# The refinement's search widths (sub-scale steps) and rounds: measured trade-offs of error against time.
_ROUNDS = 2  # (refit the super-block scales, search the sub-scales again) rounds
_ASYM_FIRST_RADIUS = 2  # Q2_K/Q4_K/Q5_K: first search over (s, m) ± 2, later ones ± 1
_ASYM_RADIUS = 1
_SYM_COARSE = (18, 3)  # Q3_K/Q6_K: first search s ± 3, ± 6, … ± 18, then ± 1; later ones ± 2
_SYM_RADIUS = 2


def _refine_target(xb: torch.Tensor, imp: torch.Tensor | None) -> _Target:
    """The refinement minimizes Σ imp·(x - y)² (the output error the imatrix estimates), or plain squared error
    without one; llama.cpp's weights only steer the first searches."""
    return _Target.of(xb, imp if imp is not None else torch.ones_like(xb))


def _asym_encode(
    x: torch.Tensor, importance: torch.Tensor | None, sub: int, qmax: int, smax: int, ref: tuple[float, float, int]
) -> tuple[_Asymmetric, torch.Tensor]:
    """The shared Q2_K/Q4_K/Q5_K search: sub-block (scale, min), stored super-block fields, refinement.

    Returns the stored fields and the levels [B, J, S]."""
    xb = _row_blocks(x, sub)
    xn, amax = _normalize(xb)
    imp = _block_importance(importance, x, sub)
    if imp is not None:
        w = _sigma_weights(xn, imp, 1.0 if qmax == 3 else 2.0)
        scales, mins = _fit_scale_min(xn, w, qmax, -0.9, 0.05, 36, mad=False)
        sw = w.sum(dim=-1)
        d, ls = _fit_positive(scales, sw, smax)
        dmin, lm = _fit_positive(mins, sw, smax)
    else:
        w = xn.abs() if qmax == 3 else torch.sqrt((xn * xn).mean(dim=-1, keepdim=True)) + xn.abs()
        scales, mins = _fit_scale_min(xn, w, qmax, *ref, mad=qmax == 3)
        d, ls = _linear_levels(scales, smax)
        dmin, lm = _linear_levels(mins, smax)
    t = _refine_target(xb, imp)
    st = _asym_state(t, _fp16_field(d * amax), _fp16_field(dmin * amax), ls, lm, qmax)
    st = _asym_refine(t, st, qmax, smax)
    return st, _asym_levels(xb, st, qmax)


def encode_q2_k(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    st, levels = _asym_encode(x, importance, 16, 3, 15, (-0.5, 0.1, 15))
    q = levels.reshape(-1, QK_K).to(torch.int32)
    scales = (st.scale.to(torch.int32) | (st.low.to(torch.int32) << 4)).to(torch.uint8)
    data = torch.cat((scales, _pack_2bit_planes(q), fp16_bytes(st.d), fp16_bytes(st.dmin)), dim=-1)
    return _rows(data, _asym_values(st.d, st.dmin, st.scale, st.low, levels), x)


def _encode_q45_k(
    x: torch.Tensor, importance: torch.Tensor | None, qmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the block head bytes (d, dmin, 12 scale bytes) [B, 16], the levels [B, 256] and the values."""
    ref = (-1.0, 0.1, 20) if qmax == 15 else (-0.5, 0.1, 15)
    st, levels = _asym_encode(x, importance, 32, qmax, 63, ref)
    head = torch.cat((fp16_bytes(st.d), fp16_bytes(st.dmin), _pack_k4_scales(st.scale, st.low)), dim=-1)
    values = _asym_values(st.d, st.dmin, st.scale, st.low, levels)
    return head, levels.reshape(-1, QK_K).to(torch.int32), values


def encode_q4_k(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    head, q, values = _encode_q45_k(x, importance, 15)
    return _rows(torch.cat((head, _pack_nibble_pairs(q)), dim=-1), values, x)


def encode_q5_k(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    head, q, values = _encode_q45_k(x, importance, 31)
    data = torch.cat((head, _pack_bit_planes(q >> 4), _pack_nibble_pairs(q & 0xF)), dim=-1)
    return _rows(data, values, x)


def encode_q3_k(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    xb = _row_blocks(x, 16)
    xn, amax = _normalize(xb)
    imp = _block_importance(importance, x, 16)
    w = _sigma_weights(xn, imp, 2.0) if imp is not None else xn * xn
    scales, _ = _fit_symmetric(xn, w, 4)
    if imp is not None:
        d, ls = _fit_symmetric(scales, w.sum(dim=-1), 32)
    else:  # _ref: the largest |scale| maps to -32
        iscale = -32.0 * _safe_reciprocal(_signed_max(scales))
        ls = (scales * iscale.unsqueeze(-1)).round_().clamp_(-32, 31)
        d = _safe_reciprocal(iscale)
    t = _refine_target(xb, imp)
    st = _sym_state(t, _fp16_field(d * amax), ls, -4, 3)
    st = _sym_refine(t, st, -4, 3, -32, 31)
    levels = _sym_levels(xb, st, -4, 3)
    q = (levels.reshape(-1, QK_K) + 4).to(torch.int32)
    data = torch.cat(
        (_pack_bit_planes(q >> 2), _pack_2bit_planes(q & 3), _pack_q3_scales(st.scale + 32), fp16_bytes(st.d)), dim=-1
    )
    return _rows(data, _sym_values(st.d, st.scale, levels), x)


def encode_q6_k(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    xb = _row_blocks(x, 16)
    xn, amax = _normalize(xb)
    imp = _block_importance(importance, x, 16)
    w = imp if imp is not None else xn * xn
    scales, _ = _fit_symmetric(xn, w, 32)
    smax = _signed_max(scales)
    live = smax.abs() >= _GROUP_MAX_EPS
    iscale = torch.where(live, -128.0 * _safe_reciprocal(smax), torch.zeros_like(smax))
    ls = (scales * iscale.unsqueeze(-1)).round_().clamp_(-128, 127)
    t = _refine_target(xb, imp)
    st = _sym_state(t, _fp16_field(_safe_reciprocal(iscale) * amax), ls, -32, 31)
    st = _sym_refine(t, st, -32, 31, -128, 127)
    levels = _sym_levels(xb, st, -32, 31)
    ql, qh = _pack_q6_levels((levels.reshape(-1, QK_K) + 32).to(torch.int32))
    scales_bytes = (st.scale.to(torch.int32) & 0xFF).to(torch.uint8)
    data = torch.cat((ql, qh, scales_bytes, fp16_bytes(st.d)), dim=-1)
    return _rows(data, _sym_values(st.d, st.scale, levels), x)


ENCODERS: dict[str, EncodeFn] = {
    "Q2_K": encode_q2_k,
    "Q3_K": encode_q3_k,
    "Q4_K": encode_q4_k,
    "Q5_K": encode_q5_k,
    "Q6_K": encode_q6_k,
}
