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
    """An opened source for `spec`; an already opened source is returned as it is."""
    if isinstance(spec, TensorSource):
        return spec
    text = str(spec)
    if text.startswith(shapes.PREFIX):
        return shapes.open_shapes(text)
    if Path(text).is_dir():
        return HFCheckpoint(Path(text), cache, spec=text)
    return GGUFModel(gguf_path(text, cache), spec=text)


def open_described(spec: SourceLike, cache: Path) -> TensorSource:
    """Like `open_source`, with a GGUF file's description from the cache (see sources/described.py): for what
    plans and sizes, which needs no weights."""
    if isinstance(spec, TensorSource) or str(spec).startswith(shapes.PREFIX) or Path(str(spec)).is_dir():
        return open_source(spec, cache)
    return describe(gguf_path(spec, cache), str(spec), cache)
