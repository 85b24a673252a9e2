"""IQ3_XXS and IQ3_S encoders: 4-element groups on an 8-level lattice, 32-element blocks, 4-bit block scales.

Both types decode a group as d·(2l + 1)·g·sign with l the block's 4-bit scale and g a lattice point (IQ3_XXS reads
g/4 ∈ {1, 3, …, 13, 15.5}, IQ3_S g ∈ {1, 3, …, 15}). Unlike llama.cpp, which rounds each coordinate and falls back to
a short neighbour list, every group here takes the exact best of all lattice points for the scale it is scored at:
the weighted error of a group against every point is s·Σw g² − 2·Σw x g (plus a constant), one small matmul per
chunk of groups. A per-block scale search picks the super-block scale d; then each block tries the stored scales
d·(2l + 1) around its optimum and keeps the one whose exact re-chosen points read back best, and each super-block
keeps the best of a few d candidates (llama.cpp's fudge factor among them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynq.kernels.encoders import EncodeFn
from dynq.kernels.encoders.common import FP16_MAX, Encoded, fp16_round
from dynq.kernels.encoders.grids import lattice_tensors
from dynq.kernels.encoders.packing import fp16_bytes, u32_bytes

_GROUP = 4  # elements per lattice point
_BLOCK = 32  # elements per 4-bit block scale
_SUPER = 256  # elements per fp16 super-block scale


@dataclass(frozen=True)
class _Spec:
    name: str
    grid_divisor: float  # stored grid bytes / this = the level the scale multiplies
    sign_parity: bool  # IQ3_XXS stores 7 sign bits per 8 values, the 8th makes the parity even
    phase1_offsets: tuple[float, ...]  # block-scale trials: max|x| / (15 + offset)
    d_factors: tuple[float, ...]  # super-block scale trials: d = fp16(max_scale / 31 · factor)
    refits: int  # least-squares re-fits of d after the trials
    refine_flips: bool = True  # IQ3_XXS: choose the flipped element of odd 8-groups by exact error
    plain_floor: float = 0.25  # no imatrix: weight x² + this·sigma2 (see _weights)


_XXS = _Spec("IQ3_XXS", 4.0, True, (-2.4, -0.8, 0.8, 2.4), (1.0, 1.0125, 1.035), 1)
_S = _Spec("IQ3_S", 1.0, False, (-2.4, -0.8, 0.8, 2.4), (1.0, 1.033), 1)


def _chunk_groups(device: torch.device, n_points: int) -> int:
    """Groups scored at once: keeps [chunk, n_points] scores in cache on CPU and bounded on a GPU."""
    budget = (1 << 26) if device.type == "cuda" else (1 << 20)
    return max(1, budget // n_points)


def _argmin_rows(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, argmin) of every row of scores [C, P] that are ≥ 0 up to rounding, P a power of two.

    On CPU torch's indexed min is several times slower than a plain one, so the column index replaces the low
    log2(P) mantissa bits (order kept to 2^-14 relative for P = 512) and one integer amin finds both. Rounding
    negatives sort below every positive score, which is right: they are errors of about zero."""
    if scores.device.type != "cpu":
        return scores.min(dim=1)
    bits = scores.shape[1] - 1
    columns = torch.arange(scores.shape[1], device=scores.device, dtype=torch.int32)
    key = scores.view(torch.int32).bitwise_and_(~bits).bitwise_or_(columns).amin(dim=1)
    return (key & ~bits).view(torch.float32), (key & bits).to(torch.int64)


def _best_points(
    target: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lattice point with least weighted error for every group at its scale, and that error.

    target, w: [G, 4]; scale: [G] (≥ 0); grid: [P, 4] levels. Returns (index [G] int64, Σw(scale·g − x)² [G]).
    The error is s²·Σw g² − 2s·Σw x g + Σw x², one matmul of per-group features with per-point terms."""
    ones = torch.ones(1, grid.shape[0], device=grid.device)
    mat = torch.cat(((grid * grid).t(), grid.t(), ones), dim=0).contiguous()  # [9, P]
    s = scale[:, None]
    feats = torch.cat((s * s * w, -2 * s * w * target, (w * target * target).sum(dim=1, keepdim=True)), dim=1)
    step = _chunk_groups(target.device, grid.shape[0])
    idx_parts: list[torch.Tensor] = []
    err_parts: list[torch.Tensor] = []
    for start in range(0, feats.shape[0], step):
        err, idx = _argmin_rows(feats[start : start + step] @ mat)
        idx_parts.append(idx)
        err_parts.append(err)
    return torch.cat(idx_parts), torch.cat(err_parts)


def _weights(xs: torch.Tensor, imp: torch.Tensor | None, plain_floor: float) -> torch.Tensor:
    """IQ3 weights per super-block [S, 256]: llama.cpp's qw·sqrt(sigma2 + x²) with sigma2 = 2·mean x², or without
    an imatrix x² + plain_floor·sigma2 (llama.cpp: plain x²)."""
    sigma2 = 2 * (xs * xs).sum(dim=1, keepdim=True) / _SUPER
    if imp is None:
        return xs * xs + plain_floor * sigma2
    return imp * torch.sqrt(sigma2 + xs * xs)


def _parity_signs(xb: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ3_XXS signs: an 8-group with an odd count of negatives flips its smallest w·x² element to positive.

    xb, w: [N, 32]. Returns (negative [N, 32] bool as stored, target [N, 32]: |x|, negated where flipped)."""
    neg = (xb < 0).reshape(-1, 8)
    odd = (neg.sum(dim=1) % 2) == 1
    cost = (w * xb * xb).reshape(-1, 8)
    flip = torch.nn.functional.one_hot(cost.argmin(dim=1), 8).bool() & odd[:, None]
    target = torch.where(flip, -1.0, 1.0) * xb.abs().reshape(-1, 8)
    return (neg ^ flip).reshape(xb.shape), target.reshape(xb.shape)


def _group_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, _GROUP)


def _block_fit_scale(target: torch.Tensor, w: torch.Tensor, grid: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Each block's least-squares scale from a few trial scales with exact point choices: [N]."""
    n_blocks = target.shape[0]
    amax = target.amax(dim=1)
    tg, wg = _group_view(target), _group_view(w)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = torch.zeros_like(amax)
    for offset in spec.phase1_offsets:
        trial = amax / (15.0 + offset)
        idx, _ = _best_points(tg, wg, trial.repeat_interleave(_BLOCK // _GROUP), grid)
        q = grid[idx].reshape(n_blocks, _BLOCK)
        sumqx = (w * target * q).sum(dim=1)
        sumq2 = (w * q * q).sum(dim=1)
        ok = sumq2 > 0
        scale = torch.where(ok, sumqx / torch.where(ok, sumq2, 1.0), trial)
        err = torch.where(ok, -sumqx * sumqx / torch.where(ok, sumq2, 1.0), 0.0)
        better = (err < best_err) & (scale > 0)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return torch.where(best_scale > 0, best_scale, amax / 15.0)


@dataclass(frozen=True)
class _Choice:
    d: torch.Tensor  # [S] stored super-block scale (fp16-exact float32)
    sub: torch.Tensor  # [N] int64 4-bit block scales l
    idx: torch.Tensor  # [G] int64 lattice indices
    err: torch.Tensor  # [N] block error (up to a constant)

    def pick(self, other: _Choice, better_super: torch.Tensor) -> _Choice:
        """Per super-block, `other` where better_super else self."""
        b = better_super.repeat_interleave(_SUPER // _BLOCK)
        return _Choice(
            torch.where(better_super, other.d, self.d),
            torch.where(b, other.sub, self.sub),
            torch.where(b.repeat_interleave(_BLOCK // _GROUP), other.idx, self.idx),
            torch.where(b, other.err, self.err),
        )

    def super_err(self) -> torch.Tensor:
        return self.err.reshape(-1, _SUPER // _BLOCK).sum(dim=1)


def _blocks_at(
    d: torch.Tensor, l_lo: torch.Tensor, target: torch.Tensor, w: torch.Tensor, grid: torch.Tensor, n_l: int
) -> _Choice:
    """With super-block scale d [S], each block's best of the stored scales d·(2l + 1), l = l_lo … l_lo + n_l − 1."""
    n_blocks = target.shape[0]
    per_block = _BLOCK // _GROUP
    tg, wg = _group_view(target), _group_view(w)
    d_block = d.repeat_interleave(_SUPER // _BLOCK)
    best_err = torch.full((n_blocks,), float("inf"), device=target.device)
    best_l = l_lo
    best_idx = torch.zeros(tg.shape[0], dtype=torch.int64, device=target.device)
    for step in range(n_l):
        l_try = (l_lo + step).clamp(0, 15)
        scale = d_block * (2 * l_try + 1).to(torch.float32)
        idx, err = _best_points(tg, wg, scale.repeat_interleave(per_block), grid)
        err_b = err.reshape(n_blocks, per_block).sum(dim=1)
        better = err_b < best_err
        best_err = torch.where(better, err_b, best_err)
        best_l = torch.where(better, l_try, best_l)
        best_idx = torch.where(better.repeat_interleave(per_block), idx, best_idx)
    return _Choice(d, best_l, best_idx, best_err)


def _l_below(scale: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The largest l with d·(2l + 1) ≤ scale, clamped to 0..15 (0 where d is 0): [N] from [N] and [S]."""
    d_block = d.repeat_interleave(_SUPER // _BLOCK)
    ratio = scale / torch.where(d_block > 0, d_block, 1.0)
    return torch.floor(0.5 * (ratio - 1)).clamp(0, 15).to(torch.int64)


def _refit_d(choice: _Choice, target: torch.Tensor, w: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The least-squares super-block scale for the chosen block scales and points, as stored: [S]."""
    q = grid[choice.idx].reshape(-1, _BLOCK) * (2 * choice.sub + 1).to(torch.float32)[:, None]
    sumqx = (w * target * q).reshape(-1, _SUPER).sum(dim=1)
    sumq2 = (w * q * q).reshape(-1, _SUPER).sum(dim=1)
    ok = (sumq2 > 0) & (sumqx > 0)
    d = torch.where(ok, sumqx / torch.where(ok, sumq2, 1.0), choice.d)
    return fp16_round(torch.clamp(d, max=FP16_MAX))


def _choose(target: torch.Tensor, w: torch.Tensor, grid: torch.Tensor, spec: _Spec) -> _Choice:
    """Super-block scale, block scales and lattice points with least weighted error among the trials."""
    fit = _block_fit_scale(target, w, grid, spec)
    max_scale = fit.reshape(-1, _SUPER // _BLOCK).amax(dim=1)
    best: _Choice | None = None
    for factor in spec.d_factors:
        d = fp16_round(torch.clamp(max_scale / 31 * factor, max=FP16_MAX))
        trial = _blocks_at(d, _l_below(fit, d), target, w, grid, 2)
        best = trial if best is None else best.pick(trial, trial.super_err() < best.super_err())
    assert best is not None
    for _ in range(spec.refits):
        d = _refit_d(best, target, w, grid)
        trial = _blocks_at(d, (best.sub - 1).clamp(min=0), target, w, grid, 3)
        best = best.pick(trial, trial.super_err() < best.super_err())
    return best


def _refine_flips(
    choice: _Choice, xb: torch.Tensor, w: torch.Tensor, grid: torch.Tensor
) -> tuple[_Choice, torch.Tensor]:
    """IQ3_XXS: at the chosen scales, flip whichever element of an odd 8-group reads back best.

    Scores every 4-group with no element flipped and with each one flipped, then picks per 8-group.
    Returns the updated choice and the stored negative flags [N, 32]."""
    per_block = _BLOCK // _GROUP
    n_groups = choice.idx.shape[0]
    absx = _group_view(xb.abs())
    wg = _group_view(w)
    scale = (choice.d.repeat_interleave(_SUPER // _BLOCK) * (2 * choice.sub + 1).to(torch.float32)).repeat_interleave(
        per_block
    )
    eye = torch.eye(_GROUP, device=xb.device, dtype=torch.bool)
    flips = torch.cat((torch.zeros_like(eye[:1]), eye))  # [5, 4]: none, then each element
    idxs: list[torch.Tensor] = []
    errs: list[torch.Tensor] = []
    for flip in flips:
        idx, err = _best_points(torch.where(flip, -absx, absx), wg, scale, grid)
        idxs.append(idx)
        errs.append(err)
    idx_v = torch.stack(idxs, dim=1).reshape(-1, 2, 5)  # [G/2, half, variant]
    err_v = torch.stack(errs, dim=1).reshape(-1, 2, 5)
    # option m < 4 flips element m of the first half, m ≥ 4 element m − 4 of the second; option 8 flips none
    var_a = torch.tensor([1, 2, 3, 4, 0, 0, 0, 0, 0], device=xb.device)
    var_b = torch.tensor([0, 0, 0, 0, 1, 2, 3, 4, 0], device=xb.device)
    cost = err_v[:, 0, var_a] + err_v[:, 1, var_b]  # [G/2, 9]
    neg = (xb < 0).reshape(-1, 8)
    odd = (neg.sum(dim=1) % 2) == 1
    cost[:, 8] = torch.where(odd, float("inf"), cost[:, 8])
    cost[:, :8] = torch.where(odd[:, None], cost[:, :8], float("inf"))
    option = cost.argmin(dim=1)
    pick_a, pick_b = var_a[option], var_b[option]
    idx = torch.stack(
        (idx_v[:, 0].gather(1, pick_a[:, None])[:, 0], idx_v[:, 1].gather(1, pick_b[:, None])[:, 0]), dim=1
    ).reshape(n_groups)
    err = cost.gather(1, option[:, None]).reshape(-1, per_block // 2).sum(dim=1)
    flip = torch.nn.functional.one_hot(option, 9)[:, :8].bool()
    return _Choice(choice.d, choice.sub, idx, err), (neg ^ flip).reshape(xb.shape)


def _sign_bits(neg: torch.Tensor) -> torch.Tensor:
    """[N, 32] bool -> [N, 4] int32 bytes, bit j of byte k = element 8k + j."""
    shifts = torch.arange(8, device=neg.device, dtype=torch.int32)
    return (neg.reshape(neg.shape[0], 4, 8).to(torch.int32) << shifts).sum(dim=2)


def _values(
    d: torch.Tensor, sub: torch.Tensor, idx: torch.Tensor, neg: torch.Tensor, raw: torch.Tensor, spec: _Spec
) -> torch.Tensor:
    """What gguf-py's dequantizer reads back, in its float32 operation order: [N, 32]."""
    d_block = d.repeat_interleave(_SUPER // _BLOCK)[:, None]
    lf = sub.to(torch.float32)[:, None]
    db = d_block * (0.5 + lf) * 0.5 if spec.sign_parity else d_block * (1 + 2 * lf)
    g = raw[idx].reshape(-1, _BLOCK)
    return db * g * torch.where(neg, -1.0, 1.0)


def _pack_xxs(d: torch.Tensor, sub: torch.Tensor, idx: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """IQ3_XXS super-blocks [S, 98]: d, 64 grid bytes, 8 words of 4×7 sign bits and the scale in bits 28–31."""
    n_super = d.shape[0]
    shifts = torch.tensor([0, 7, 14, 21], device=d.device, dtype=torch.int64)
    words = ((signs.to(torch.int64) & 127) << shifts).sum(dim=1) | (sub << 28)
    return torch.cat(
        (
            fp16_bytes(d),
            idx.reshape(n_super, 64).to(torch.uint8),
            u32_bytes(words.reshape(n_super, 8)).reshape(n_super, 32),
        ),
        dim=1,
    )


def _pack_s(d: torch.Tensor, sub: torch.Tensor, idx: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """IQ3_S super-blocks [S, 110]: d, 64 low index bytes, 8 high-bit bytes, 32 sign bytes, 4 scale bytes."""
    n_super = d.shape[0]
    shifts = torch.arange(8, device=d.device, dtype=torch.int64)
    qh = ((idx.reshape(-1, 8) >> 8) << shifts).sum(dim=1)
    scales = sub.reshape(n_super, 4, 2)
    return torch.cat(
        (
            fp16_bytes(d),
            (idx & 255).reshape(n_super, 64).to(torch.uint8),
            qh.reshape(n_super, 8).to(torch.uint8),
            signs.reshape(n_super, 32).to(torch.uint8),
            (scales[..., 0] | (scales[..., 1] << 4)).to(torch.uint8),
        ),
        dim=1,
    )


def _encode(x: torch.Tensor, importance: torch.Tensor | None, spec: _Spec) -> Encoded:
    n, k = x.shape
    tables = lattice_tensors(spec.name, str(x.device))
    raw = tables["values"].to(torch.float32)
    grid = raw / spec.grid_divisor
    xs = x.reshape(-1, _SUPER)
    imp = None if importance is None else importance.to(x.device, torch.float32).reshape(-1, _SUPER).repeat(n, 1)
    w = _weights(xs, imp, spec.plain_floor).reshape(-1, _BLOCK)
    xb = xs.reshape(-1, _BLOCK)
    if spec.sign_parity:
        neg, target = _parity_signs(xb, w)
    else:
        neg, target = xb < 0, xb.abs()
    choice = _choose(target, w, grid, spec)
    if spec.sign_parity and spec.refine_flips:
        choice, neg = _refine_flips(choice, xb, w, grid)
    values = _values(choice.d, choice.sub, choice.idx, neg, raw, spec)
    pack = _pack_xxs if spec.sign_parity else _pack_s
    data = pack(choice.d, choice.sub, choice.idx, _sign_bits(neg))
    return Encoded(data=data.reshape(n, -1), values=values.reshape(n, k))


def encode_iq3_xxs(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    return _encode(x, importance, _XXS)


def encode_iq3_s(x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    return _encode(x, importance, _S)


ENCODERS: dict[str, EncodeFn] = {"IQ3_XXS": encode_iq3_xxs, "IQ3_S": encode_iq3_s}
