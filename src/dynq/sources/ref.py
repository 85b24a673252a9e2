"""A source as a worker task names it: what reopens it (spec and cache folder) and the content it must have.

Tasks run in other processes or on other machines (executors.py), so they carry this small picklable reference
rather than an open source; the worker reopens the source once and refuses a copy whose content differs from the
driver's, so a worker never mixes another file's weights into an output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from dynq.core.source import TensorSource
from dynq.errors import DynqError
from dynq.gguf_io.reader import GGUFModel
from dynq.sources.described import DescribedGGUF
from dynq.sources.open import open_source


@dataclass(frozen=True)
class SourceRef:
    spec: str  # what open_source takes: an absolute path, or zoo:NAME
    fingerprint: str  # the driver's content fingerprint
    cache_dir: str

    @staticmethod
    def of(source: TensorSource, cache_dir: Path, fingerprint: str | None = None) -> SourceRef:
        """The reference to an opened source (whose `fingerprint` the caller may know already); a path is made
        absolute, since a worker's folder is not the driver's."""
        spec = str(Path(source.spec).resolve()) if Path(source.spec).exists() else source.spec
        return SourceRef(spec, fingerprint or source.fingerprint(), str(cache_dir))

    def reopen(self) -> TensorSource:
        """The source, opened once per worker process (later calls return the same one)."""
        return _reopened(self)

    def reopen_gguf(self) -> GGUFModel:
        """The source as a GGUF file read by gguf-py, for work on its stored bytes (errors, probes)."""
        source = self.reopen()
        if isinstance(source, DescribedGGUF):
            return source.model
        if isinstance(source, GGUFModel):
            return source
        raise DynqError(f"{self.spec}: not a GGUF file; this work needs one")


@functools.lru_cache(maxsize=2)
def _reopened(ref: SourceRef) -> TensorSource:
    source = open_source(ref.spec, Path(ref.cache_dir))
    if source.fingerprint() != ref.fingerprint:
        raise DynqError(
            f"{ref.spec}: this worker's copy differs from the driver's (another fingerprint); give every node the "
            "same files"
        )
    return source
