"""Pieces every encoder shares: the result type, fp16 rounding, block views and the scale-search helpers.
Byte layouts are packing.py's."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Encoded:
    data: torch.Tensor  # uint8 [n, row_bytes]: the blocks exactly as llama.cpp lays them out
    values: torch.Tensor  # float32 [n, k]: what dequantizing `data` gives back


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: round half to even in float32, as int32."""
    return torch.round(x).to(torch.int32)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """The float32 value an fp16 field holds after storing `x` (round to nearest even)."""
    return x.to(torch.float16).to(torch.float32)


def blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """[n, k] -> [n, k/size, size]."""
    return x.reshape(x.shape[0], -1, size)


def row_importance(importance: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The per-column importance broadcast against rows [n, k], or None."""
    if importance is None:
        return None
    return importance.to(device=x.device, dtype=torch.float32).reshape(1, -1).expand_as(x)


FP16_MAX = 65504.0


def stored(d: torch.Tensor) -> torch.Tensor:
    """The fp16 value a scale field holds, clamped to fp16's finite range (never inf)."""
    return fp16_round(d.clamp(-FP16_MAX, FP16_MAX))


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/den, 0 where den is 0 (degenerate blocks)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


class Best:
    """The lowest error seen so far per block and the parameters that gave it.

    A later candidate must win by more than `slack`: closed-form errors carry float32 cancellation noise of about
    1e-7·Σw·x², and near-ties (constant blocks, exact fits) should keep the first, llama.cpp-like candidate."""

    def __init__(self, like: torch.Tensor, *params: torch.Tensor, slack: torch.Tensor | None = None) -> None:
        self.err = torch.full_like(like, float("inf"))
        self.params = list(params)
        self.slack = torch.zeros_like(like) if slack is None else slack

    def offer(self, err: torch.Tensor, *params: torch.Tensor) -> None:
        better = err < self.err - self.slack
        self.err = torch.where(better, err, self.err)
        self.params = [torch.where(better, new, old) for new, old in zip(params, self.params, strict=True)]
