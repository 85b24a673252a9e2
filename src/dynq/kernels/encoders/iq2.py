"""IQ2_XXS, IQ2_XS and IQ2_S encoders: 8-element groups on the 2-bit lattices with 4-bit block scales.

Each 8-element group is one lattice point times its block's scale d·(2l+1), with per-element signs (IQ2_XXS and
IQ2_XS store 7 sign bits and imply an even number of negatives). llama.cpp rounds each group to levels, falls back
to a short neighbour list off the grid, and quantizes the block scales to 4 bits only afterwards. Here the best
point of a group at a given scale is found exactly: for weights w, targets t (|x|, one element negated where parity
demands it) and scale s, the error to point g is s²·Σw·g² − 2s·Σw·t·g + const, so the errors to all points are one
small matmul and the best point an argmin (rounding suffices where the rounded group is on the lattice). The search:

1. the best points of every group at a few block scales form a shortlist, which scores a fine spread of scales per
   block cheaply, followed by one least-squares re-fit;
2. per super-block, d from a few multiples of max_scale/31 and per block the 4-bit l around its ideal scale,
   judged with the shortlisted points at the exact stored scale d·(2l+1);
3. the exact best points at the stored scales; where parity forces a wrong sign, two more elements are tried for it.

Errors use the values the decoder reads (grid bytes {8, 25, 43}/8), not llama.cpp's idealized levels {1, 3, 5}.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial

import torch

from dynq.kernels.encoders import EncodeFn
from dynq.kernels.encoders.common import Encoded, fp16_round
from dynq.kernels.encoders.grids import lattice_tensors
from dynq.kernels.encoders.packing import fp16_bytes, u16_bytes, u32_bytes

QK_K = 256
GROUP = 8
GROUPS = QK_K // GROUP
FP16_MAX = 65504.0
# Block scales, as multiples of max|t|/max_point, at which every group's best point is found exhaustively ...
_COARSE_STEPS = (0.6, 0.75, 0.9, 1.05, 1.25)
# ... and the finer spread scored with those points only.
_FINE_STEPS = tuple(0.5 + 0.05 * i for i in range(21))
# Super-block d candidates, as multiples of max_scale/31, and the 4-bit levels tried around the nearest one.
_D_STEPS = (0.92, 0.95, 0.98, 1.0, 1.02, 1.05, 1.08)
_LEVEL_SHIFTS = (-1.0, 0.0, 1.0)
# Lattice points scored per matmul: bounds the score buffer (groups · points · 4 bytes).
_SCORES_CPU = 1 << 23
_SCORES_CUDA = 1 << 28


@dataclass(frozen=True)
class _Format:
    name: str
    block: int  # elements sharing one 4-bit scale
    parity: bool  # signs stored as 7 bits, the 8th implied by an even count of negatives
    sigma_scale: float  # sigma2 = sigma_scale · Σx²/256 over the super-block
    row_bytes: int  # bytes per super-block

    @property
    def blocks(self) -> int:
        return QK_K // self.block


_XXS = _Format("IQ2_XXS", 32, True, 1.0, 66)
_XS = _Format("IQ2_XS", 16, True, 1.0, 74)
_S = _Format("IQ2_S", 16, False, 2.0, 82)


@dataclass(frozen=True)
class _Lattice:
    points: torch.Tensor  # [P, 8] decoded values / 8: the multiples of the block scale
    bytes_: torch.Tensor  # [P, 8] the grid bytes the decoder multiplies by
    quadratic: torch.Tensor  # [16, P]: rows g², then g, so [s²w, -2s·w·t] @ it is the error up to a constant
    midpoints: torch.Tensor  # [2] between the 3 levels a coordinate takes
    index_of_code: torch.Tensor  # [3**8] point index of a level code Σ level_j·3^j, -1 off the grid
    powers: torch.Tensor  # [8] 3^j


@cache
def _lattice(name: str, device: str) -> _Lattice:
    tables = lattice_tensors(name, device)
    values = tables["values"].to(torch.float32)
    points = values / 8
    levels = torch.unique(points)
    return _Lattice(
        points=points,
        bytes_=values,
        quadratic=torch.cat((points.square(), points), dim=1).t().contiguous(),
        midpoints=(levels[1:] + levels[:-1]) / 2,
        index_of_code=tables["index_of_code"],
        powers=3 ** torch.arange(GROUP, device=device, dtype=torch.int64),
    )


def _weights(x: torch.Tensor, qw: torch.Tensor | None, fmt: _Format) -> torch.Tensor:
    """llama.cpp's per-element weights for super-blocks x [S, 256] (None: IQ2_S's default, else all-ones qw)."""
    sigma2 = fmt.sigma_scale * x.square().mean(dim=1, keepdim=True)
    if qw is None:
        if not fmt.parity:
            return 0.25 * sigma2 + x.square()
        qw = torch.ones_like(x)
    return qw * torch.sqrt(sigma2 + x.square())


@dataclass(frozen=True)
class _Signs:
    magnitude: torch.Tensor  # [S, 32, 8] |x|
    negative: torch.Tensor  # [S, 32] int32 mask of the negative elements
    odd: torch.Tensor  # [S, 32] bool: signs carry parity and one element must take the wrong sign

    def rows(self, rows: torch.Tensor | slice) -> _Signs:
        """The given groups, flattened: [N, 8], [N], [N]."""
        return _Signs(
            self.magnitude.reshape(-1, GROUP)[rows], self.negative.reshape(-1)[rows], self.odd.reshape(-1)[rows]
        )


def _signs(x: torch.Tensor, parity: bool) -> _Signs:
    """Sign bookkeeping of groups x [S, 32, 8]."""
    negative = x < 0
    bits = 1 << torch.arange(GROUP, device=x.device, dtype=torch.int32)
    odd = negative.sum(dim=2) % 2 == 1
    return _Signs(x.abs(), (negative.to(torch.int32) * bits).sum(dim=2), odd & parity)


def _flipped(signs: _Signs, element: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [..., 8], stored sign masks [...]) when `element` [...] of each odd group keeps the wrong sign: its
    target becomes -|x| and its stored bit flips, so the mask has even parity."""
    flip = signs.odd[..., None] & (torch.arange(GROUP, device=element.device) == element[..., None])
    target = torch.where(flip, -signs.magnitude, signs.magnitude)
    return target, signs.negative ^ (signs.odd.to(torch.int32) << element.to(torch.int32))


def _compacts(t: torch.Tensor) -> bool:
    """Whether to pick out the groups that need work: free on CPU, a host sync elsewhere."""
    return t.device.type == "cpu"


def _best_points(
    lat: _Lattice, buffer: torch.Tensor, scale: torch.Tensor, target: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(error up to a per-group constant, point index) of the best lattice point of groups target, w [N, 8] at
    scales [N], exactly.

    For a fixed scale the error is separable, so rounding each coordinate to its nearest level is optimal whenever
    the rounded group is a lattice point; only the other groups need the scan over all points (one matmul into the
    reused buffer). On CPU just those groups are scanned; on an accelerator picking them out costs a host sync and
    scanning all of them is cheap, so all are scanned."""
    s = scale[:, None]
    wt = w * target
    if _compacts(target):
        level = (target > lat.midpoints[0] * s).to(torch.int64) + (target > lat.midpoints[1] * s)
        index = lat.index_of_code[(level * lat.powers).sum(dim=1)]
        off = (index < 0).nonzero()[:, 0]
        index[off] = _scan(lat, buffer, s[off], w[off], wt[off])
    else:
        index = _scan(lat, buffer, s, w, wt)
    g = lat.points[index]
    err = scale * (scale * (w * g.square()).sum(dim=1) - 2 * (wt * g).sum(dim=1))
    return err, index


def _scan(lat: _Lattice, buffer: torch.Tensor, s: torch.Tensor, w: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Index of the best of all lattice points for groups w, w·t [N, 8] at scales [N, 1]."""
    features = torch.cat((s.square() * w, -2 * s * wt), dim=1)
    scores = torch.matmul(features, lat.quadratic, out=buffer[: w.shape[0]])
    return scores.min(dim=1)[1]


class _Scorer:
    """The exact best points of fixed groups [S, 32, 8] at per-group scales [S, 32]."""

    def __init__(self, lat: _Lattice, target: torch.Tensor, w: torch.Tensor, buffer: torch.Tensor) -> None:
        self.lat = lat
        self.target = target.reshape(-1, GROUP)
        self.w = w.reshape(-1, GROUP)
        self.buffer = buffer

    def best(self, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        err, index = _best_points(self.lat, self.buffer, scale.reshape(-1), self.target, self.w)
        return err.reshape(scale.shape), index.reshape(scale.shape)


class _Shortlist:
    """A few lattice points per group (the best ones at some scales), to score many more scales cheaply."""

    def __init__(self, lat: _Lattice, target: torch.Tensor, w: torch.Tensor, index: torch.Tensor) -> None:
        # index [S, 32, C]: C candidate points per group
        points = lat.points[index]  # [S, 32, C, 8]
        self.a = (w[:, :, None, :] * points.square()).sum(dim=3)  # Σw·g²
        self.b = ((w * target)[:, :, None, :] * points).sum(dim=3)  # Σw·t·g
        self.b2 = -2 * self.b

    def errors(self, scale: torch.Tensor) -> torch.Tensor:
        """Per-candidate errors at per-group scales [S, 32, F] -> [S, 32, F, C]."""
        s = scale[..., None]
        return torch.addcmul(self.b2[:, :, None, :], s, self.a[:, :, None, :]).mul_(s)

    def error(self, scale: torch.Tensor) -> torch.Tensor:
        """Error of each group's best candidate at scales [S, 32, F] -> [S, 32, F]."""
        return self.errors(scale).amin(dim=3)

    def choice(self, scale: torch.Tensor) -> torch.Tensor:
        """Position in the shortlist of each group's best candidate at its scale [S, 32] -> [S, 32]."""
        return self.errors(scale[..., None]).argmin(dim=3)[..., 0]


def _per_group(block_values: torch.Tensor, fmt: _Format) -> torch.Tensor:
    """[S, blocks, ...] -> [S, 32, ...]: each block's values repeated over its groups."""
    return block_values.repeat_interleave(fmt.block // GROUP, dim=1)


def _per_block(group_values: torch.Tensor, fmt: _Format) -> torch.Tensor:
    """[S, 32, ...] -> [S, blocks, ...]: sums over each block's groups."""
    n = group_values.shape[0]
    return group_values.reshape(n, fmt.blocks, fmt.block // GROUP, *group_values.shape[2:]).sum(dim=2)


def _shortlist(scorer: _Scorer, target: torch.Tensor, w: torch.Tensor, top: torch.Tensor, fmt: _Format) -> _Shortlist:
    """The exhaustive best points at a few scales spread around each block's max|t|/max_point."""
    found = [scorer.best(_per_group(top * step, fmt))[1] for step in _COARSE_STEPS]
    return _Shortlist(scorer.lat, target, w, torch.stack(found, dim=2))


def _block_scales(short: _Shortlist, top: torch.Tensor, fmt: _Format) -> torch.Tensor:
    """Step 1: each block's best continuous scale over a fine spread, then one least-squares re-fit: [S, blocks]."""
    steps = torch.tensor(_FINE_STEPS, device=top.device)
    scales = top[:, :, None] * steps
    err = _per_block(short.error(_per_group(scales, fmt)), fmt)
    best = scales.gather(2, err.argmin(dim=2, keepdim=True))[:, :, 0]
    # Least squares scale for the points chosen at `best`; keep it where it scores better.
    pick = short.choice(_per_group(best, fmt))[..., None]
    sum_a = _per_block(short.a.gather(2, pick)[..., 0], fmt)
    sum_b = _per_block(short.b.gather(2, pick)[..., 0], fmt)
    fit = torch.where((sum_a > 0) & (sum_b > 0), sum_b / sum_a.clamp(min=1e-30), best)
    both = torch.stack((best, fit), dim=2)
    err = _per_block(short.error(_per_group(both, fmt)), fmt)
    return both.gather(2, err.argmin(dim=2, keepdim=True))[:, :, 0]


@dataclass(frozen=True)
class _Scales:
    d: torch.Tensor  # [S] the stored fp16 d, as float32
    level: torch.Tensor  # [S, blocks] int64 4-bit block scales
    dn: torch.Tensor  # [S, 1] d in the normalized units of the search


def _levels_near(ideal: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
    """4-bit levels l around the one whose d·(2l+1) is nearest each ideal scale: [S, blocks, 3]."""
    safe = torch.where(dn > 0, dn, torch.ones_like(dn))
    guess = torch.where(dn > 0, torch.round(0.5 * (ideal / safe - 1)), torch.zeros_like(ideal))
    shifts = torch.tensor(_LEVEL_SHIFTS, device=ideal.device, dtype=ideal.dtype)
    return torch.clamp(guess[:, :, None] + shifts, 0, 15)


def _stored_scales(short: _Shortlist, ideal: torch.Tensor, amax: torch.Tensor, fmt: _Format) -> _Scales:
    """Step 2: per super-block the fp16 d and 4-bit block scales whose shortlisted points give the least error."""
    top = ideal.amax(dim=1)
    best_err = torch.full_like(top, float("inf"))
    best_d = torch.zeros_like(top)
    best_level = torch.zeros_like(ideal)
    for step in _D_STEPS:
        d = fp16_round(torch.clamp(top * step / 31 * amax, max=FP16_MAX))
        dn = (d / amax)[:, None]
        levels = _levels_near(ideal, dn)
        err = _per_block(short.error(_per_group(dn[:, :, None] * (2 * levels + 1), fmt)), fmt)
        block_err, pick = err.min(dim=2)
        level = levels.gather(2, pick[..., None])[..., 0]
        total = block_err.sum(dim=1)
        better = total < best_err
        best_err = torch.where(better, total, best_err)
        best_d = torch.where(better, d, best_d)
        best_level = torch.where(better[:, None], level, best_level)
    return _Scales(best_d, best_level.to(torch.int64), (best_d / amax)[:, None])


def _final_points(scorer: _Scorer, scales: _Scales, fmt: _Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: (error, index) of every group's exact best point at its stored block scale: [S, 32]."""
    return scorer.best(_per_group(scales.dn * (2 * scales.level + 1), fmt))


def _best_flips(
    scorer: _Scorer, signs: _Signs, w: torch.Tensor, scale: torch.Tensor, found: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where parity forces a wrong sign, also try it on the two elements with the least w·|x| (it costs about
    4·s·w·|x|·g there) with their own best points; returns the better (point index, sign mask) per group."""
    shape = signs.negative.shape
    err, index, mask = (t.reshape(-1).clone() for t in found)
    # On CPU only the odd groups are worth the scans; elsewhere selecting them costs a host sync.
    rows: torch.Tensor | slice = signs.odd.reshape(-1).nonzero()[:, 0] if _compacts(scale) else slice(None)
    sub = signs.rows(rows)
    w, scale = w.reshape(-1, GROUP)[rows], scale.reshape(-1)[rows]
    best_err, best_index, best_mask = err[rows], index[rows], mask[rows]
    for element in (w * sub.magnitude).topk(2, dim=1, largest=False)[1].t():
        target, trial_mask = _flipped(sub, element)
        trial_err, trial_index = _best_points(scorer.lat, scorer.buffer, scale, target, w)
        better = sub.odd & (trial_err < best_err)
        best_err = torch.where(better, trial_err, best_err)
        best_index = torch.where(better, trial_index, best_index)
        best_mask = torch.where(better, trial_mask, best_mask)
    index[rows], mask[rows] = best_index, best_mask
    return index.reshape(shape), mask.reshape(shape)


def _decode(lat: _Lattice, scales: _Scales, index: torch.Tensor, mask: torch.Tensor, fmt: _Format) -> torch.Tensor:
    """What gguf-py's dequantizer reads back, in its float32 operation order: [S, 256]."""
    n = index.shape[0]
    db = scales.d[:, None] * (0.5 + scales.level.to(torch.float32)) * 0.25
    db = _per_group(db, fmt)[:, :, None]
    bits = (mask[:, :, None] >> torch.arange(GROUP, device=mask.device, dtype=torch.int32)) & 1
    sign = torch.where(bits == 0, 1.0, -1.0)
    return (db * lat.bytes_[index] * sign).reshape(n, QK_K)


def _pack_xxs(d: torch.Tensor, level: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IQ2_XXS: d, then per 32-block 4 index bytes and a u32 of four 7-bit sign indices and the scale."""
    n = index.shape[0]
    idx = index.reshape(n, 8, 4).to(torch.uint8)
    signs = (mask.to(torch.int64) & 127).reshape(n, 8, 4)
    shifts = 7 * torch.arange(4, device=d.device, dtype=torch.int64)
    aux = (signs << shifts).sum(dim=2) | (level << 28)
    body = torch.cat((idx, u32_bytes(aux)), dim=2).reshape(n, -1)
    return torch.cat((fp16_bytes(d), body), dim=1)


def _pack_xs(d: torch.Tensor, level: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IQ2_XS: d, 32 u16 of 9-bit index | 7-bit sign index << 9, 8 bytes of two 4-bit scales."""
    n = index.shape[0]
    qs = u16_bytes(index.to(torch.int32) | ((mask & 127) << 9)).reshape(n, -1)
    return torch.cat((fp16_bytes(d), qs, _nibbles(level)), dim=1)


def _pack_s(d: torch.Tensor, level: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IQ2_S: d, 32 low index bytes, 32 sign bytes, 8 bytes of 2-bit index highs, 8 bytes of 4-bit scales."""
    n = index.shape[0]
    index = index.to(torch.int32)
    high = (index >> 8).reshape(n, 8, 4) << (2 * torch.arange(4, device=d.device, dtype=torch.int32))
    parts = (fp16_bytes(d), index & 255, mask, high.sum(dim=2), _nibbles(level))
    return torch.cat([p.to(torch.uint8) for p in parts], dim=1)


def _nibbles(level: torch.Tensor) -> torch.Tensor:
    """[S, 16] 4-bit scales -> [S, 8] bytes, even blocks in the low nibble."""
    pairs = level.reshape(level.shape[0], -1, 2)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).to(torch.uint8)


_PACK = {"IQ2_XXS": _pack_xxs, "IQ2_XS": _pack_xs, "IQ2_S": _pack_s}


def _encode_superblocks(
    x: torch.Tensor, qw: torch.Tensor | None, fmt: _Format, buffer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Super-blocks x [S, 256] -> (bytes [S, row_bytes], decoded values [S, 256])."""
    n = x.shape[0]
    lat = _lattice(fmt.name, str(x.device))
    # The search is scale-free: normalizing each super-block keeps squares and products finite for any magnitude.
    amax = x.abs().amax(dim=1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    xn = x / amax[:, None]
    w = _weights(xn, qw, fmt).reshape(n, GROUPS, GROUP)
    signs = _signs(xn.reshape(n, GROUPS, GROUP), fmt.parity)
    # llama.cpp's choice of the element that takes the wrong sign: the least w·x².
    target, mask = _flipped(signs, (w * signs.magnitude.square()).argmin(dim=2))
    scorer = _Scorer(lat, target, w, buffer)
    top = target.reshape(n, fmt.blocks, fmt.block).amax(dim=2) / float(lat.points.max())
    short = _shortlist(scorer, target, w, top, fmt)
    ideal = _block_scales(short, top, fmt)
    scales = _stored_scales(short, ideal, amax, fmt)
    err, index = _final_points(scorer, scales, fmt)
    if fmt.parity:
        scale = _per_group(scales.dn * (2 * scales.level + 1), fmt)
        index, mask = _best_flips(scorer, signs, w, scale, (err, index, mask))
    data = _PACK[fmt.name](scales.d, scales.level, index, mask)
    return data, _decode(lat, scales, index, mask, fmt)


def _encode(fmt: _Format, x: torch.Tensor, importance: torch.Tensor | None) -> Encoded:
    n, k = x.shape
    sb = x.reshape(-1, QK_K)
    qw = None
    if importance is not None:
        qw = importance.to(device=x.device, dtype=torch.float32).reshape(1, -1, QK_K).expand(n, -1, -1)
        qw = qw.reshape(-1, QK_K)
    n_points = int(_lattice(fmt.name, str(x.device)).points.shape[0])
    budget = _SCORES_CUDA if x.device.type == "cuda" else _SCORES_CPU
    per_chunk = max(1, budget // (n_points * GROUPS))
    buffer = torch.empty(min(per_chunk, sb.shape[0]) * GROUPS, n_points, device=x.device)
    data = torch.empty(sb.shape[0], fmt.row_bytes, dtype=torch.uint8, device=x.device)
    values = torch.empty_like(sb)
    for start in range(0, sb.shape[0], per_chunk):
        part = slice(start, start + per_chunk)
        data[part], values[part] = _encode_superblocks(sb[part], None if qw is None else qw[part], fmt, buffer)
    return Encoded(data.reshape(n, -1), values.reshape(n, k))


ENCODERS: dict[str, EncodeFn] = {fmt.name: partial(_encode, fmt) for fmt in (_XXS, _XS, _S)}
