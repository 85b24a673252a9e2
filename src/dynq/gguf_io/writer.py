"""Streaming GGUF output: all tensor infos are fixed first, then tensor data is written one tensor at a time.
`write_gguf` is the one loop every writer of dynq (quantize, split, merge) goes through, and `copy_metadata` the
one way metadata is carried from a source into an output, with the layout its `general.alignment` asks for.

The files are written into a temporary folder beside the output and renamed into place only when every byte is on
disk, so an interrupted or failed run never leaves a file that looks complete. Splitting into llama.cpp shards
(`NAME-00001-of-0000N.gguf` with the `split.*` keys) is gguf-py's.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFWriter, LazyChunkedTensor

from dynq.core.source import MetadataField
from dynq.core.tensors import TensorInfo
from dynq.errors import DynqError

log = logging.getLogger(__name__)

U8Array = npt.NDArray[np.uint8]


def copy_metadata(fields: Iterable[MetadataField], writer: GGUFWriter, drop: Callable[[str], bool]) -> None:
    """Every key/value of `fields`, in order, but the architecture (which gguf-py writes first by itself) and the
    keys `drop` names; the tensor data is then laid out with the `general.alignment` the file declares."""
    for f in fields:
        if f.key == "general.architecture" or drop(f.key):
            continue
        writer.add_key_value(f.key, f.value, f.vtype, f.sub_type)
        if f.key == "general.alignment":
            writer.data_alignment = int(f.value)


def check_output_folder(path: Path) -> None:
    """Say before any work, not after it, that the folder an output goes into is missing."""
    if not path.parent.is_dir():
        raise DynqError(f"{path}: the output directory {path.parent} does not exist; create it first")


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5GB', '123456' → bytes (powers of 1000, as llama-gguf-split --split-max-size)."""
    s = text.strip().upper().removesuffix("B")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(s[-1:], 1)
    number = s[:-1] if scale != 1 else s
    try:
        value = float(number) * scale
    except ValueError:
        raise DynqError(f"bad size '{text}'; use e.g. 500M or 2G") from None
    if value <= 0:
        raise DynqError(f"bad size '{text}'; it must be positive")
    return int(value)


class StreamingWriter:
    """Declare every tensor, then `write` them in the same order; `finish` renames the files into place."""

    def __init__(self, output: Path, arch: str, split_max_size: int = 0) -> None:
        check_output_folder(output)
        if output.suffix != ".gguf":
            raise DynqError(f"{output}: the output name must end in .gguf")
        self.output = output
        self.tmp_dir = output.parent / f".{output.name}.dynq-{os.getpid()}.tmp"
        self.tmp_dir.mkdir(exist_ok=True)
        self.writer = GGUFWriter(self.tmp_dir / output.name, arch, split_max_size=split_max_size)
        self.names: list[str] = []
        self.paths: list[Path] = []

    def declare(self, info: TensorInfo, nbytes: int, ggml_type: GGMLQuantizationType) -> None:
        # A uint8 byte shape; gguf-py converts it back to the element shape from the type.
        rows = info.n_elements // info.row_length
        byte_shape = [*reversed(info.shape[1:]), nbytes // rows] if rows else [nbytes]
        self.writer.add_tensor_info(info.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=ggml_type)
        self.names.append(info.name)

    def begin(self) -> None:
        """Write headers, metadata and tensor infos of every shard."""
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()
        assert self.writer.path is not None
        self.paths = self.writer.format_shard_names(self.writer.path)

    def write(self, data: npt.NDArray[np.uint8] | LazyChunkedTensor) -> None:
        """One tensor's bytes: an array, or gguf-py's chunked tensor, written one chunk at a time."""
        if isinstance(data, LazyChunkedTensor):
            self.writer.write_tensor_data(data)  # type: ignore[arg-type]  # duck-typed: nbytes and tofile
        else:
            self.writer.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))

    def finish(self) -> list[Path]:
        """Flush, sync and rename every shard to its final name; returns the final paths."""
        self.writer.close()
        final = []
        for path in self.paths:
            with path.open("rb+") as f:
                os.fsync(f.fileno())
            target = self.output.parent / path.name
            path.replace(target)
            final.append(target)
        self.tmp_dir.rmdir()
        return final

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


@contextmanager
def streaming_writer(output: Path, arch: str, split_max_size: int = 0) -> Iterator[StreamingWriter]:
    writer = StreamingWriter(output, arch, split_max_size)
    try:
        yield writer
    except OSError as e:
        writer.abort()
        raise DynqError(f"{output}: writing failed ({e.strerror or e}); nothing was left under that name") from e
    except BaseException:
        writer.abort()
        raise


@dataclass(frozen=True)
class OutputTensor:
    """A tensor as it will be stored: its info (name, shape), its byte count and its GGML type."""

    info: TensorInfo
    nbytes: int
    ggml_type: GGMLQuantizationType


def write_gguf(
    output: Path,
    arch: str,
    tensors: Sequence[OutputTensor],
    data: Callable[[OutputTensor], U8Array | LazyChunkedTensor],
    *,
    metadata: Callable[[GGUFWriter], None],
    split_max_size: int = 0,
    written: Callable[[int, OutputTensor], None] | None = None,
) -> list[Path]:
    """Write `output` (or its shards): `metadata` adds the key/values, every tensor is declared, then each one's
    bytes come from `data` in order and `written(index, tensor)` follows each write. Returns the final paths."""
    with streaming_writer(output, arch, split_max_size) as writer:
        metadata(writer.writer)
        for t in tensors:
            writer.declare(t.info, t.nbytes, t.ggml_type)
        writer.begin()
        for i, t in enumerate(tensors):
            chunk = data(t)
            if chunk.nbytes != t.nbytes:
                raise DynqError(f"{t.info.name}: {chunk.nbytes} bytes to write, {t.nbytes} declared")
            writer.write(chunk)
            if written is not None:
                written(i, t)
        return writer.finish()
