"""The Gram file: per weight matrix, H = Σ x xᵀ over the calibration tokens of its input, for error-feedback
encoding (kernels/feedback.py).

Format (GGUF, `general.type = "gram"`, `dynq.gram.version = 1`): one float32 tensor `gram.N` [d, d] per distinct
input (q/k/v read one input, gate/up another, so they share one matrix) and its diagonal `gram.N.diag` [d], kept
apart so that checks never page the matrices in; `dynq.gram.weights` names every weight matrix and
`dynq.gram.inputs` its matrix N; `dynq.gram.tokens` the tokens each matrix summed; `dynq.gram.chunk_count`,
`dynq.gram.chunk_size`, `dynq.gram.datasets` the calibration run; `dynq.gram.digest` the SHA-256 of the matrices.
The diagonal of each matrix is the importance matrix's Σx² of its weights, from the same pass. Reading memory-maps
the file: one matrix is resident at a time.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGUFReader, GGUFWriter

from dynq.core.arrays import F32Array
from dynq.core.atomic import atomic_path, check_output_folder
from dynq.core.importance import Imatrix
from dynq.errors import DynqError
from dynq.gguf_io.reader import field_value, release_pages

VERSION = 1
_TYPE = "gram"


@dataclass
class GramSet:
    """Gram matrices in memory, as a collection makes them: `inputs[weight]` is the key of its matrix."""

    matrices: dict[str, F32Array]  # key -> [d, d] float32 sums of x xᵀ
    tokens: dict[str, int]  # key -> tokens summed
    inputs: dict[str, str]  # weight name -> key
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)


def write_gram(grams: GramSet, path: str | os.PathLike[str]) -> Path:
    """Write `grams` to `path` (a temporary name, then renamed into place)."""
    out = Path(path)
    check_output_folder(out)
    keys = sorted(grams.matrices)
    index = {k: i for i, k in enumerate(keys)}
    weights = sorted(grams.inputs)
    digest = hashlib.sha256()
    for k in keys:
        digest.update(np.ascontiguousarray(grams.matrices[k], dtype=np.float32).tobytes())
    with atomic_path(out) as tmp:
        writer = GGUFWriter(tmp, arch=_TYPE)
        writer.kv_data[0].pop("general.architecture", None)
        writer.add_string("general.type", _TYPE)
        writer.add_uint32("dynq.gram.version", VERSION)
        writer.add_array("dynq.gram.weights", weights)
        writer.add_array("dynq.gram.inputs", [index[grams.inputs[w]] for w in weights])
        writer.add_array("dynq.gram.tokens", [int(grams.tokens[k]) for k in keys])
        writer.add_uint32("dynq.gram.chunk_count", grams.chunk_count)
        writer.add_uint32("dynq.gram.chunk_size", grams.chunk_size)
        writer.add_array("dynq.gram.datasets", grams.datasets or ["unknown"])
        writer.add_string("dynq.gram.digest", digest.hexdigest())
        for k in keys:
            m = np.ascontiguousarray(grams.matrices[k], dtype=np.float32)
            writer.add_tensor(f"gram.{index[k]}", m)
            writer.add_tensor(f"gram.{index[k]}.diag", np.ascontiguousarray(np.diagonal(m)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


class GramFile:
    """A Gram file, memory-mapped: `matrix(weight)` is a view of the file, read as it is used."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            reader = GGUFReader(self.path)
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise DynqError(f"{self.path}: not a readable Gram file ({e}); make one with `imatrix --gram`") from None
        if field_value(reader, "general.type") != _TYPE:
            raise DynqError(f"{self.path}: a GGUF file but not a Gram file (general.type is not 'gram')")
        version = field_value(reader, "dynq.gram.version")
        if version != VERSION:
            raise DynqError(f"{self.path}: Gram file version {version}, this dynq reads {VERSION}; collect it again")
        weights, inputs, tokens = (_list(self.path, reader, f"dynq.gram.{k}") for k in ("weights", "inputs", "tokens"))
        tensors = {t.name: t for t in reader.tensors}
        if len(weights) != len(inputs) or any(f"gram.{i}" not in tensors for i in inputs):
            raise DynqError(f"{self.path}: its weight list and its matrices disagree; the file is damaged")
        self.inputs = {str(w): int(i) for w, i in zip(weights, inputs, strict=True)}
        self.tokens = [int(t) for t in tokens]
        self.digest = str(field_value(reader, "dynq.gram.digest"))
        self.chunk_count = int(field_value(reader, "dynq.gram.chunk_count") or 0)
        self._reader, self._tensors = reader, tensors

    def _array(self, name: str) -> npt.NDArray[Any]:
        t = self._tensors[name]
        return np.asarray(t.data).reshape([int(n) for n in reversed(t.shape)])

    def matrix(self, weight: str) -> npt.NDArray[np.float32] | None:
        """H of `weight`'s input [d, d] (memory-mapped), or None when the file has none for it."""
        i = self.inputs.get(weight)
        return None if i is None else self._array(f"gram.{i}")

    def release(self, weight: str) -> None:
        """Drop `weight`'s matrix from memory (pages of a memory map count as this process's while they stay)."""
        i = self.inputs.get(weight)
        if i is not None:
            release_pages(self._reader, self._tensors[f"gram.{i}"])

    def diagonal(self, weight: str) -> F32Array | None:
        i = self.inputs.get(weight)
        return None if i is None else np.asarray(self._array(f"gram.{i}.diag"), dtype=np.float32)

    def tokens_of(self, weight: str) -> int:
        return self.tokens[self.inputs[weight]]

    def check_against(self, imatrix: Imatrix, weights: Iterable[str], origin: str) -> None:
        """Every one of `weights` has a matrix whose diagonal is the imatrix's Σx² (the same pass made both) and
        whose entries are finite (each matrix read once): one line otherwise, before any work."""
        checked: set[int] = set()
        for w in weights:
            diag, entry = self.diagonal(w), imatrix.entries.get(w)
            if diag is None:
                raise DynqError(f"{self.path}: no Gram matrix for {w}; collect it from this model (`imatrix --gram`)")
            if entry is None or entry.sums.shape != (1, diag.size):
                raise DynqError(f"{self.path}: {w} has a Gram matrix of {diag.size} columns that {origin} does not "
                                "match; give the imatrix collected with it")  # fmt: skip
            scale = float(np.abs(entry.sums).max(initial=0.0)) or 1.0
            if not np.allclose(diag, entry.sums[0], rtol=1e-3, atol=1e-4 * scale):
                raise DynqError(f"{self.path}: the Gram matrix of {w} is not from the pass that made {origin} (its "
                                "diagonal is not the imatrix's sums); give the imatrix made with it")  # fmt: skip
            if self.inputs[w] in checked:
                continue
            checked.add(self.inputs[w])
            m = self.matrix(w)
            finite = m is not None and bool(np.isfinite(m).all())
            self.release(w)
            if not finite:
                raise DynqError(f"{self.path}: the Gram matrix of {w} holds NaN or Inf; collect the Gram file again")


GramLike = str | os.PathLike[str] | GramFile


def as_gram(gram: GramLike | None) -> GramFile | None:
    return gram if isinstance(gram, GramFile) or gram is None else GramFile(gram)


def task_path(gram: GramFile | None) -> str | None:
    """What a task carries of a Gram file: its absolute path, opened where the task runs (`open_gram`)."""
    return None if gram is None else str(gram.path.resolve())


@functools.lru_cache(maxsize=2)
def _opened(path: str) -> GramFile:
    return GramFile(path)


def open_gram(path: str | None) -> GramFile | None:
    """The Gram file a task names, opened once per worker process."""
    return None if path is None else _opened(path)


def _list(path: Path, reader: GGUFReader, key: str) -> list[Any]:
    value = field_value(reader, key)
    if not isinstance(value, list):
        raise DynqError(f"{path}: no {key}; not a Gram file dynq wrote")
    return value
