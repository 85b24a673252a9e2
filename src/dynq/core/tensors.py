"""What a tensor is before any weight is read: its GGUF name, shape and source type, and the model around it.

This is core vocabulary: sources (GGUF files, shape inventories, checkpoints) produce it, the planner and the
writers consume it, and it imports nothing of theirs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from dynq.core.qtypes import QType, qtype


@dataclass(frozen=True)
class CheckpointDType:
    """A source storage type GGUF has no type for: a checkpoint's FP8 weights (their block scales are separate
    tensors that the source applies when it loads the weight as float32)."""

    name: str
    bits: int
    is_float: bool = True

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * self.bits // 8


F8_E4M3 = CheckpointDType("F8_E4M3", 8)
F8_E5M2 = CheckpointDType("F8_E5M2", 8)
# How a tensor is stored in its source: a GGML type (GGUF files, and the F32/F16/BF16 of checkpoints) or not.
SourceDType = QType | CheckpointDType


def source_dtype(name: str) -> SourceDType:
    """A storage type by name: GGML names (`Q4_K`, `BF16`) and safetensors' (`F8_E4M3`, `F8_E5M2`)."""
    foreign = {t.name: t for t in (F8_E4M3, F8_E5M2)}
    return foreign[name] if name in foreign else qtype(name)


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def block_of(name: str) -> int | None:
    """The block number of a tensor name (`blk.N.`), or None for tensors outside the blocks."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def kind_of(name: str) -> str:
    """A tensor's kind: its name without the `blk.N.` prefix."""
    return _BLOCK.sub("", name, count=1)


class TensorClass(StrEnum):
    """The roles the size report and the recipes reason about."""

    ROUTED_EXPERTS = "routed_experts"
    SHARED_EXPERTS = "shared_experts"
    ATTENTION = "attention"
    DENSE_FFN = "dense_ffn"
    EMBEDDINGS = "embeddings"
    OUTPUT = "output"
    OTHER = "other"  # norms, router, biases, rope factors: the small tensors that stay F32


_CLASS_PATTERNS: tuple[tuple[re.Pattern[str], TensorClass], ...] = (
    (re.compile(r"norm|ffn_gate_inp|exp_probs_b|\.bias$|rope_"), TensorClass.OTHER),
    (re.compile(r"_(ch)?exps\b"), TensorClass.ROUTED_EXPERTS),
    (re.compile(r"_shexp\b"), TensorClass.SHARED_EXPERTS),
    (re.compile(r"\.attn_"), TensorClass.ATTENTION),
    (re.compile(r"\.ffn_"), TensorClass.DENSE_FFN),
    (re.compile(r"^(token_embd|per_layer_token_embd|pos_embd|token_types)\."), TensorClass.EMBEDDINGS),
    (re.compile(r"^output\."), TensorClass.OUTPUT),
)


def classify(name: str, n_dims: int) -> TensorClass:
    if n_dims < 2:
        return TensorClass.OTHER
    for pattern, cls in _CLASS_PATTERNS:
        if pattern.search(name):
            return cls
    return TensorClass.OTHER


@dataclass(frozen=True)
class TensorInfo:
    """One tensor. `shape` is in GGUF (ggml) order: shape[0] is the row length, shape[2] the expert count."""

    name: str
    shape: tuple[int, ...]
    dtype: SourceDType

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def row_length(self) -> int:
        return self.shape[0]

    @property
    def block(self) -> int | None:
        return block_of(self.name)

    @property
    def kind(self) -> str:
        """The tensor's name without its `blk.N.` prefix: what a recipe rule or a profile group names."""
        return kind_of(self.name)

    @property
    def tensor_class(self) -> TensorClass:
        return classify(self.name, len(self.shape))

    @property
    def nbytes(self) -> int:
        return self.dtype.nbytes(self.shape)


@dataclass(frozen=True)
class ModelInventory:
    """A model's tensors and key metadata: all a plan needs, with or without weights behind it."""

    source: str
    arch: str
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, object] = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        declared = self.metadata.get(f"{self.arch}.block_count")
        if isinstance(declared, int):
            return declared
        blocks = [t.block for t in self.tensors if t.block is not None]
        return max(blocks) + 1 if blocks else 0

    @property
    def is_moe(self) -> bool:
        return any(t.tensor_class is TensorClass.ROUTED_EXPERTS for t in self.tensors)

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)
