"""A disk cache of encoded tensors, so that several recipes of one model encode each (tensor, type) once.

The key covers everything the bytes depend on: the source's content fingerprint (the same on every machine), the
tensor, the target type, the kernel backend and the tensor's importance data. Entries are written to a temporary
name and renamed, so a crash never leaves a torn entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dynq.core.atomic import atomic_write_bytes


class EncodeCache:
    def __init__(self, source_fingerprint: str, backend: str, cache: Path) -> None:
        self.root = cache / "encoded"
        self.identity = hashlib.sha256(f"{backend}:{source_fingerprint}".encode()).digest()
        self.hits = 0

    def _path(self, tensor: str, qtype: str, importance: npt.NDArray[np.float32] | None) -> Path:
        h = hashlib.sha256(self.identity)
        h.update(f"{tensor}:{qtype}".encode())
        if importance is not None:
            h.update(np.ascontiguousarray(importance, dtype=np.float32).tobytes())
        key = h.hexdigest()
        return self.root / key[:2] / f"{key}.bin"

    def get(self, tensor: str, qtype: str, importance: npt.NDArray[np.float32] | None, nbytes: int) -> bytes | None:
        path = self._path(tensor, qtype, importance)
        if not path.is_file() or path.stat().st_size != nbytes:
            return None
        self.hits += 1
        return path.read_bytes()

    def put(self, tensor: str, qtype: str, importance: npt.NDArray[np.float32] | None, data: bytes) -> None:
        path = self._path(tensor, qtype, importance)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
