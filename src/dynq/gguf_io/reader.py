"""Reading GGUF models, single files and llama.cpp split shards, with tensor data memory-mapped: the GGUF
implementation of the source protocol (core/source.py).

Parsing and decoding are the `gguf` package's; this module adds split sets (shard_set.py), checks that turn a damaged
file into one clear error (a tensor whose bytes lie past the end, overlap another's or have an empty shape),
dequantization of one tensor (or one expert) at a time, each tensor's stored bytes for a digest of its own
(sources/content.py), and a sampled content fingerprint.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import mmap
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField, ReaderTensor, dequantize

from dynq.core.qtypes import qtype
from dynq.core.source import MetadataField
from dynq.core.tensors import ModelInventory, TensorInfo
from dynq.errors import DynqError
from dynq.gguf_io.shard_set import SPLIT_KEYS, SplitKeys, check_numbering, check_tensor_count, shard_paths

log = logging.getLogger(__name__)
# Metadata that is bulky and says nothing about sizes; kept out of `metadata`, still readable via `field()`.
_BULKY_PREFIXES = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                   "tokenizer.ggml.scores")  # fmt: skip
# The fingerprint reads at most this many windows of this size from each tensor: a few MiB per tensor whatever the
# model's size, enough to tell apart two files that differ in any tensor's weights.
_WINDOWS, _WINDOW = 16, 1 << 16


def _open_reader(path: Path) -> GGUFReader:
    if not path.exists():
        raise DynqError(f"{path}: no such file")
    if path.is_dir():
        raise DynqError(f"{path}: is a directory, expected a .gguf file")
    if not path.is_file():
        raise DynqError(f"{path}: not a regular file (a pipe or a device?); pass a .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise DynqError(f"{path}: not a GGUF file (it does not start with 'GGUF'); pass a .gguf model")
    try:
        with np.errstate(all="ignore"):  # a crafted offset wraps in gguf-py's uint64 sum: checked below, unwarned
            reader = GGUFReader(path)
    except (ValueError, IndexError, OverflowError, MemoryError) as e:
        raise DynqError(f"{path}: truncated or corrupt GGUF ({e}); download or convert it again") from e
    _check_extents(path, reader)
    return reader


def _check_extents(path: Path, reader: GGUFReader) -> None:
    """Every tensor's bytes lie inside the file (counted in Python's integers, where gguf-py's uint64 sum wraps) and
    no two tensors share a byte."""
    size = path.stat().st_size
    extents = []
    for t in reader.tensors:
        start = int(t.field.parts[-1][0]) + int(reader.data_offset)  # the offset as declared
        end = start + int(t.n_bytes)
        if start > size:
            raise DynqError(f"{path}: tensor {t.name} starts at byte {start}, past the end of the file ({size} "
                            "bytes); the file is corrupt")  # fmt: skip
        if end > size:
            raise DynqError(f"{path}: truncated GGUF: tensor {t.name} ends at byte {end} but the file has {size}; "
                            "download or convert it again")  # fmt: skip
        extents.append((start, end, t.name))
    extents.sort()
    for (start, end, name), (other_start, other_end, other) in itertools.pairwise(extents):
        if other_start < end:  # sorted by start: any overlap shows between neighbours
            raise DynqError(f"{path}: tensors {name} (bytes {start}-{end}) and {other} (bytes {other_start}-"
                            f"{other_end}) overlap; the file is corrupt")  # fmt: skip


def _contents(reader: GGUFReader, key: str, f: ReaderField) -> Any:
    try:
        return f.contents()
    except UnicodeDecodeError:
        raise DynqError(f"{reader.data.filename}: metadata {key} is not UTF-8 text; the file is damaged") from None


def field_value(reader: GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    value = _contents(reader, key, f)
    if f.types and f.types[0] == GGUFValueType.BOOL and not isinstance(value, list):
        return bool(value)
    return value


def release_pages(reader: GGUFReader, tensor: ReaderTensor) -> None:
    """Drop a tensor's pages from the reader's memory map: they are re-read from disk if touched again, and the
    process's resident memory stays at what it is working on."""
    mapped = getattr(reader.data, "_mmap", None)
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)


@dataclass(frozen=True)
class GGUFTensor:
    info: TensorInfo
    shard: int
    raw: ReaderTensor


class GGUFModel:
    """A GGUF model on disk (one file or all shards of a split), read lazily."""

    def __init__(self, path: str | Path, spec: str | None = None, fingerprint: str | None = None) -> None:
        """`fingerprint`, when the caller already knows this file's (a description of it), is not computed again."""
        self.path = Path(path)
        self._spec = spec or str(self.path)
        self._known_fingerprint = fingerprint
        self.shards = shard_paths(self.path)
        self.readers = [_open_reader(p) for p in self.shards]
        split_keys = [SplitKeys(*(field_value(r, k) for k in SPLIT_KEYS)) for r in self.readers]
        check_numbering(self.shards, split_keys)
        self._tensors: dict[str, GGUFTensor] = {}
        for i, reader in enumerate(self.readers):
            for t in reader.tensors:
                if t.name in self._tensors:
                    raise DynqError(f"{self.shards[i]}: tensor {t.name} appears twice; the model is corrupt")
                shape = tuple(int(d) for d in t.shape)
                if not shape or 0 in shape:
                    raise DynqError(f"{self.shards[i]}: tensor {t.name} has the empty shape {shape}; the model is "
                                    "corrupt")  # fmt: skip
                self._tensors[t.name] = GGUFTensor(TensorInfo(t.name, shape, qtype(int(t.tensor_type))), i, t)
        check_tensor_count(self.shards, split_keys, len(self._tensors))

    @property
    def spec(self) -> str:
        return self._spec

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """All key/value metadata of the model (from the first shard), without the split bookkeeping keys."""
        reader = self.readers[0]
        return {
            k: field_value(reader, k)
            for k in reader.fields
            if not k.startswith("GGUF.") and k not in SPLIT_KEYS and not k.startswith(_BULKY_PREFIXES)
        }

    def field(self, key: str) -> Any:
        return field_value(self.readers[0], key)

    @property
    def arch(self) -> str:
        arch = self.field("general.architecture")
        return str(arch) if arch is not None else "unknown"

    @property
    def tensors(self) -> list[TensorInfo]:
        return [t.info for t in self._tensors.values()]

    def inventory(self) -> ModelInventory:
        return ModelInventory(self.spec, self.arch, tuple(self.tensors), self.metadata)

    def metadata_fields(self) -> list[MetadataField]:
        """Every key/value of the first shard in order, less the split bookkeeping (a writer sets it per shard)."""
        fields = []
        for key, f in self.readers[0].fields.items():
            if key.startswith("GGUF.") or key in SPLIT_KEYS:
                continue
            vtype = GGUFValueType(f.types[0])
            sub_type = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
            fields.append(MetadataField(key, _contents(self.readers[0], key, f), vtype, sub_type))
        return fields

    def ggml_type(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(int(self._get(name).raw.tensor_type))

    def raw(self, name: str) -> npt.NDArray[Any]:
        """The tensor's bytes (or elements, for float types) as stored, memory-mapped."""
        return self._get(name).raw.data

    def stored(self, name: str, expert: int | None = None) -> npt.NDArray[Any]:
        """The tensor's stored bytes (or expert `expert`'s of a 3-D tensor), memory-mapped."""
        t = self._get(name)
        data: npt.NDArray[Any] = t.raw.data
        if expert is None:
            return data
        self._check_expert(t, expert)
        return np.asarray(data[expert])

    def decode(self, name: str, stored: npt.NDArray[Any], expert: int | None = None) -> npt.NDArray[np.float32]:
        """Bytes as `stored` gives them (or a copy of them) as float32, shaped as `load` or `load_expert` does."""
        t = self._get(name)
        values = np.asarray(self._dequantize(t, stored), dtype=np.float32)
        if expert is None:
            return values.reshape(tuple(reversed(t.info.shape)))
        return values.reshape(t.info.shape[1], t.info.shape[0])

    def load(self, name: str) -> npt.NDArray[np.float32]:
        """One tensor as float32, numpy shape (reversed GGUF shape: rows last-to-first, row length last)."""
        t = self._get(name)
        values = self._dequantize(t, t.raw.data)
        return np.asarray(values, dtype=np.float32).reshape(tuple(reversed(t.info.shape)))

    def load_expert(self, name: str, expert: int) -> npt.NDArray[np.float32]:
        """Expert `expert`'s matrix of a 3-D tensor as float32 [rows, row length]; only its bytes are read."""
        t = self._get(name)
        self._check_expert(t, expert)
        values = self._dequantize(t, t.raw.data[expert])
        return np.asarray(values, dtype=np.float32).reshape(t.info.shape[1], t.info.shape[0])

    def _check_expert(self, t: GGUFTensor, expert: int) -> None:
        if len(t.info.shape) != 3 or not 0 <= expert < t.info.shape[2]:
            raise DynqError(f"{self.path}: tensor {t.info.name} {t.info.shape} has no expert {expert}")

    def _dequantize(self, t: GGUFTensor, data: npt.NDArray[Any]) -> npt.NDArray[Any]:
        try:
            return dequantize(data, t.raw.tensor_type)
        except NotImplementedError:
            raise DynqError(f"{self.shards[t.shard]}: tensor {t.info.name} is stored as {t.info.dtype.name}, which "
                            "dynq cannot decode; convert the model from its original weights") from None  # fmt: skip

    @cached_property
    def _fingerprint(self) -> str:
        if self._known_fingerprint is not None:
            return self._known_fingerprint
        digest = hashlib.sha256()
        for reader in self.readers:
            digest.update(np.asarray(reader.data[: reader.data_offset]).tobytes())  # header, metadata, tensor infos
        for name, t in self._tensors.items():
            data = np.asarray(t.raw.data).view(np.uint8).reshape(-1)
            step = max(_WINDOW, len(data) // _WINDOWS)
            for start in range(0, len(data), step):
                digest.update(data[start : start + _WINDOW].tobytes())
            self.release(name)
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """sha256 of every shard's header (metadata and tensor infos) and of evenly spaced windows of every
        tensor's bytes: the same on any machine holding the same file, at a few MiB of reading per tensor."""
        return self._fingerprint

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's memory map (they are re-read from disk if touched again),
        so that streaming through a model keeps resident memory at one tensor, not the whole file."""
        t = self._get(name)
        release_pages(self.readers[t.shard], t.raw)

    def _get(self, name: str) -> GGUFTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise DynqError(f"{self.path}: no tensor named {name}") from None
