"""The source protocol: what the planner and the streaming quantizer need from a model, whatever it is stored as.

The planner needs the inventory (names, shapes, source types) and the metadata to carry into an output; the
streamer loads one tensor (or one expert's slice of a 3-D tensor) as float32 and releases it before the next.
`spec` reopens the same source in another process (`dynq.open_source(spec)`), and `fingerprint` identifies its
content on any machine, so caches and remote workers never rely on a local path or a modification time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from gguf import GGUFValueType

from dynq.core.arrays import F32Array
from dynq.core.tensors import ModelInventory
from dynq.errors import BadInput

_FLOATS = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)


@dataclass(frozen=True)
class MetadataField:
    """One GGUF key/value to carry over, with its GGUF type (and element type for arrays)."""

    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


def check_float_metadata(fields: Iterable[MetadataField], origin: str) -> None:
    """Refuse a NaN or Inf among the float values a runtime reads (a rope frequency base, a norm epsilon, a scale):
    llama.cpp loads such a file and computes garbage. The vocabulary's arrays (token scores) are left alone."""
    for f in fields:
        if f.vtype in _FLOATS:
            bad = not math.isfinite(float(f.value))
        elif f.vtype is GGUFValueType.ARRAY and f.sub_type in _FLOATS and not f.key.startswith("tokenizer."):
            bad = not np.isfinite(np.asarray(f.value, dtype=np.float64)).all()
        else:
            continue
        if bad:
            raise BadInput(
                f"{origin}: metadata {f.key} is {f.value!r:.60}, not a finite number; a runtime would compute with "
                "it, so the source is damaged (fix the value where it comes from, e.g. config.json)"
            )


@runtime_checkable
class TensorSource(Protocol):
    @property
    def spec(self) -> str:
        """What `dynq.open_source` takes to open this source again (a path, `zoo:NAME`, `shapes:NAME`)."""
        ...

    def inventory(self) -> ModelInventory: ...

    def metadata_fields(self) -> list[MetadataField]:
        """Every key/value an output made from this source starts from (tokenizer, chat template, hyperparameters),
        in the source's order."""
        ...

    def load(self, name: str) -> F32Array:
        """One tensor as float32, numpy shape (the reversed GGUF shape: row length last)."""
        ...

    def load_expert(self, name: str, expert: int) -> F32Array:
        """One expert's matrix of a 3-D expert tensor as float32 [rows, row length]."""
        ...

    def release(self, name: str) -> None:
        """Drop what loading `name` brought into memory."""
        ...

    def fingerprint(self) -> str:
        """A hex digest of the content (not the path): equal on every machine that holds the same model."""
        ...
