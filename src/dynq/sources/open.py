"""Opening a model spec: `zoo:NAME`, `shapes:NAME` or a GGUF path."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dynq.gguf_io.reader import GGUFModel
from dynq.sources import shapes, zoo
from dynq.sources.tensor_info import ModelInventory


def resolve_path(spec: str) -> Path:
    """A model spec that names weights (`zoo:NAME` or a path) as a local GGUF path, fetching zoo models."""
    if spec.startswith(zoo.PREFIX):
        return zoo.fetch(spec)
    return Path(spec)


def open_model(spec: str) -> GGUFModel:
    """A model with weights: `zoo:NAME` or a GGUF path (any shard of a split)."""
    return GGUFModel(resolve_path(spec))


def open_inventory(spec: str) -> ModelInventory:
    """Names and shapes of `spec`: `shapes:NAME`, `zoo:NAME` or a GGUF path."""
    if spec.startswith(shapes.PREFIX):
        return shapes.shape_inventory(spec)
    return replace(open_model(spec).inventory(), source=spec)
