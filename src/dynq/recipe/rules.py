"""Recipes as data: an ordered list of rules on GGUF tensor names, first match wins, plus a keep-list.

A rule matches a tensor when its regex is found in the tensor's name (`re.search`, as llama-quantize's
`--tensor-type` does), its block range (if any) holds the tensor's block, and its `when` condition (if any) holds
for the model. Block ranges are absolute (`0-2,58-60`) or relative to the blocks where the rule's regex occurs
(`first:3` = the first three blocks that have such a tensor; `last:2`), which lets one preset speak of "the first
MoE blocks" for any architecture.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dynq.core.qtypes import QType, qtype
from dynq.errors import BadInput, DynqError, VersionMismatch

# Tensors that always stay F32, whatever the rules say: llama.cpp never quantizes them either.
DEFAULT_KEEP = (
    r"norm",
    r"ffn_gate_inp",
    r"\.bias$",
    r"exp_probs_b",
    r"rope_freqs",
    r"pos_embd",
    r"token_types",
)

# The recipe format's version. Files without the key are version 1; a later format bumps it and keeps reading 1.
RECIPE_VERSION = 1
_RECIPE_KEYS = {"version", "name", "description", "keep", "default_keep", "default", "rules"}
_RULE_KEYS = {"match", "type", "blocks", "when", "optional", "note"}
# No model has this many blocks; a larger number in a recipe is a typo or an attempt to make a huge set.
MAX_BLOCK = 1 << 16
# How many blocks the absolute ranges of all of a recipe's rules may select together: each selected block is a set
# entry, so this bounds the memory a recipe can make dynq spend (a few MiB), counted before anything is expanded.
# Real recipes select a few thousand (DeepSeek-R1's 61 blocks times a few dozen rules).
MAX_RECIPE_BLOCKS = 1 << 18
_ITEM = re.compile(r"^\s*(?:(?P<a>\d+)\s*(?:-\s*(?P<b>\d+))?|(?P<rel>first|last)\s*:\s*(?P<k>\d+))\s*$")


class When(StrEnum):
    """A condition on the model: rules for MoE models only, or for dense models only."""

    MOE = "moe"
    DENSE = "dense"


@dataclass(frozen=True)
class BlockSpec:
    """A set of blocks: absolute numbers plus `first:K` / `last:K` counts resolved per model."""

    text: str
    absolute: frozenset[int]
    first: int = 0
    last: int = 0

    @staticmethod
    def parse(text: str, where: str, room: int = MAX_RECIPE_BLOCKS) -> BlockSpec:
        """Parse a block list; its absolute ranges may select at most `room` blocks, counted before any set is
        built (what a recipe's rules may still select, see `MAX_RECIPE_BLOCKS`)."""
        spans, first, last = _spans(str(text), where)
        _check_disjoint(spans, str(text), where)
        size = sum(b - a + 1 for a, b in spans)
        if size > room:
            raise BadInput(
                f"{where}: block ranges '{_short(str(text))}' bring the recipe to more than {MAX_RECIPE_BLOCKS:,} "
                f"selected blocks (the most a recipe may select, over all its rules); use fewer or narrower ranges"
            )
        absolute = frozenset(n for a, b in spans for n in range(a, b + 1))
        return BlockSpec(str(text), absolute, first, last)

    def resolve(self, present: Sequence[int]) -> frozenset[int]:
        """The blocks this spec selects, given the sorted blocks where the rule's regex occurs."""
        chosen = set(self.absolute)
        if self.first:
            chosen |= set(present[: self.first])
        if self.last:
            chosen |= set(present[-self.last :])
        return frozenset(chosen)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _spans(text: str, where: str) -> tuple[list[tuple[int, int]], int, int]:
    """The absolute ranges (inclusive pairs) and the first:/last: counts of a block list, nothing expanded."""
    spans: list[tuple[int, int]] = []
    first = last = 0
    for item in text.split(","):
        m = _ITEM.match(item)
        if m is None:
            raise BadInput(
                f"{where}: bad block range '{_short(item.strip())}' in '{_short(text)}'; use e.g. 0-2,58-60 or first:3"
            )
        if max(int(n) for n in m.group("a", "b", "k") if n is not None) > MAX_BLOCK:
            raise BadInput(f"{where}: block number too large in '{_short(item.strip())}' (at most {MAX_BLOCK})")
        if m.group("rel"):
            k = int(m.group("k"))
            if k < 1:
                raise BadInput(f"{where}: empty block range '{item.strip()}'; the count must be at least 1")
            if m.group("rel") == "first":
                if first:
                    raise BadInput(f"{where}: 'first:' given twice in '{_short(text)}'")
                first = k
            else:
                if last:
                    raise BadInput(f"{where}: 'last:' given twice in '{_short(text)}'")
                last = k
            continue
        a = int(m.group("a"))
        b = int(m.group("b")) if m.group("b") is not None else a
        if b < a:
            raise BadInput(f"{where}: empty block range '{item.strip()}' ({a} > {b})")
        spans.append((a, b))
    return spans, first, last


def _check_disjoint(spans: list[tuple[int, int]], text: str, where: str) -> None:
    """Refuse ranges that share a block, naming the first few shared blocks (found from the bounds alone)."""
    shared: set[int] = set()
    more = False
    end = -1
    for a, b in sorted(spans):
        if a <= end:
            hi = min(b, end)
            shared.update(range(a, min(hi, a + 7) + 1))
            more = more or hi > a + 7 or len(shared) > 8
        end = max(end, b)
    if shared:
        blocks = ", ".join(str(n) for n in sorted(shared)[:8]) + (", ..." if more else "")
        raise BadInput(f"{where}: block ranges in '{_short(text)}' overlap (block {blocks} given twice)")


@dataclass(frozen=True)
class Rule:
    index: int  # 1-based position in the recipe, as reasons cite it
    pattern: re.Pattern[str]
    qtype: QType
    blocks: BlockSpec | None = None
    when: When | None = None
    optional: bool = False  # for tensors only some architectures have: no warning when nothing matches
    note: str = ""

    @property
    def label(self) -> str:
        where = f" blocks {self.blocks.text}" if self.blocks else ""
        cond = f" ({self.when.value} models)" if self.when else ""
        return f"rule {self.index}: {self.pattern.pattern}{where}{cond}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"match": self.pattern.pattern, "type": self.qtype.name}
        if self.blocks:
            d["blocks"] = self.blocks.text
        if self.when:
            d["when"] = self.when.value
        if self.optional:
            d["optional"] = True
        if self.note:
            d["note"] = self.note
        return d


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    keep: tuple[re.Pattern[str], ...] = field(default_factory=lambda: _compile_all(DEFAULT_KEEP, "keep"))
    default: QType | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The recipe as complete data (what a quantized file records): the whole keep-list with `default_keep:
        false`, so that reading it back gives the same plan even if a later dynq keeps other tensors by default."""
        d: dict[str, Any] = {"version": RECIPE_VERSION, "name": self.name}
        if self.description:
            d["description"] = self.description
        d["keep"] = [p.pattern for p in self.keep]
        d["default_keep"] = False
        if self.default:
            d["default"] = self.default.name
        d["rules"] = [r.to_dict() for r in self.rules]
        return d


def compile_pattern(pattern: object, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise BadInput(f"{where}: 'match' must be a non-empty regular expression string")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise BadInput(f"{where}: bad regular expression '{pattern}': {e}") from None


def _compile_all(patterns: Iterable[str], where: str) -> tuple[re.Pattern[str], ...]:
    return tuple(compile_pattern(p, where) for p in patterns)


def _names(keys: Iterable[object]) -> str:
    return ", ".join(sorted(str(k) for k in keys))


def _text(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadInput(f"{where}: must be text")
    return str(value)


def _type(value: object, where: str) -> QType:
    if not isinstance(value, str):
        raise BadInput(f"{where}: 'type' must be a type name such as IQ1_S or Q4_K")
    try:
        t = qtype(value)
    except DynqError as e:
        raise BadInput(f"{where}: {e}") from None
    if not (t.quantizable or t.is_float):
        raise BadInput(f"{where}: type {t.name} is not a target llama.cpp can quantize to")
    return t


def _rule(index: int, raw: object, where: str, room: int = MAX_RECIPE_BLOCKS) -> Rule:
    at = f"{where}, rule {index}"
    if not isinstance(raw, dict):
        raise BadInput(f"{at}: each rule must be a mapping with 'match' and 'type'")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise BadInput(f"{at}: unknown key(s) {_names(unknown)}; allowed: {_names(_RULE_KEYS)}")
    for key in ("match", "type"):
        if key not in raw:
            raise BadInput(f"{at}: missing '{key}'")
    when = raw.get("when")
    if when is not None and (not isinstance(when, str) or when not in {w.value for w in When}):
        raise BadInput(f"{at}: 'when' must be 'moe' or 'dense', not {when!r:.40}")
    blocks = raw.get("blocks")
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, str | int)):
        raise BadInput(f"{at}: 'blocks' must be a string such as '0-2,58-60' or a block number")
    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        raise BadInput(f"{at}: 'optional' must be true or false")
    return Rule(
        index=index,
        pattern=compile_pattern(raw["match"], at),
        qtype=_type(raw["type"], at),
        blocks=BlockSpec.parse(str(blocks), at, room) if blocks is not None else None,
        when=When(when) if when is not None else None,
        optional=optional,
        note=_text(raw.get("note", ""), f"{at}, note"),
    )


def recipe_from_dict(data: object, where: str) -> Recipe:
    """Validate and build a recipe; `where` names its origin (file or preset) in error messages."""
    if not isinstance(data, dict):
        raise BadInput(f"{where}: a recipe is a mapping with 'name' and 'rules'")
    unknown = set(data) - _RECIPE_KEYS
    if unknown:
        raise BadInput(f"{where}: unknown key(s) {_names(unknown)}; allowed: {_names(_RECIPE_KEYS)}")
    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, list):
        raise BadInput(f"{where}: 'rules' must be a list")
    keep_raw = data.get("keep", [])
    if not isinstance(keep_raw, list):
        raise BadInput(f"{where}: 'keep' must be a list of regular expressions")
    default = data.get("default")
    if not rules_raw and default is None:
        raise BadInput(f"{where}: the recipe has no rules and no default type")
    version = data.get("version", 1)
    if version != RECIPE_VERSION:
        raise VersionMismatch(
            f"{where}: recipe version {version!r}; this dynq reads version {RECIPE_VERSION}, upgrade dynq"
        )
    default_keep = data.get("default_keep", True)
    if not isinstance(default_keep, bool):
        raise BadInput(f"{where}: 'default_keep' must be true or false")
    rules: list[Rule] = []
    room = MAX_RECIPE_BLOCKS  # what the rules still to come may select; each rule's ranges are counted first
    for i, raw in enumerate(rules_raw):
        rules.append(_rule(i + 1, raw, where, room))
        room -= len(rules[-1].blocks.absolute) if rules[-1].blocks else 0
    return Recipe(
        name=_text(data.get("name", where), f"{where}, name"),
        description=_text(data.get("description", ""), f"{where}, description").strip(),
        rules=tuple(rules),
        keep=_compile_all((*(DEFAULT_KEEP if default_keep else ()), *keep_raw), f"{where}, keep"),
        default=_type(default, f"{where}, default") if default is not None else None,
    )
