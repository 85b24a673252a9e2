"""What the solver is asked: the tensors it may choose for, and the tensors a base recipe pins (the size target in
the units people give it is parsed by core/units.parse_target)."""

from __future__ import annotations

from dataclasses import replace

from dynq.core.qtypes import QType, qtype
from dynq.core.tensors import ModelInventory
from dynq.recipe.plan import QuantPlan, resolve
from dynq.recipe.presets import uniform_recipe
from dynq.recipe.rules import Recipe


def pinned_by(base: Recipe, inventory: ModelInventory) -> dict[str, QType]:
    """The tensors a rule of `base` matches, at the type it resolves to: fixed for the solver. The base's default
    type (if any) pins nothing, or every tensor would be pinned."""
    sentinel = qtype("F16")
    plan = resolve(replace(base, default=sentinel), inventory)
    return {t.info.name: t.qtype for t in plan.tensors if not t.kept and t.reason.rule is not None}


def solver_start(inventory: ModelInventory, base: Recipe | None) -> QuantPlan:
    """The plan a solve starts from: every weight matrix free (at Q8_0, a placeholder) except what the keep-list
    keeps: `base`'s own keep-list when there is a base, else the default one."""
    start = uniform_recipe(qtype("Q8_0"))
    return resolve(replace(start, keep=base.keep) if base is not None else start, inventory)
