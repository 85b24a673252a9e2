"""Merging llama.cpp split shards into one GGUF and splitting one GGUF into shards, tensor bytes untouched.

Shards follow llama-gguf-split's format (`NAME-00001-of-0000N.gguf`; all metadata in the first shard; `split.no`,
`split.count` and `split.tensors.count` in every shard), which is also gguf-py's, so the streaming writer does the
writing: tensor infos first, then each tensor's stored bytes copied from the memory map one tensor at a time, into a
temporary folder renamed into place at the end. Metadata keys keep their order and values, so splitting a file that
gguf-py wrote and merging it back gives the same file, byte for byte.

A copy does not resume: an interrupted one removes its partial folder, and one a SIGKILL left is cleared by the next
run that may overwrite (`--force`); without it the run stops naming the folder (errors.LeftoverRun).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynq.core.context import RunContext, context
from dynq.errors import DynqError, OutputExists
from dynq.gguf_io.reader import GGUFModel
from dynq.gguf_io.shard_set import SPLIT_NAME, shard_names
from dynq.gguf_io.writer import OutputTensor, copy_metadata, write_gguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardsWritten:
    files: list[Path]
    n_tensors: int
    tensor_bytes: int


def model_stem(path: Path) -> str:
    """`x-00001-of-00003.gguf` and `x.gguf` are both the model `x`."""
    m = SPLIT_NAME.match(path.name)
    return m.group("stem") if m else path.stem


def count_shards(sizes: Sequence[int], max_size: int) -> int:
    """How many shards gguf-py's writer makes from tensors of these sizes at this limit: a new shard starts when the
    next tensor would take a non-empty one past the limit (so a tensor larger than the limit gets a shard alone)."""
    count, current = 1, 0
    for size in sizes:
        if current > 0 and current + size > max_size:
            count, current = count + 1, 0
        current += size
    return count


def max_size_for(sizes: Sequence[int], n_shards: int) -> int:
    """The smallest size limit that cuts the tensors into at most `n_shards` shards (they stay in order, so the
    shards are as even as the tensor boundaries allow)."""
    low, high = max(sizes), sum(sizes)
    while low < high:
        mid = (low + high) // 2
        if count_shards(sizes, mid) <= n_shards:
            high = mid
        else:
            low = mid + 1
    return low


def _check_targets(targets: list[Path], inputs: list[Path], overwrite: bool) -> None:
    resolved = {p.resolve() for p in inputs}
    for target in targets:
        if target.resolve() in resolved:
            raise DynqError(f"{target}: this is one of the input files; choose another output name")
        if target.exists() and not overwrite:
            raise OutputExists(target)


def _rewrite(model: GGUFModel, output: Path, split_max_size: int, overwrite: bool, ctx: RunContext) -> ShardsWritten:
    tensors = [OutputTensor(t, int(model.raw(t.name).nbytes), model.ggml_type(t.name)) for t in model.tensors]
    total = sum(t.nbytes for t in tensors)
    done = 0

    def written(index: int, t: OutputTensor) -> None:
        nonlocal done
        model.release(t.info.name)
        done += t.nbytes
        ctx.report("copy", done, total, "bytes", t.info.name)

    files = write_gguf(
        output,
        model.arch,
        tensors,
        lambda t: np.asarray(model.raw(t.info.name)).view(np.uint8),
        metadata=lambda w: copy_metadata(model.metadata_fields(), w, drop=lambda key: False),
        split_max_size=split_max_size,
        written=written,
        overwrite=overwrite,
    )
    return ShardsWritten(files, len(tensors), total)


def merge(source: str | Path, output: str | Path | None = None, *, overwrite: bool = False,
          ctx: RunContext | None = None) -> ShardsWritten:  # fmt: skip
    """Join all shards of a split model (given any one of them) into one GGUF file; `output` defaults to the
    model's name beside the shards."""
    model = GGUFModel(source)
    if len(model.shards) == 1:
        raise DynqError(f"{model.path}: already a single file; nothing to merge")
    out = Path(output) if output is not None else model.path.with_name(model_stem(model.path) + ".gguf")
    _check_targets([out], model.shards, overwrite)
    result = _rewrite(model, out, 0, overwrite, context(ctx))
    log.info("merged %d shards into %s (%d tensors)", len(model.shards), out, result.n_tensors)
    return result


def split(source: str | Path, output: str | Path | None = None, *, max_size: int | None = None,
          n_shards: int | None = None, overwrite: bool = False,
          ctx: RunContext | None = None) -> ShardsWritten:  # fmt: skip
    """Split a model into llama.cpp shards of at most `max_size` tensor bytes each, or into `n_shards` shards as
    even as the tensor boundaries allow. Shards are named after `output` (default: the model's name beside it)."""
    if (max_size is None) == (n_shards is None):
        raise DynqError("give either a maximum shard size or a number of shards")
    model = GGUFModel(source)
    sizes = [int(model.raw(t.name).nbytes) for t in model.tensors]
    if n_shards is not None:
        if not 2 <= n_shards <= len(sizes):
            raise DynqError(f"{model.path}: cannot split {len(sizes)} tensors into {n_shards} shards; "
                            f"choose between 2 and {len(sizes)}")  # fmt: skip
        max_size = max_size_for(sizes, n_shards)
    assert max_size is not None
    count = count_shards(sizes, max_size)
    if count == 1:
        raise DynqError(f"{model.path}: its {sum(sizes):,} tensor bytes fit in one shard of {max_size:,}; "
                        "choose a smaller size")  # fmt: skip
    out = Path(output) if output is not None else model.path.with_name(model_stem(model.path) + ".gguf")
    _check_targets(shard_names(out, count), model.shards, overwrite)
    result = _rewrite(model, out, max_size, overwrite, context(ctx))
    if len(result.files) != count:  # the writer's own cut must be the one the names were checked for
        raise DynqError(f"internal: expected {count} shards, the writer made {len(result.files)}")
    log.info("split %s into %d shards", model.path, count)
    return result
