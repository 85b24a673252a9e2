"""The one registry of GGML tensor types.

Sizes come from `gguf.GGML_QUANT_SIZES`; the policy facts (which types llama.cpp can quantize to, which need an
importance matrix, the fallback for rows that do not divide the block) are llama.cpp's, read from the llama.cpp
tree this project builds against (`src/llama-quant.cpp`, `ggml/src/ggml.c`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, dequantize

from dynq.errors import DynqError

# Targets llama-quantize can produce and gguf can decode again. Q1_0 and Q2_0 are left out: the gguf package has no
# decoder for Q1_0 and does not know Q2_0, so neither could be checked. NVFP4 has no llama-quantize file type.
QUANTIZABLE = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4",
)  # fmt: skip
FLOATS = ("F32", "F16", "BF16")

# llama-quantize refuses these without an imatrix (`tensor_requires_imatrix`; token_embd and output are exempt).
IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
# ggml itself asserts on these without an imatrix (`ggml_quantize_requires_imatrix`), whatever the tensor.
IMATRIX_ASSERTED = frozenset({"IQ1_S", "IQ2_XXS", "IQ2_XS"})

# `tensor_type_fallback`: the type llama.cpp uses when a row length does not divide the block size. A 32-block type
# that still does not fit becomes F16.
_FALLBACK = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


@dataclass(frozen=True)
class QType:
    """One GGML tensor type: its block layout and llama.cpp's rules for it."""

    name: str
    ggml: GGMLQuantizationType
    block_size: int
    type_size: int
    quantizable: bool
    imatrix_required: bool
    imatrix_asserted: bool
    fallback_name: str | None

    @property
    def bpw(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def is_float(self) -> bool:
        return self.name in FLOATS

    @property
    def decodable(self) -> bool:
        """Whether the gguf package can dequantize it (every type a model may hold, in practice)."""
        return _decodable(self.ggml)

    @property
    def file_type(self) -> int:
        """llama.cpp's `general.file_type` for a file mostly of this type (K types name their _M mix)."""
        if self.name == "F32":
            return int(LlamaFileType.ALL_F32)
        for name in (f"MOSTLY_{self.name}", f"MOSTLY_{self.name}_M", f"MOSTLY_{self.name}_MOE"):
            if name in LlamaFileType.__members__:
                return int(LlamaFileType[name])
        return int(LlamaFileType.GUESSED)

    def fits(self, row_length: int) -> bool:
        return row_length % self.block_size == 0

    def row_bytes(self, row_length: int) -> int:
        if not self.fits(row_length):
            raise DynqError(f"type {self.name}: a row of {row_length} is not a multiple of {self.block_size}")
        return row_length // self.block_size * self.type_size

    def nbytes(self, shape: Iterable[int]) -> int:
        """Bytes of a tensor of this type; `shape` is in GGUF order (row length first)."""
        dims = list(shape)
        rows = 1
        for d in dims[1:]:
            rows *= d
        return self.row_bytes(dims[0]) * rows

    def __str__(self) -> str:
        return self.name


@cache
def _decodable(ggml_type: GGMLQuantizationType) -> bool:
    _, size = GGML_QUANT_SIZES[ggml_type]
    if ggml_type.name in FLOATS:
        return True
    try:
        dequantize(np.zeros((1, size), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


@cache
def _registry() -> dict[str, QType]:
    types = {}
    for ggml_type, (block, size) in GGML_QUANT_SIZES.items():
        name = ggml_type.name
        types[name] = QType(
            name=name,
            ggml=ggml_type,
            block_size=block,
            type_size=size,
            quantizable=name in QUANTIZABLE,
            imatrix_required=name in IMATRIX_REQUIRED,
            imatrix_asserted=name in IMATRIX_ASSERTED,
            fallback_name=_FALLBACK.get(name),
        )
    return types


def all_qtypes() -> list[QType]:
    return sorted(_registry().values(), key=lambda t: t.ggml.value)


def quantizable_qtypes() -> list[QType]:
    return [t for t in all_qtypes() if t.quantizable]


def qtype(name: str | int | GGMLQuantizationType) -> QType:
    """Look a type up by name (any case) or GGML number."""
    registry = _registry()
    if isinstance(name, int):  # GGMLQuantizationType is an IntEnum
        for t in registry.values():
            if t.ggml.value == int(name):
                return t
        raise DynqError(f"unknown GGML type number {int(name)}")
    found = registry.get(name.strip().upper())
    if found is None:
        known = ", ".join(t.name for t in quantizable_qtypes() + [registry[f] for f in FLOATS])
        raise DynqError(f"unknown tensor type '{name}'; known types: {known}")
    return found


F32 = qtype("F32")
F16 = qtype("F16")


def fallback_for(target: QType, row_length: int) -> QType:
    """The type llama.cpp actually uses for `target` on rows of `row_length` (itself when it fits)."""
    if target.fits(row_length):
        return target
    if target.fallback_name is not None:
        step = qtype(target.fallback_name)
        if step.fits(row_length):
            return step
    return F16
