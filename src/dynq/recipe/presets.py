"""Finding recipes: shipped presets (YAML files beside this module), generated `uniform-<type>`, or a user's file."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import yaml

from dynq.core.qtypes import QType, qtype, quantizable_qtypes
from dynq.errors import DynqError
from dynq.recipe.rules import RECIPE_VERSION, Recipe, recipe_from_dict

UNIFORM = "uniform-"


def _preset_files() -> dict[str, Path]:
    folder = Path(str(files("dynq.recipe") / "presets"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def preset_names() -> list[str]:
    """Every preset name: the shipped files and one `uniform-<type>` per quantizable type."""
    return sorted(_preset_files()) + [UNIFORM + t.name.lower() for t in quantizable_qtypes()]


def uniform_recipe(t: QType) -> Recipe:
    """The naive baseline: every weight matrix at `t` (the keep-list and row-length fallbacks aside)."""
    return recipe_from_dict(
        {
            "version": RECIPE_VERSION,
            "name": UNIFORM + t.name.lower(),
            "description": f"every weight matrix at {t.name}: the uniform baseline dynamic recipes are judged against",
            "rules": [{"match": ".", "type": t.name, "note": "uniform"}],
        },
        f"preset {UNIFORM}{t.name.lower()}",
    )


# A recipe is a page of rules; anything much larger is not one.
MAX_RECIPE_BYTES = 1 << 20


class _RecipeLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a recipe never needs them, and a chain of aliases expands to a structure
    exponentially larger than the file."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("anchors and aliases (*name) are not allowed in a recipe")
        return super().compose_node(parent, index)


def load_yaml_recipe(path: Path) -> Recipe:
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES or not path.is_file():
            raise DynqError(f"{path}: not a recipe (a regular file of at most {MAX_RECIPE_BYTES >> 20} MiB)")
        data = yaml.load(path.read_bytes().decode("utf-8"), Loader=_RecipeLoader)  # a SafeLoader
    except OSError as e:
        raise DynqError(f"{path}: cannot read recipe ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DynqError(f"{path}: not a text file in UTF-8 (byte {e.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        raise DynqError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return recipe_from_dict(data, str(path))


# What the public API takes for a recipe: a preset name, a YAML file or a Recipe.
RecipeLike = Recipe | str | os.PathLike[str]


def as_recipe(recipe: RecipeLike) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))


def load_recipe(spec: str) -> Recipe:
    """A preset name (`dyn-iq1_s`, `uniform-q4_k`, `f16` ...) or the path of a YAML recipe."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise DynqError(f"{path}: no such recipe file")
        return load_yaml_recipe(path)
    shipped = _preset_files()
    if spec in shipped:
        return load_yaml_recipe(shipped[spec])
    if spec.startswith(UNIFORM):
        try:
            t = qtype(spec.removeprefix(UNIFORM))
        except DynqError:
            t = None
        if t is not None and t.quantizable:
            return uniform_recipe(t)
    raise DynqError(f"unknown recipe '{spec}'; use a YAML file or one of: {', '.join(preset_names())}")
