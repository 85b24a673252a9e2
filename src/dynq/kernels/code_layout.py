"""Where each element's quantization code sits in a GGUF block, and what its levels are, learned from the decoder.

Error feedback re-rounds elements one column at a time on the grid a block encoder chose, so it needs, per
element, the levels its code can take at the block's stored scales, and a way to write a new code back. Rather
than spelling out every type's byte layout a second time, this module asks gguf-py's decoder: a bit is one
element's code bit when flipping it changes that element alone (in every one of several real blocks); its weight
is the size of the change. Two kinds of layout come out of that:

- affine: value = base + step · code with an integer code of power-of-two bits (Q2_K..Q6_K, Q4_0..Q8_0, TQ2_0);
  base and step per element come from two decodes with the codes cleared and set to one;
- table: a code of at most four bits indexes a non-uniform table (IQ4_NL, IQ4_XS, MXFP4); the levels per element
  come from one decode per code.

Types whose codes name a group of elements together (the IQ1/IQ2/IQ3 lattices, TQ1_0's base-3 packing) have no
element codes: feedback hands their errors on block by block instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
import numpy.typing as npt
from gguf import dequantize

from dynq.core.arrays import F32Array, U8Array
from dynq.core.qtypes import QType, qtype

_TEMPLATES = 4  # real blocks a code bit must agree on
_TABLE_MAX_BITS = 4  # a table layout decodes once per code: up to 16 decodes per window


@dataclass(frozen=True, eq=False)
class CodeLayout:
    """The code bits of the elements of one block: `byte[e, r]`, `bit[e, r]` hold bit r (the 2^r place) of element
    e's code; `signed` when the top bit counts negative (two's complement)."""

    qtype: QType
    byte: npt.NDArray[np.intp]  # [block_size, bits]
    bit: npt.NDArray[np.uint8]  # [block_size, bits]
    signed: bool
    affine: bool

    @property
    def bits(self) -> int:
        return int(self.byte.shape[1])

    @property
    def code_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def read_codes(self, data: U8Array) -> npt.NDArray[np.int32]:
        """Codes [n, k] of encoded rows [n, row_bytes]."""
        blocks = self._blocks(data)
        bits = (blocks[:, :, self.byte] >> self.bit) & 1  # [n, nb, bs, bits]
        codes = (bits.astype(np.int32) << np.arange(self.bits, dtype=np.int32)).sum(axis=-1)
        if self.signed:
            codes = np.where(codes >= 1 << (self.bits - 1), codes - (1 << self.bits), codes)
        return np.asarray(codes.reshape(data.shape[0], -1), dtype=np.int32)

    def write_codes(self, data: U8Array, codes: npt.NDArray[np.int32]) -> U8Array:
        """`data` with every element's code replaced by `codes` [n, k] (a copy)."""
        blocks = self._blocks(data)
        n, nb = blocks.shape[:2]
        flat = (blocks & self._keep).reshape(n * nb, -1)
        unsigned = (codes.reshape(n * nb, -1).astype(np.int64) & ((1 << self.bits) - 1)).astype(np.uint8)
        rows = np.arange(n * nb)[:, None]
        for r, lanes in enumerate(self._lanes):
            for elements in lanes:  # elements whose bit r sit in distinct bytes: one assignment cannot collide
                byte, bit = self.byte[elements, r], self.bit[elements, r]
                flat[rows, byte] |= ((unsigned[:, elements] >> r) & 1) << bit
        return flat.reshape(data.shape)

    @cached_property
    def _keep(self) -> U8Array:
        """Per block byte: the bits that are no element's code."""
        mask = np.zeros(self.qtype.type_size, np.uint8)
        np.bitwise_or.at(mask, self.byte.reshape(-1), (np.uint8(1) << self.bit.reshape(-1)).astype(np.uint8))
        return ~mask

    @cached_property
    def _lanes(self) -> list[list[npt.NDArray[np.intp]]]:
        """Per code bit r, the elements split into groups whose bit r lie in distinct bytes."""
        out = []
        for r in range(self.bits):
            lanes: list[list[int]] = []
            taken: list[set[int]] = []
            for e in range(self.qtype.block_size):
                byte = int(self.byte[e, r])
                i = next((i for i, used in enumerate(taken) if byte not in used), len(lanes))
                if i == len(lanes):
                    lanes.append([])
                    taken.append(set())
                lanes[i].append(e)
                taken[i].add(byte)
            out.append([np.array(lane, dtype=np.intp) for lane in lanes])
        return out

    def levels(self, data: U8Array, codes: npt.NDArray[np.int32] | None = None) -> F32Array:
        """The values the rows decode to with every element's code set to `codes` (default: each code in turn,
        giving [n, k, 2^bits]; table layouts only)."""
        if codes is not None:
            return decode(self.write_codes(data, codes), self.qtype)
        n = data.shape[0]
        k = data.shape[1] // self.qtype.type_size * self.qtype.block_size
        lo, hi = self.code_range
        table = np.empty((n, k, hi - lo + 1), dtype=np.float32)
        for c in range(lo, hi + 1):
            table[:, :, c - lo] = decode(self.write_codes(data, np.full((n, k), c, np.int32)), self.qtype)
        return table

    def _blocks(self, data: U8Array) -> U8Array:
        return data.reshape(data.shape[0], -1, self.qtype.type_size)


def decode(data: U8Array, t: QType) -> F32Array:
    return np.asarray(dequantize(np.ascontiguousarray(data), t.ggml), dtype=np.float32).reshape(data.shape[0], -1)


def _templates(t: QType) -> U8Array:
    """Blocks of Gaussian weights encoded by llama.cpp, with a strong importance on a few columns, so no scale is zero
    and flipping a scale bit moves many elements."""
    from dynq.kernels.ggml import GgmlBackend

    rng = np.random.default_rng(1)
    rows = rng.standard_normal((_TEMPLATES, t.block_size)).astype(np.float32)
    importance = rng.uniform(0.5, 2.0, t.block_size).astype(np.float32)
    return GgmlBackend(1).encode(t, rows, importance)


@cache
def code_layout(name: str) -> CodeLayout | None:
    """The element code layout of a type, or None where codes are not per element (or not binary)."""
    t = qtype(name)
    if t.is_float or not t.decodable:
        return None
    blocks = _templates(t)
    base = decode(blocks, t)
    n_bits = t.type_size * 8
    owner = np.full(n_bits, -1)
    weight = np.zeros(n_bits)
    for b in range(n_bits):
        flipped = blocks.copy()
        flipped[:, b // 8] ^= np.uint8(1 << (b % 8))
        with np.errstate(invalid="ignore", over="ignore"):
            delta = decode(flipped, t) - base
        changed = delta != 0
        if not np.isfinite(delta).all() or not (changed.sum(axis=1) == 1).all():
            continue
        elements = changed.argmax(axis=1)
        if (elements != elements[0]).any():
            continue
        was_set = (blocks[:, b // 8] >> (b % 8)) & 1
        signed_change = delta[np.arange(_TEMPLATES), elements] * np.where(was_set, -1.0, 1.0)
        owner[b], weight[b] = elements[0], signed_change[0]
    return _layout(t, blocks, base, owner, weight)


def _layout(t: QType, blocks: U8Array, base: F32Array, owner: npt.NDArray[np.int64],
            weight: npt.NDArray[np.float64]) -> CodeLayout | None:  # fmt: skip
    per_element = [np.flatnonzero(owner == e) for e in range(t.block_size)]
    bits = {len(p) for p in per_element}
    if len(bits) != 1 or 0 in bits:
        return None
    byte = np.stack([p // 8 for p in per_element])
    bit = np.stack([p % 8 for p in per_element]).astype(np.uint8)
    # order each element's bits by the size of their weight: the 2^r place is bit r
    magnitude = np.abs(np.stack([weight[p] for p in per_element]))
    order = np.argsort(magnitude, axis=1, kind="stable")
    byte, bit = np.take_along_axis(byte, order, 1), np.take_along_axis(bit, order, 1)
    signs = np.sign(np.take_along_axis(np.stack([weight[p] for p in per_element]), order, 1))
    signed = bool((signs[:, -1] < 0).all()) and bool((signs[:, :-1] > 0).all())
    for affine in (True, False):
        layout = CodeLayout(t, byte.astype(np.intp), bit, signed, affine)
        if not affine and layout.bits > _TABLE_MAX_BITS:
            return None
        if layout.write_codes(blocks, layout.read_codes(blocks)).tobytes() != blocks.tobytes():
            return None
        if not affine or _is_affine(layout, blocks, base):
            return layout
    return None


def _is_affine(layout: CodeLayout, blocks: U8Array, values: F32Array) -> bool:
    """Whether base + step · code gives back the decoded values for every code of the template blocks."""
    base, step = affine_grid(layout, blocks)
    lo, hi = layout.code_range
    for c in (lo, lo + 1, (lo + hi) // 2, hi):
        codes = np.full(values.shape, c, np.int32)
        if not np.allclose(layout.levels(blocks, codes), base + step * c, rtol=1e-5, atol=1e-6):
            return False
    return bool(np.allclose(base + step * layout.read_codes(blocks), values, rtol=1e-5, atol=1e-6))


def affine_grid(layout: CodeLayout, data: U8Array) -> tuple[F32Array, F32Array]:
    """(base, step) per element of encoded rows: value = base + step · code at the rows' stored scales."""
    n = data.shape[0]
    k = data.shape[1] // layout.qtype.type_size * layout.qtype.block_size
    zero = layout.levels(data, np.zeros((n, k), np.int32))
    one = layout.levels(data, np.ones((n, k), np.int32))
    return zero, one - zero
