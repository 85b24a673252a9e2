"""Which tensors of a plan an importance matrix covers, and how well (experts without data)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dynq.core.importance import Imatrix
from dynq.errors import DynqError
from dynq.recipe.plan import PlannedTensor, QuantPlan


class Coverage(StrEnum):
    COVERED = "covered"
    PARTIAL = "partial"  # some experts (matrices) saw no token
    MISSING = "missing"


@dataclass(frozen=True)
class TensorCoverage:
    name: str
    status: Coverage
    n_mat: int
    n_mat_without_data: int
    min_tokens: int
    required: bool

    def label(self) -> str:
        if self.status is Coverage.PARTIAL:
            return f"partial ({self.n_mat - self.n_mat_without_data}/{self.n_mat} experts)"
        return self.status.value


def _tensor_coverage(t: PlannedTensor, imatrix: Imatrix, origin: str) -> TensorCoverage:
    n_mat = t.info.shape[2] if len(t.info.shape) > 2 else 1
    entry = imatrix.entries.get(t.info.name)
    if entry is None:
        return TensorCoverage(t.info.name, Coverage.MISSING, n_mat, n_mat, 0, t.needs_imatrix)
    shaped = entry.with_row_length(t.info.row_length)
    if shaped is None or shaped.n_mat != n_mat:
        raise DynqError(
            f"{origin}: entry {t.info.name} has {entry.sums.size} values, the tensor needs "
            f"{t.info.row_length}×{n_mat}; this imatrix was made for another model"
        )
    empty = int((shaped.counts <= 0).sum())
    status = Coverage.COVERED if empty == 0 else Coverage.MISSING if empty == n_mat else Coverage.PARTIAL
    return TensorCoverage(t.info.name, status, n_mat, empty, int(shaped.counts.min()), t.needs_imatrix)


def imatrix_coverage(plan: QuantPlan, imatrix: Imatrix, origin: str | Path) -> list[TensorCoverage]:
    """Coverage of every quantized (not kept) tensor of `plan`; raises if the imatrix is for another model."""
    return [_tensor_coverage(t, imatrix, str(origin)) for t in plan.tensors if not t.kept]


def coverage_summary(cov: list[TensorCoverage], imatrix: Imatrix, origin: str | Path) -> dict[str, Any]:
    return {
        "file": str(origin),
        "datasets": imatrix.datasets,
        "chunk_count": imatrix.chunk_count,
        "covered": sum(c.status is Coverage.COVERED for c in cov),
        "partial": {c.name: c.n_mat_without_data for c in cov if c.status is Coverage.PARTIAL},
        "missing": [c.name for c in cov if c.status is Coverage.MISSING],
        "missing_required": [c.name for c in cov if c.status is Coverage.MISSING and c.required],
    }
