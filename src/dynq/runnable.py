"""The GGUF file llama.cpp's runtime loads for a source: the file itself, or a checkpoint's F16 conversion (written
once into the cache). What runs a model (imatrix, profile, evaluation) asks here."""

from __future__ import annotations

import os
from pathlib import Path

from dynq.core.context import RunContext, context
from dynq.core.source import TensorSource
from dynq.errors import DynqError
from dynq.quantize import quantize
from dynq.recipe.plan import resolve
from dynq.recipe.presets import as_recipe
from dynq.sources.checkpoint import HFCheckpoint, checkpoint_fingerprint
from dynq.sources.described import GGUFFile
from dynq.sources.open import SourceLike, gguf_path


def runnable_file(source: SourceLike, ctx: RunContext) -> Path:
    """The GGUF file llama.cpp's runtime loads for `source`."""
    if isinstance(source, GGUFFile):
        return source.path
    if isinstance(source, HFCheckpoint) or (not isinstance(source, TensorSource) and Path(source).is_dir()):
        return f16_conversion(source, ctx=ctx)
    if isinstance(source, TensorSource):
        raise DynqError(f"{source.spec}: llama.cpp runs GGUF files; quantize this source first")
    return gguf_path(source, ctx.cache_dir)


def f16_conversion(source: HFCheckpoint | str | os.PathLike[str], *, ctx: RunContext | None = None) -> Path:
    """A Hugging Face checkpoint's F16 GGUF (llama.cpp's conversion of it, byte for byte in its tensors), for what
    runs the model (imatrix, profile, evaluation); written once into the cache under the checkpoint's content
    fingerprint."""
    ctx = context(ctx)
    if isinstance(source, HFCheckpoint):
        directory, fingerprint = source.directory, source.fingerprint()
    else:  # the fingerprint comes from its memo: a conversion already made needs no converter run to be found
        directory = Path(source)
        fingerprint = checkpoint_fingerprint(directory, ctx.cache_dir)
    path = ctx.cache_dir / "checkpoints" / f"{directory.name}-{fingerprint[:24]}-f16.gguf"
    if not path.exists():
        checkpoint = source if isinstance(source, HFCheckpoint) else HFCheckpoint(directory, ctx.cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        quantize(resolve(as_recipe("f16"), checkpoint.inventory()), path, ctx=ctx, source=checkpoint)
    return path
