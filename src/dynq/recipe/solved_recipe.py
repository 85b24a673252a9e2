"""From a plan and per-tensor predicted costs to the solver's units, and from its choice back to a recipe.

The recipe written is an ordinary one: the plan's keep-list, then one rule per (tensor name without its block
prefix, type) with the blocks listed, each anchored so that it matches exactly the tensors it was made from. It
resolves on the same model to exactly the chosen types, and `solve_plan` checks that it does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

import yaml

from dynq.core.qtypes import QType
from dynq.core.tensors import ModelInventory, TensorClass, TensorInfo
from dynq.core.units import MIB
from dynq.errors import DynqError
from dynq.recipe.plan import PlannedTensor, QuantPlan, ReasonKind, resolve
from dynq.recipe.rules import BlockSpec, Recipe, Rule
from dynq.recipe.solve import Option, Solution, Unit, below_minimum, solve

Costs = Mapping[str, Mapping[str, float]]  # tensor name -> type name -> predicted cost
_NO_PINS: Mapping[str, QType] = MappingProxyType({})
_EXEMPT = (TensorClass.EMBEDDINGS, TensorClass.OUTPUT)  # llama.cpp quantizes these without an imatrix at any type


def _unavailable(info: TensorInfo, t: QType, costs: Costs, has_imatrix: bool) -> str | None:
    """Why type `t` is not a candidate for the tensor, or None when it is."""
    if not t.fits(info.row_length):
        return f"{t.name}: row {info.row_length} % {t.block_size} != 0"
    if t.imatrix_required and not has_imatrix and info.tensor_class not in _EXEMPT:
        return f"{t.name}: needs an imatrix"
    if t.name not in costs.get(info.name, {}):
        return f"{t.name}: no cost"
    return None


def _candidates(info: TensorInfo, types: Sequence[QType], costs: Costs, has_imatrix: bool) -> dict[str, Option]:
    why = {t.name: _unavailable(info, t, costs, has_imatrix) for t in types}
    found = {
        t.name: Option(t, t.nbytes(info.shape), float(costs[info.name][t.name])) for t in types if why[t.name] is None
    }
    if not found:
        reasons = "; ".join(w for w in why.values() if w) or "no types given"
        raise DynqError(f"tensor {info.name}: no candidate type is available ({reasons})")
    return found


def _tie_groups(free: Sequence[PlannedTensor], ties: Sequence[re.Pattern[str]]) -> list[list[PlannedTensor]]:
    """Tensors matching one tie pattern in one block form a group (first matching pattern wins); others alone."""
    groups: dict[tuple[int, int | None] | str, list[PlannedTensor]] = {}
    for t in free:
        tie = next((i for i, p in enumerate(ties) if p.search(t.info.name)), None)
        key: tuple[int, int | None] | str = (tie, t.info.block) if tie is not None else t.info.name
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def _group_pin(group: Sequence[PlannedTensor], pinned: Mapping[str, QType]) -> QType | None:
    """The one type a group is pinned to through any of its tensors, or None."""
    pins = {pinned[t.info.name].name: pinned[t.info.name] for t in group if t.info.name in pinned}
    if len(pins) > 1:
        names = ", ".join(t.info.name for t in group)
        raise DynqError(f"tensors {names} are tied but pinned to different types ({', '.join(sorted(pins))})")
    pin = next(iter(pins.values()), None)
    bad = next((t.info for t in group if pin is not None and not pin.fits(t.info.row_length)), None)
    if pin is not None and bad is not None:
        raise DynqError(
            f"tensor {bad.name}: pinned type {pin.name} does not divide its row length {bad.row_length} "
            f"(block {pin.block_size})"
        )
    return pin


def _unit(group: Sequence[PlannedTensor], types: Sequence[QType], costs: Costs, has_imatrix: bool) -> Unit:
    per_tensor = [_candidates(t.info, types, costs, has_imatrix) for t in group]
    shared = [t.name for t in types if all(t.name in c for c in per_tensor)]
    names = tuple(t.info.name for t in group)
    if not shared:
        raise DynqError(f"tensors {', '.join(names)} are tied but share no available type")
    options = tuple(
        Option(per_tensor[0][n].qtype, sum(c[n].nbytes for c in per_tensor), math.fsum(c[n].cost for c in per_tensor))
        for n in shared
    )
    return Unit(names, options)


def _check_pins(plan: QuantPlan, pinned: Mapping[str, QType]) -> None:
    by_name = {t.info.name: t for t in plan.tensors}
    for name, t in pinned.items():
        if name not in by_name:
            raise DynqError(f"pinned tensor {name} is not in the plan of {plan.source}")
        kept = by_name[name]
        if kept.kept and t is not kept.qtype:
            raise DynqError(
                f"tensor {name} is kept {kept.qtype.name} by the keep-list; it cannot be pinned to {t.name}"
            )


def units_from_plan(
    plan: QuantPlan,
    costs: Costs,
    types: Sequence[QType],
    *,
    has_imatrix: bool,
    pinned: Mapping[str, QType] = _NO_PINS,
    ties: Sequence[re.Pattern[str]] | None = None,
) -> tuple[list[Unit], dict[str, QType]]:
    """The solver's units (free tensors and their candidate types) and the fixed tensors (kept and pinned).

    A type is a candidate when it divides the row (no silent fallback), is allowed without an imatrix when there is
    none (token_embd and output are exempt, as in llama.cpp) and has a cost. Tensors matching one tie pattern within
    one block form one unit; a pin on any of them fixes the whole group.
    """
    _check_pins(plan, pinned)
    for t in types:
        if not (t.quantizable or t.is_float):
            raise DynqError(f"type {t.name} is not a target llama.cpp can quantize to")
    fixed = {t.info.name: t.qtype for t in plan.tensors if t.kept}
    units: list[Unit] = []
    for group in _tie_groups([t for t in plan.tensors if not t.kept], ties or ()):
        pin = _group_pin(group, pinned)
        if pin is not None:
            fixed.update((t.info.name, pin) for t in group)
        else:
            units.append(_unit(group, types, costs, has_imatrix))
    return units, fixed


def _fixed_bytes(plan: QuantPlan, fixed: Mapping[str, QType]) -> int:
    return sum(fixed[t.info.name].nbytes(t.info.shape) for t in plan.tensors if t.info.name in fixed)


def solve_plan(
    plan: QuantPlan,
    costs: Costs,
    types: Sequence[QType],
    target_bytes: int,
    *,
    has_imatrix: bool,
    pinned: Mapping[str, QType] = _NO_PINS,
    ties: Sequence[re.Pattern[str]] | None = None,
    name: str = "solved",
    description: str = "",
    reported: Costs | None = None,
) -> tuple[QuantPlan, Solution]:
    """The plan of least predicted cost whose file is at most `target_bytes`, resolved from the recipe that writes
    it down. The Solution covers the free tensors (its nbytes excludes kept and pinned ones); the plan's
    total_bytes is the whole file. The recipe's notes state `reported` costs (default: `costs`), so a solve on
    reweighted costs still writes down the profile's own predictions."""
    units, fixed = units_from_plan(plan, costs, types, has_imatrix=has_imatrix, pinned=pinned, ties=ties)
    fixed_bytes = _fixed_bytes(plan, fixed)
    minimum = fixed_bytes + sum(min(o.nbytes for o in u.options) for u in units)
    if minimum > target_bytes:
        raise below_minimum(target_bytes, minimum)  # named in the whole file's bytes, as the user gave them
    solution = solve(units, target_bytes - fixed_bytes)
    kept = {t.info.name for t in plan.tensors if t.kept}
    choice = {**{n: t for n, t in fixed.items() if n not in kept}, **solution.choice}  # pins, then the solver's
    noted = costs if reported is None else reported
    predicted = math.fsum(noted[n][t.name] for n, t in solution.choice.items())
    text = description or f"solved for {target_bytes} B on {plan.source}: predicted cost {predicted:.4g}"
    recipe = solution_recipe(plan, choice, noted, name=name, description=text)
    solved = resolve(recipe, ModelInventory(plan.source, plan.arch, tuple(t.info for t in plan.tensors)))
    _check_reproduces(plan, solved, choice)
    return solved, solution


def _check_reproduces(plan: QuantPlan, solved: QuantPlan, choice: Mapping[str, QType]) -> None:
    for old, new in zip(plan.tensors, solved.tensors, strict=True):
        want = old.qtype if old.kept else choice[old.info.name]
        by_rule = new.reason.kind is ReasonKind.RULE
        if new.qtype is not want or new.kept != old.kept or (not old.kept and not by_rule):
            raise AssertionError(f"the solved recipe gives {new.info.name} {new.qtype.name}, not {want.name}")


# --- the recipe ---


def compact_blocks(blocks: Iterable[int]) -> str:
    """Block numbers as ranges: [0, 1, 2, 3, 7, 9, 10] -> '0-3,7,9-10'."""
    runs: list[list[int]] = []
    for b in sorted(set(blocks)):
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in runs)


def _size(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f} MiB" if nbytes >= MIB // 10 else f"{nbytes / 1024:.1f} KiB"


def _note(tensors: Sequence[PlannedTensor], t: QType, costs: Costs) -> str:
    nbytes = sum(t.nbytes(p.info.shape) for p in tensors)
    known = [costs.get(p.info.name, {}).get(t.name) for p in tensors]
    cost = f"{math.fsum(c for c in known if c is not None):.4g}" if all(c is not None for c in known) else "n/a"
    return f"predicted cost {cost}, {_size(nbytes)}"


def _rule_key(info: TensorInfo) -> tuple[str, bool]:
    """The name a rule matches on: the name without its `blk.N.` prefix for block tensors, else the whole name."""
    return info.kind, info.block is not None


def _chosen(p: PlannedTensor, choice: Mapping[str, QType]) -> QType:
    """The tensor's type in `choice`, checked: every quantized tensor has one that divides its row; a kept tensor
    keeps its own (the keep-list comes before any rule)."""
    t = choice.get(p.info.name)
    if p.kept and t is not None and t is not p.qtype:
        raise DynqError(f"tensor {p.info.name} is kept {p.qtype.name} by the keep-list; it cannot be {t.name}")
    if p.kept:
        return p.qtype
    if t is None:
        raise DynqError(f"the choice has no type for tensor {p.info.name}")
    if not t.fits(p.info.row_length):
        raise DynqError(f"tensor {p.info.name}: type {t.name} does not divide its row length {p.info.row_length}")
    return t


def solution_recipe(
    plan: QuantPlan,
    choice: Mapping[str, QType],
    costs: Costs,
    name: str = "solved",
    description: str = "",
) -> Recipe:
    """A first-match recipe that resolves to exactly `choice` on the plan's model; kept tensors stay kept."""
    groups: dict[tuple[str, bool, str], list[PlannedTensor]] = {}
    for p in plan.tensors:
        t = _chosen(p, choice)
        if not p.kept:
            groups.setdefault((*_rule_key(p.info), t.name), []).append(p)
    rules = []
    for index, ((key, in_block, _), members) in enumerate(groups.items(), start=1):
        t = choice[members[0].info.name]
        pattern = rf"^blk\.\d+\.{re.escape(key)}$" if in_block else f"^{re.escape(key)}$"
        blocks = None
        if in_block:
            text = compact_blocks(b for p in members if (b := p.info.block) is not None)
            blocks = BlockSpec.parse(text, f"recipe {name}, rule {index}")
        rules.append(Rule(index, re.compile(pattern), t, blocks, note=_note(members, t, costs)))
    return Recipe(name=name, rules=tuple(rules), keep=plan.recipe.keep, description=description)


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as YAML that `recipe_from_dict` reads back to the same recipe."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
