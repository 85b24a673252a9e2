"""Fields as llama.cpp lays them out in a block: little-endian integers, fp16 values, packed small integers."""

from __future__ import annotations

import torch


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 fields as little-endian bytes: [...] float -> [..., 2] uint8."""
    return u16_bytes(x.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF)


def u16_bytes(x: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes of 16-bit fields held in an integer tensor: [...] -> [..., 2] uint8."""
    x = x.to(torch.int32)
    return torch.stack((x & 0xFF, (x >> 8) & 0xFF), dim=-1).to(torch.uint8)


def u32_bytes(x: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes of 32-bit fields held in an int64 tensor: [...] -> [..., 4] uint8."""
    x = x.to(torch.int64)
    return torch.stack([(x >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack groups of 8/bits small integers along the last axis into bytes, lowest bits first.

    [..., m] with m a multiple of 8/bits -> [..., m*bits/8] uint8. For the strided layouts (element j in the low
    bits of byte j, element j+16 in the high bits) arrange `values` first so consecutive entries share a byte."""
    per = 8 // bits
    v = values.to(torch.int32).reshape(*values.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, device=values.device, dtype=torch.int32)
    return (v << shifts).sum(dim=-1).to(torch.uint8)
