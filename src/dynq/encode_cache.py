"""A disk cache of encoded tensors, so that several recipes of one model encode each (tensor, type) once.

The key covers everything the bytes depend on: the source tensor's own digest (SHA-256 of every byte it is made
from, sources/content.py: a source changed anywhere in a tensor misses, however small the change), the target
type, the kernel backend and the tensor's importance data. Content-addressed, an entry serves any model holding the
same tensor. Each entry ends with the SHA-256 of its bytes, checked on every read: a damaged entry is a miss, never
served. Entries are written to a temporary name and renamed, so a crash never leaves a torn entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dynq.core.atomic import atomic_write_bytes

# Bump when an entry's key or layout changes: entries of another version are never read.
_VERSION = 2
_CHECK = hashlib.sha256().digest_size


class EncodeCache:
    def __init__(self, backend: str, cache: Path) -> None:
        self.root = cache / "encoded"
        self.identity = hashlib.sha256(f"dynq encoded {_VERSION}:{backend}".encode()).digest()
        self.hits = 0

    def _path(self, source_digest: str, qtype: str, importance: npt.NDArray[np.float32] | None) -> Path:
        h = hashlib.sha256(self.identity)
        h.update(f"{source_digest}:{qtype}".encode())
        if importance is not None:
            h.update(np.ascontiguousarray(importance, dtype=np.float32).tobytes())
        key = h.hexdigest()
        return self.root / key[:2] / f"{key}.bin"

    def get(self, source_digest: str, qtype: str, importance: npt.NDArray[np.float32] | None,
            nbytes: int) -> bytes | None:  # fmt: skip
        """The bytes encoded from a source tensor of this digest at this type with this importance, or None."""
        path = self._path(source_digest, qtype, importance)
        try:
            if path.stat().st_size != nbytes + _CHECK:
                return None
            entry = path.read_bytes()
        except OSError:
            return None
        data, check = entry[:nbytes], entry[nbytes:]
        if hashlib.sha256(data).digest() != check:
            path.unlink(missing_ok=True)  # damaged: encoded again, and put back whole
            return None
        self.hits += 1
        return data

    def put(self, source_digest: str, qtype: str, importance: npt.NDArray[np.float32] | None, data: bytes) -> None:
        path = self._path(source_digest, qtype, importance)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data + hashlib.sha256(data).digest())
