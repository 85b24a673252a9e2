"""The probes' work copy of the reference and the model it is measured on.

A probe file is a copy of the float reference in which one group at a time is overwritten by its
quantize→dequantize and then restored. The copy stays loaded in llama.cpp, which computes from its memory map of the
file, so a probe writes its group's degraded bytes into the file and evaluates at once. Loading the model,
tokenizing the calibration text and reading the reference's predictions happen once per profile instead of once per
probe (they were half of a probe's time on a 1.5B model). Where llama.cpp keeps its own copies of the weights
instead (a repacking backend), the model is reopened after each change: slower, same results.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quantize as gguf_quantize

from dynq.budget.distortion import dequantized, rows2d
from dynq.calib.text import Text
from dynq.core.arrays import F32Array
from dynq.core.context import RunContext
from dynq.core.importance import Imatrix, importance_row, importance_rows, n_matrices
from dynq.core.qtypes import QType, qtype
from dynq.core.tensors import TensorInfo
from dynq.eval.evaluate import reference_predictions, score_chunks
from dynq.gguf_io.gram import GramFile
from dynq.gguf_io.reader import GGUFModel
from dynq.kernels import KernelBackend
from dynq.kernels.feedback import encode_with_feedback, inverse_factor
from dynq.llamacpp.runtime import LlamaRuntime, token_chunks

log = logging.getLogger(__name__)

# Rows read, encoded and written back per step of a probe: bounds memory whatever the tensor's size.
_CHUNK_ELEMENTS = 1 << 22
_COPY_BYTES = 1 << 24


def _stored_as(values: F32Array, t: QType) -> bytes:
    """Float32 values stored as the float type `t` (F32, F16 or BF16 round-to-nearest-even)."""
    if t.name == "F32":
        return values.astype(np.float32).tobytes()
    if t.name == "F16":
        return values.astype(np.float16).tobytes()
    return np.asarray(gguf_quantize(values, GGMLQuantizationType.BF16)).tobytes()


_PROBE_PREFIX = ".probe-"


def _remove_orphans(folder: Path) -> None:
    """Work copies left by a killed run (its process is gone): each is a whole model's size on disk."""
    for d in folder.glob(f"{_PROBE_PREFIX}*-*"):
        pid = d.name.removeprefix(_PROBE_PREFIX).split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # someone else's live process


class ProbeFile:
    """A work copy of the reference (every shard, same names, in a temporary folder under `folder`) in which
    `apply` overwrites tensors in place with their quantize→dequantize, stored in the reference's own float type,
    and `restore` copies the original bytes back from the reference. The reference is only ever read."""

    def __init__(self, reference: GGUFModel, folder: Path) -> None:
        self.reference = reference
        folder.mkdir(parents=True, exist_ok=True)
        _remove_orphans(folder)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{_PROBE_PREFIX}{os.getpid()}-", dir=folder))
        try:
            for shard in reference.shards:
                shutil.copyfile(shard, self.folder / shard.name)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.path = self.folder / reference.path.name
        # name -> (shard, absolute offset of its data in that shard, bytes)
        self._where = {
            t.name: (i, int(t.data_offset), int(t.n_bytes)) for i, r in enumerate(reference.readers) for t in r.tensors
        }
        self._dirty: list[str] = []

    def _shard(self, name: str) -> tuple[Path, int, int]:
        i, offset, n_bytes = self._where[name]
        return self.folder / self.reference.shards[i].name, offset, n_bytes

    def apply(
        self, tensors: Sequence[tuple[TensorInfo, QType]], imatrix: Imatrix | None, backend: KernelBackend,
        gram: GramFile | None = None,
    ) -> None:  # fmt: skip
        """Overwrite each tensor with its values encoded at its type and decoded, chunk by chunk (with error feedback
        where `gram` has the tensor's H)."""
        self.restore()
        for info, t in tensors:
            self._dirty.append(info.name)
            path, offset, _ = self._shard(info.name)
            with path.open("r+b") as f:
                for start, stored in self._degraded(info, t, imatrix, backend, gram):
                    f.seek(offset + start)
                    f.write(stored)
            self.reference.release(info.name)

    def _degraded(
        self, info: TensorInfo, t: QType, imatrix: Imatrix | None, backend: KernelBackend, gram: GramFile | None
    ) -> Iterator[tuple[int, bytes]]:
        source = qtype(info.dtype.name)
        h = gram.matrix(info.name) if gram is not None and n_matrices(info) == 1 else None
        factor = inverse_factor(h) if h is not None else None  # once per tensor, not per chunk of rows
        rows = rows2d(self.reference, info.name, info)
        row_bytes = source.row_bytes(info.row_length)
        importance = importance_rows(info, imatrix)
        per_matrix = rows.shape[0] // n_matrices(info)
        step = max(1, _CHUNK_ELEMENTS // info.row_length)
        for m in range(n_matrices(info)):
            w = importance_row(importance, m)
            # chunks stay inside one matrix, so every expert is encoded with its own importance row
            for a in range(m * per_matrix, (m + 1) * per_matrix, step):
                b = min(a + step, (m + 1) * per_matrix)
                values = dequantized(rows[a:b], source)
                if h is None:
                    encoded = backend.encode(t, values, w)
                else:  # rows are independent under feedback: a chunk of them is encoded as in the whole matrix
                    encoded = encode_with_feedback(t, values, w, h, backend, threads=backend.threads, factor=factor)
                decoded = dequantized(encoded, t)
                yield a * row_bytes, _stored_as(decoded, source)
        if gram is not None:
            gram.release(info.name)

    def restore(self) -> None:
        """Copy the original bytes of every overwritten tensor back from the reference."""
        while self._dirty:
            name = self._dirty.pop()
            path, offset, n_bytes = self._shard(name)
            src = self.reference.shards[self._where[name][0]]
            with src.open("rb") as fin, path.open("r+b") as fout:
                fin.seek(offset)
                fout.seek(offset)
                for done in range(0, n_bytes, _COPY_BYTES):
                    fout.write(fin.read(min(_COPY_BYTES, n_bytes - done)))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> ProbeFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LiveProbes:
    """A work copy of `reference` (at `path`) open in llama.cpp with the calibration text's first `chunks` chunks
    of `n_ctx` tokens; `kld` degrades a group in place, measures the mean KL divergence and restores it."""

    def __init__(self, reference: GGUFModel, path: Path, text: Text, n_ctx: int, chunks: int, ctx: RunContext) -> None:
        self.reference = reference_predictions(path, text.text, text.provenance, n_ctx, chunks, ctx)
        self.n_ctx, self.threads = n_ctx, ctx.threads
        self.work = ProbeFile(reference, ctx.cache_dir / "profiles")
        try:
            self.runtime = self._open()
            self.chunks = token_chunks(self.runtime.tokenize(text.text), n_ctx, chunks, "the calibration text")
        except BaseException:
            self.work.close()
            raise
        if not self.runtime.weights_mapped:
            log.info("llama.cpp copies the weights of %s; every probe reloads it", path)

    def _open(self) -> LlamaRuntime:
        return LlamaRuntime(self.work.path, self.n_ctx, self.threads, logits=True, mapped=True)

    def kld(self, typed: list[tuple[TensorInfo, QType]], imatrix: Imatrix | None, backend: KernelBackend,
            gram: GramFile | None = None) -> float:  # fmt: skip
        """Mean KL divergence against the reference with each tensor of `typed` encoded at its type and decoded."""
        self.work.apply(typed, imatrix, backend, gram)
        try:
            if not self.runtime.weights_mapped:
                self.runtime.close()
                self.runtime = self._open()
            scores = score_chunks(self.runtime, self.work.path, self.reference, self.chunks)
        finally:
            self.work.restore()
        return float(scores.summary()["kld_mean"])

    def close(self) -> None:
        self.runtime.close()
        self.work.close()

    def __enter__(self) -> LiveProbes:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
