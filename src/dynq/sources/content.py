"""Each tensor's own content digest: SHA-256 of every byte the tensor is made from, taken from the very bytes loaded
for encoding, so that what an output was made from can be checked later in full.

A source's `fingerprint` samples each tensor (a few windows): cheap enough to name cached descriptions, profiles and
references, but blind to a change between its windows. What must see every byte (a resume keeping tensors encoded
earlier, the cache of encoded tensors) keys on these digests instead. A GGUF source digests its stored bytes (a
private copy is hashed, then decoded, so the digest is of what was encoded): checking one again reads the file but
decodes nothing. Any other source digests the float32 values it loads. A 3-D expert tensor is loaded one expert at
a time, so its digest combines one digest per expert, in order; a worker process digests the part it encodes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from dynq.core.arrays import F32Array
from dynq.core.importance import n_matrices
from dynq.core.source import TensorSource
from dynq.core.tensors import TensorInfo

# Bump when what a digest covers changes: journals and cache entries of another scheme are then never matched.
_SCHEME = "dynq tensor digest 1"


@runtime_checkable
class StoredTensors(Protocol):
    """A source whose tensors are bytes on disk in a format it decodes (a GGUF file)."""

    def stored(self, name: str, expert: int | None = None) -> npt.NDArray[Any]:
        """The tensor's stored bytes (or one expert's), memory-mapped: read, not copied."""
        ...

    def decode(self, name: str, stored: npt.NDArray[Any], expert: int | None = None) -> F32Array:
        """`stored` (as `stored(name, expert)` gives it, or a copy) as float32, shaped as `load` or `load_expert`."""
        ...


@dataclass(frozen=True)
class LoadedPart:
    """One part (the whole tensor, or one expert) as float32, with the digest of the bytes it was decoded from."""

    values: F32Array
    digest: bytes


def _bytes_of(array: npt.NDArray[Any]) -> memoryview:
    return np.ascontiguousarray(array).view(np.uint8).reshape(-1).data


def load_part(source: TensorSource, name: str, expert: int | None = None) -> LoadedPart:
    """Load one part of a tensor for encoding, digesting the bytes it is made from as they are read."""
    if isinstance(source, StoredTensors):
        stored = np.array(source.stored(name, expert))  # a private copy: the digest is of the bytes decoded
        return LoadedPart(source.decode(name, stored, expert), hashlib.sha256(_bytes_of(stored)).digest())
    values = source.load(name) if expert is None else source.load_expert(name, expert)
    values = np.ascontiguousarray(values, dtype=np.float32)
    return LoadedPart(values, hashlib.sha256(_bytes_of(values)).digest())


def _parts(info: TensorInfo) -> list[int | None]:
    """How quantize loads the tensor: whole, or one expert at a time."""
    n = n_matrices(info)
    return [None] if n == 1 else list(range(n))


def combine(source: TensorSource, info: TensorInfo, parts: list[bytes]) -> str:
    """The tensor's digest from its parts' digests, in order; what it covers (stored bytes or float32 values, the
    shape and stored type) is part of it."""
    kind = "stored" if isinstance(source, StoredTensors) else "f32"
    h = hashlib.sha256(f"{_SCHEME}\0{kind}\0{info.shape}\0{info.dtype.name}\0{len(parts)}\0".encode())
    for part in parts:
        h.update(part)
    return h.hexdigest()


def current_digest(source: TensorSource, info: TensorInfo) -> str:
    """The tensor's digest as it is now, every byte read: the stored bytes hashed where they are (nothing decoded),
    or the values loaded again."""
    parts = []
    for expert in _parts(info):
        if isinstance(source, StoredTensors):
            parts.append(hashlib.sha256(_bytes_of(source.stored(info.name, expert))).digest())
        else:
            parts.append(load_part(source, info.name, expert).digest)
    source.release(info.name)
    return combine(source, info, parts)


@dataclass
class TensorDigests:
    """The digests of the tensors a run encodes, gathered part by part as the parts are loaded (here, or by a worker
    that sends its part's digest back), and asked for once the tensor is written."""

    source: TensorSource
    _parts: dict[str, list[bytes]] = field(default_factory=dict)
    _known: dict[str, str] = field(default_factory=dict)

    def load(self, info: TensorInfo, expert: int | None = None) -> F32Array:
        part = load_part(self.source, info.name, expert)
        self.add(info.name, part.digest)
        return part.values

    def add(self, name: str, digest: bytes) -> None:
        self._parts.setdefault(name, []).append(digest)

    def known(self, name: str, digest: str) -> None:
        """The tensor's bytes come from elsewhere (the cache of encoded tensors) for a source of this digest."""
        self._known[name] = digest

    def made_from(self, info: TensorInfo) -> str:
        """The digest of what the tensor was made from; its parts are forgotten."""
        if info.name in self._known:
            return self._known.pop(info.name)
        return combine(self.source, info, self._parts.pop(info.name, []))

    def current(self, info: TensorInfo) -> str:
        return current_digest(self.source, info)
