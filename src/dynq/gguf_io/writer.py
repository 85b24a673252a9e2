"""Streaming GGUF output: all tensor infos are fixed first, then tensor data is written one tensor at a time.

The files are written into a temporary folder beside the output and renamed into place only when every byte is on
disk, so an interrupted or failed run never leaves a file that looks complete. Splitting into llama.cpp shards
(`NAME-00001-of-0000N.gguf` with the `split.*` keys) is gguf-py's.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGUFValueType, GGUFWriter

from dynq.errors import DynqError
from dynq.gguf_io.reader import SPLIT_KEYS, GGUFModel
from dynq.sources.tensor_info import TensorInfo

log = logging.getLogger(__name__)

# Keys a quantizer rewrites rather than copies.
_REWRITTEN = (*SPLIT_KEYS, "general.architecture", "general.file_type", "general.quantization_version")
_REWRITTEN_PREFIXES = ("GGUF.", "quantize.imatrix.", "dynq.")


def copy_metadata(model: GGUFModel, writer: GGUFWriter) -> None:
    """Every key/value of `model` (tokenizer and chat template included) except those a quantizer rewrites."""
    for key, field in model.readers[0].fields.items():
        if key in _REWRITTEN or key.startswith(_REWRITTEN_PREFIXES):
            continue
        vtype = GGUFValueType(field.types[0])
        sub_type = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        value: Any = field.contents()
        writer.add_key_value(key, value, vtype, sub_type)


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
        if not output.parent.is_dir():
            raise DynqError(f"{output}: the output directory {output.parent} does not exist; create it first")
        if output.suffix != ".gguf":
            raise DynqError(f"{output}: the output name must end in .gguf")
        self.output = output
        self.tmp_dir = output.parent / f".{output.name}.dynq-{os.getpid()}.tmp"
        self.tmp_dir.mkdir(exist_ok=True)
        self.writer = GGUFWriter(self.tmp_dir / output.name, arch, split_max_size=split_max_size)
        self.names: list[str] = []
        self.paths: list[Path] = []

    def declare(self, info: TensorInfo, nbytes: int, ggml_type: Any) -> None:
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

    def write(self, data: npt.NDArray[np.uint8]) -> None:
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
