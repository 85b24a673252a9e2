"""The QuantPlan: every tensor's type and the reason for it, from names and shapes alone.

Resolution per tensor: the keep-list (and every 1-D tensor) stays F32; otherwise the first matching rule, else
the recipe's default; then llama.cpp's fallback when the row length does not divide the type's block.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dynq.core.qtypes import F32, QType, fallback_for
from dynq.core.sizes import ClassStats, census, class_breakdown
from dynq.core.tensors import ModelInventory, TensorClass, TensorInfo
from dynq.core.units import GIB
from dynq.errors import DynqError
from dynq.recipe.rules import Recipe, Rule, When

log = logging.getLogger(__name__)


class ReasonKind(StrEnum):
    KEEP = "keep"  # the keep-list or a 1-D tensor: F32
    RULE = "rule"  # the first matching rule
    DEFAULT = "default"  # no rule matched: the recipe's default type
    FALLBACK = "fallback"  # the rule's (or default's) type does not divide the row: llama.cpp's fallback


@dataclass(frozen=True)
class Reason:
    """Why a tensor got its type: the kind, the 1-based rule index where a rule decided, and the text people read."""

    kind: ReasonKind
    text: str
    rule: int | None = None

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "rule": self.rule, "text": self.text}


@dataclass(frozen=True)
class PlannedTensor:
    info: TensorInfo
    qtype: QType
    reason: Reason
    requested: QType  # what the rule asked for, before any fallback

    @property
    def nbytes(self) -> int:
        return self.qtype.nbytes(self.info.shape)

    @property
    def kept(self) -> bool:
        return self.reason.kind is ReasonKind.KEEP

    @property
    def needs_imatrix(self) -> bool:
        """llama-quantize would refuse this tensor without importance data (embeddings and output are exempt)."""
        exempt = self.info.tensor_class in (TensorClass.EMBEDDINGS, TensorClass.OUTPUT)
        return self.qtype.imatrix_required and not exempt


@dataclass(frozen=True)
class QuantPlan:
    source: str
    arch: str
    recipe: Recipe
    tensors: tuple[PlannedTensor, ...]
    warnings: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.info.n_elements for t in self.tensors)

    @property
    def bpw(self) -> float:
        return 8.0 * self.total_bytes / self.n_elements

    @property
    def census(self) -> dict[str, int]:
        return census(t.qtype for t in self.tensors)

    def by_class(self) -> dict[TensorClass, ClassStats]:
        return class_breakdown((t.info, t.qtype) for t in self.tensors)

    @property
    def dominant_type(self) -> QType | None:
        """The type holding the most bytes among quantized (not kept) tensors: the file's nominal type."""
        weight: dict[str, tuple[int, QType]] = {}
        for t in self.tensors:
            if not t.kept:
                n, _ = weight.get(t.qtype.name, (0, t.qtype))
                weight[t.qtype.name] = (n + t.nbytes, t.qtype)
        return max(weight.values(), key=lambda v: v[0])[1] if weight else None

    def needing_imatrix(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.needs_imatrix]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "arch": self.arch,
            "recipe": self.recipe.name,
            "total_bytes": self.total_bytes,
            "total_gib": self.total_bytes / GIB,
            "n_parameters": self.n_elements,
            "bpw": self.bpw,
            "census": self.census,
            "classes": {cls.value: s.to_dict() for cls, s in self.by_class().items()},
            "needs_imatrix": [t.info.name for t in self.needing_imatrix()],
            "warnings": list(self.warnings),
            "tensors": [
                {
                    "name": t.info.name,
                    "shape": list(t.info.shape),
                    "class": t.info.tensor_class.value,
                    "type": t.qtype.name,
                    "bytes": t.nbytes,
                    "reason": t.reason.text,
                    "reason_kind": t.reason.kind.value,
                    "rule": t.reason.rule,
                }
                for t in self.tensors
            ],
        }


def _present_blocks(rule: Rule, tensors: Sequence[TensorInfo]) -> list[int]:
    return sorted({b for t in tensors if (b := t.block) is not None and rule.pattern.search(t.name)})


def _rule_blocks(recipe: Recipe, inventory: ModelInventory) -> dict[int, frozenset[int] | None]:
    return {
        r.index: r.blocks.resolve(_present_blocks(r, inventory.tensors)) if r.blocks else None for r in recipe.rules
    }


def _applies(rule: Rule, is_moe: bool) -> bool:
    return rule.when is None or (rule.when is When.MOE) == is_moe


def _matches(rule: Rule, info: TensorInfo, selected: frozenset[int] | None) -> bool:
    return rule.pattern.search(info.name) is not None and (selected is None or info.block in selected)


def _keep_reason(recipe: Recipe, info: TensorInfo) -> Reason | None:
    if len(info.shape) < 2:
        return Reason(ReasonKind.KEEP, "keep: 1-D")
    for pattern in recipe.keep:
        if pattern.search(info.name):
            return Reason(ReasonKind.KEEP, f"keep: {pattern.pattern}")
    return None


def resolve(recipe: Recipe, inventory: ModelInventory) -> QuantPlan:
    """Resolve `recipe` over every tensor of `inventory`; no weight is read."""
    blocks = _rule_blocks(recipe, inventory)
    active = [r for r in recipe.rules if _applies(r, inventory.is_moe)]
    used: Counter[int] = Counter()
    planned = []
    for info in inventory.tensors:
        keep = _keep_reason(recipe, info)
        if keep is not None:
            planned.append(PlannedTensor(info, F32, keep, F32))
            continue
        rule = next((r for r in active if _matches(r, info, blocks[r.index])), None)
        if rule is not None:
            used[rule.index] += 1
            requested, reason = rule.qtype, Reason(ReasonKind.RULE, rule.label, rule.index)
        elif recipe.default is not None:
            requested, reason = recipe.default, Reason(ReasonKind.DEFAULT, "default")
        else:
            raise DynqError(
                f"recipe {recipe.name}: no rule matches tensor {info.name}; add a catch-all rule or a 'default' type"
            )
        actual = fallback_for(requested, info.row_length)
        if actual is not requested:
            text = f"fallback: row {info.row_length} % {requested.block_size} != 0 ({requested.name} asked by {reason})"
            reason = Reason(ReasonKind.FALLBACK, text, reason.rule)
        planned.append(PlannedTensor(info, actual, reason, requested))
    warnings = tuple(
        f"recipe {recipe.name}: {r.label} matches no tensor of {inventory.source}"
        for r in active
        if not used[r.index] and not r.optional
    )
    for w in warnings:
        log.warning(w)
    return QuantPlan(inventory.source, inventory.arch, recipe, tuple(planned), warnings)
