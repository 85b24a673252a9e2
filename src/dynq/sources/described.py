"""A GGUF file's description (inventory, metadata, content fingerprint) remembered per file in the cache.

gguf-py builds its field objects one string at a time, so opening a model with a 150k-token vocabulary takes
seconds before any tensor is touched. Planning and solving for a size need only the description; it is kept under
cache/described, keyed by the file's path, size, modification time and inode (the way build tools decide a file
is unchanged), and the weights are opened only if something loads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy.typing as npt

from dynq.core.arrays import F32Array
from dynq.core.atomic import atomic_write_text
from dynq.core.qtypes import qtype
from dynq.core.records import RecordFormat
from dynq.core.source import MetadataField
from dynq.core.tensors import ModelInventory, TensorInfo
from dynq.errors import DynqError
from dynq.gguf_io.reader import GGUFModel
from dynq.gguf_io.shard_set import shard_paths

_VERSION = 1


def _key(path: Path) -> str:
    h = hashlib.sha256(str(_VERSION).encode())
    for shard in shard_paths(path):
        st = shard.stat()
        h.update(f"{shard.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_dev}".encode())
    return h.hexdigest()


@dataclass
class DescribedGGUF:
    """A GGUF model whose description comes from the cache; its weights (and full metadata) are read on demand."""

    path: Path
    spec_: str
    inventory_: ModelInventory
    fingerprint_: str

    @property
    def spec(self) -> str:
        return self.spec_

    def inventory(self) -> ModelInventory:
        return self.inventory_

    def fingerprint(self) -> str:
        return self.fingerprint_

    @cached_property
    def shards(self) -> list[Path]:
        """Every file of the model (the shards of a split, or the one file), as `GGUFModel.shards`."""
        return shard_paths(self.path)

    @cached_property
    def model(self) -> GGUFModel:
        """The file opened by gguf-py (parsed now, once), knowing its fingerprint from the description."""
        return GGUFModel(self.path, spec=self.spec_, fingerprint=self.fingerprint_)

    def metadata_fields(self) -> list[MetadataField]:
        return self.model.metadata_fields()

    def load(self, name: str) -> F32Array:
        return self.model.load(name)

    def load_expert(self, name: str, expert: int) -> F32Array:
        return self.model.load_expert(name, expert)

    def stored(self, name: str, expert: int | None = None) -> npt.NDArray[Any]:
        return self.model.stored(name, expert)

    def decode(self, name: str, stored: npt.NDArray[Any], expert: int | None = None) -> F32Array:
        return self.model.decode(name, stored, expert)

    def release(self, name: str) -> None:
        if "model" in self.__dict__:
            self.model.release(name)


@dataclass(frozen=True)
class _Memo:
    """What is remembered of a file; a tensor is [name, shape, stored type]."""

    arch: str
    fingerprint: str
    metadata: dict[str, Any]
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]


# A memo of another version or a damaged one is never an error: the file is described again.
_FORMAT = RecordFormat(_Memo, "description memo", _VERSION, "it is rebuilt")


def _to_json(inventory: ModelInventory, fingerprint: str) -> str:
    tensors = tuple((t.name, t.shape, t.dtype.name) for t in inventory.tensors)
    return json.dumps(_FORMAT.to_record(_Memo(inventory.arch, fingerprint, dict(inventory.metadata), tensors)))


def _from_json(text: str, spec: str) -> tuple[ModelInventory, str] | None:
    try:
        memo = _FORMAT.from_record(json.loads(text), spec)
        tensors = tuple(TensorInfo(n, s, qtype(d)) for n, s, d in memo.tensors)
    except DynqError:  # another version, damaged, or a type this dynq does not know
        return None
    return ModelInventory(spec, memo.arch, tensors, memo.metadata), memo.fingerprint


def _opened(model: GGUFModel) -> DescribedGGUF:
    described = DescribedGGUF(model.path, model.spec, model.inventory(), model.fingerprint())
    described.__dict__["model"] = model  # already open: loading from it needs no second parse
    return described


# A GGUF file on disk, parsed by gguf-py or described from the cache: both have `path`, `shards` and the source calls.
GGUFFile = GGUFModel | DescribedGGUF


def describe(path: Path, spec: str, cache: Path) -> DescribedGGUF:
    """The model at `path` described from the cache, or opened once and remembered. A memo that cannot be read
    (torn, from another version) is rebuilt, never trusted."""
    try:
        memo = cache / "described" / f"{_key(path)}.json"
    except OSError:  # missing or unreadable: the reader names the problem in one line
        return _opened(GGUFModel(path, spec=spec))
    try:
        found = _from_json(memo.read_text(), spec)
    except (OSError, ValueError, KeyError, TypeError):
        found = None
    if found is not None:
        return DescribedGGUF(path, spec, *found)
    described = _opened(GGUFModel(path, spec=spec))
    try:
        text = _to_json(described.inventory_, described.fingerprint_)
    except TypeError:  # metadata JSON cannot hold: describe again next time
        return described
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo, text)
    return described
