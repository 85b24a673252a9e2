"""Size accounting shared by plans and file inspection: bytes, bits per weight, census, per-class breakdown."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from dynq.core.tensors import SourceDType, TensorClass, TensorInfo


@dataclass(frozen=True)
class ClassStats:
    n_tensors: int
    n_elements: int
    nbytes: int

    @property
    def bpw(self) -> float:
        return 8.0 * self.nbytes / self.n_elements if self.n_elements else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "tensors": self.n_tensors,
            "parameters": self.n_elements,
            "bytes": self.nbytes,
            "bpw": self.bpw,
        }


def class_breakdown(items: Iterable[tuple[TensorInfo, SourceDType]]) -> dict[TensorClass, ClassStats]:
    """Tensors, parameters, bytes and bpw per tensor class, in TensorClass order."""
    acc: dict[TensorClass, list[int]] = {}
    for info, t in items:
        row = acc.setdefault(info.tensor_class, [0, 0, 0])
        row[0] += 1
        row[1] += info.n_elements
        row[2] += t.nbytes(info.shape)
    return {cls: ClassStats(*acc[cls]) for cls in TensorClass if cls in acc}


def census(types: Iterable[SourceDType]) -> dict[str, int]:
    """Tensor count per type, most common first."""
    counts = Counter(t.name for t in types)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
