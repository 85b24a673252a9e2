"""The public Python API; the CLI is a thin shell over these functions."""

from __future__ import annotations

from pathlib import Path

from dynq.gguf_io.imatrix import read_imatrix
from dynq.inspect import FileSummary, summarize
from dynq.recipe.coverage import TensorCoverage, imatrix_coverage
from dynq.recipe.plan import QuantPlan, resolve
from dynq.recipe.presets import load_recipe
from dynq.recipe.rules import Recipe
from dynq.sources.open import open_inventory, open_model


def plan(source: str, recipe: str | Recipe) -> QuantPlan:
    """Resolve `recipe` (preset name, YAML path or Recipe) for `source` (GGUF path, `zoo:X` or `shapes:X`)."""
    r = load_recipe(recipe) if isinstance(recipe, str) else recipe
    return resolve(r, open_inventory(source))


def coverage(quant_plan: QuantPlan, imatrix: str | Path) -> list[TensorCoverage]:
    """What `imatrix` covers of `quant_plan`; raises DynqError if it was made for another model."""
    return imatrix_coverage(quant_plan, read_imatrix(imatrix), imatrix)


def inspect(path: str) -> FileSummary:
    """Types, sizes and key metadata of a GGUF file (or `zoo:X`)."""
    return summarize(open_model(path))
