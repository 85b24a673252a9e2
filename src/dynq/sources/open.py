"""Opening a source: `zoo:NAME` (from the cache), `shapes:NAME`, a Hugging Face checkpoint directory or a GGUF
path (any shard of a split).

Nothing here touches the network: a zoo model that is not cached yet is an error naming `dynq fetch`.
"""

from __future__ import annotations

import os
from pathlib import Path

from dynq.core.source import TensorSource
from dynq.gguf_io.reader import GGUFModel
from dynq.sources import shapes, zoo
from dynq.sources.checkpoint import HFCheckpoint
from dynq.sources.described import describe

# What the public API takes for a model: an opened source, a spec string or a path.
SourceLike = TensorSource | str | os.PathLike[str]


def gguf_path(spec: str | os.PathLike[str], cache: Path) -> Path:
    """The local GGUF file a spec names: a path, or a cached zoo model."""
    text = str(spec)
    return zoo.cached_path(text, cache) if text.startswith(zoo.PREFIX) else Path(text)


def open_source(spec: SourceLike, cache: Path) -> TensorSource:
    """An opened source for `spec`; an already opened source is returned as it is. A GGUF file comes described
    from the cache (sources/described.py): its inventory and fingerprint are remembered per file, and its header is
    parsed by gguf-py only when something reads weights or the full metadata, and then once."""
    if isinstance(spec, TensorSource):
        return spec
    text = str(spec)
    if text.startswith(shapes.PREFIX):
        return shapes.open_shapes(text)
    if Path(text).is_dir():
        return HFCheckpoint(Path(text), cache, spec=text)
    return describe(gguf_path(text, cache), text, cache)


def open_gguf(spec: str | os.PathLike[str], cache: Path) -> GGUFModel:
    """A GGUF model with weights, parsed now: a path or a cached zoo model."""
    return GGUFModel(gguf_path(spec, cache), spec=str(spec))
