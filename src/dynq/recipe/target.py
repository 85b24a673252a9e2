"""What the solver is asked: a size target in the units people give it, the tensors it may choose for, and the tensors
a base recipe pins."""

from __future__ import annotations

import re
from dataclasses import replace

from dynq.core.qtypes import QType, qtype
from dynq.core.tensors import ModelInventory
from dynq.errors import DynqError
from dynq.recipe.plan import QuantPlan, resolve
from dynq.recipe.presets import uniform_recipe
from dynq.recipe.rules import Recipe

_TARGET = re.compile(r"^\s*(?P<n>[0-9]*\.?[0-9]+)\s*(?P<unit>bpw|[kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip


def parse_target(text: str, n_parameters: int) -> int:
    """'600MiB', '0.6GiB', '650M' (powers of 1000, as --split-max-size), '123456', or '2.5bpw' -> bytes of tensor
    data."""
    m = _TARGET.match(text)
    if m is None:
        raise DynqError(f"bad target '{text}'; use a size such as 600MiB or 1.2G, or bits per weight such as 2.5bpw")
    value, unit = float(m.group("n")), (m.group("unit") or "").lower()
    if unit == "bpw":
        target = value * n_parameters / 8
    else:
        target = value * _SCALE[unit.removesuffix("b") if unit != "b" else unit]
    if target <= 0:
        raise DynqError(f"bad target '{text}'; it must be positive")
    return int(target)


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
