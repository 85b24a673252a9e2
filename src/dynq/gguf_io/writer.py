"""Streaming GGUF output: all tensor infos are fixed first, then tensor data is written one tensor at a time.
`write_gguf` is the one loop every writer of dynq (quantize, split, merge) goes through, and `copy_metadata` the
one way metadata is carried from a source into an output, with the layout its `general.alignment` asks for.

The files grow in a partial folder beside the output (`.NAME.dynq-partial`, see `partial.py`) and are renamed into
place only when every byte is on disk, so an interrupted or failed run never leaves a file that looks complete, and an
interrupted one can be resumed. Splitting into llama.cpp shards
(`NAME-00001-of-0000N.gguf` with the `split.*` keys) is gguf-py's; every file of the set is an output, none is
replaced without `overwrite`.

A writer that cannot resume (a copy: split, merge) removes its partial folder when interrupted or failed; one a
SIGKILL left is cleared by the next run with `overwrite`, or named in a LeftoverRun error.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum, auto
from io import BufferedWriter
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf import quantize as gguf_quantize

from dynq.core.arrays import F32Array, U8Array
from dynq.core.atomic import check_output_folder
from dynq.core.qtypes import QType
from dynq.core.source import MetadataField
from dynq.core.tensors import TensorInfo
from dynq.errors import DynqError, LeftoverRun, OutputExists, ResumeRequired
from dynq.gguf_io.partial import PartialOutput, RunHeader, WrittenTensor, file_sha256, verified_prefix

log = logging.getLogger(__name__)


def encode_float(t: QType, values: F32Array) -> U8Array:
    """Values stored as a float type (F32, F16, BF16 rounded to nearest even)."""
    if t.name == "F32":
        return values.astype(np.float32).view(np.uint8)
    if t.name == "F16":
        return values.astype(np.float16).view(np.uint8)
    return np.asarray(gguf_quantize(values, t.ggml)).view(np.uint8)  # BF16, round-to-nearest-even


def copy_metadata(fields: Iterable[MetadataField], writer: GGUFWriter, drop: Callable[[str], bool]) -> None:
    """Every key/value of `fields`, in order, but the architecture (which gguf-py writes first by itself) and the
    keys `drop` names; the tensor data is then laid out with the `general.alignment` the file declares."""
    for f in fields:
        if f.key == "general.architecture" or drop(f.key):
            continue
        writer.add_key_value(f.key, f.value, f.vtype, f.sub_type)
        if f.key == "general.alignment":
            writer.data_alignment = int(f.value)


@dataclass(frozen=True)
class ChunkedBytes:
    """One tensor's bytes made and written piece by piece (one expert at a time), so the whole never sits in
    memory."""

    parts: Sequence[Callable[[], U8Array]]
    nbytes: int


def _parts(data: U8Array | ChunkedBytes) -> Iterator[U8Array]:
    if isinstance(data, ChunkedBytes):
        yield from (make() for make in data.parts)
    else:
        yield data


class _Recorded:
    """A tensor's bytes as gguf-py's writer takes them (it asks `nbytes` and calls `tofile`), hashed while written and
    with the offset they start at, for the journal."""

    def __init__(self, data: U8Array | ChunkedBytes) -> None:
        self.data = data
        self.nbytes = data.nbytes
        self.start = -1
        self.sha256 = ""

    def tofile(self, f: BinaryIO) -> None:
        self.start = f.tell()
        h = hashlib.sha256()
        written = 0
        for made in _parts(self.data):
            part = np.ascontiguousarray(made).view(np.uint8).reshape(-1)
            h.update(part.data)
            part.tofile(f)
            written += part.nbytes
        if written != self.nbytes:
            raise DynqError(f"a chunked tensor wrote {written} bytes, {self.nbytes} declared")
        self.sha256 = h.hexdigest()


@dataclass(frozen=True)
class _Kept:
    """A tensor a resumed run keeps: gguf-py's writer steps over its bytes, which are already in the file."""

    nbytes: int
    start: int

    def tofile(self, f: BinaryIO) -> None:
        if f.tell() != self.start:
            raise DynqError(f"resuming: a kept tensor starts at {f.tell()}, the journal says {self.start}")
        f.seek(self.nbytes, os.SEEK_CUR)


class WriterState(Enum):
    """Where a StreamingWriter is (as gguf-py's writer keeps its own): each call is allowed in one state only."""

    DECLARING = auto()  # metadata and tensor infos are added
    WRITING = auto()  # headers on disk: the declared tensors are written (or kept) in order
    FINISHED = auto()  # every file renamed into place
    ABORTED = auto()  # closed, the partial folder kept for a resume or removed


class WriterStateError(RuntimeError):
    """A StreamingWriter call out of order. Only dynq's own code drives the writer, so this is a bug in dynq, not in a
    user's input: a RuntimeError with its traceback, not a DynqError the CLI would print as the user's problem."""


class StreamingWriter:
    """Declare every tensor, then `begin`, then `write` (or `keep`) them in the same order; `finish` renames the files
    into place, `abort` gives up. The files grow in the output's partial folder with a journal (see `partial.py`);
    with `resume`, the verified tensors of an interrupted run of the same `inputs` are kept, and `resumed` says how
    many. A writer that is not `resumable` (a copy) clears what an interrupted run left when it may `overwrite`.
    `state` says which calls are allowed; any other is refused with a WriterStateError."""

    def __init__(self, output: Path, arch: str, split_max_size: int = 0, *, inputs: str = "", resume: bool = False,
                 overwrite: bool = True, resumable: bool = True) -> None:  # fmt: skip
        check_output_folder(output)
        if output.suffix != ".gguf":
            raise DynqError(f"{output}: the output name must end in .gguf")
        if not overwrite and output.exists():
            raise OutputExists(output)
        if resume and not resumable:
            raise WriterStateError(f"{output}: resume asked of a writer that cannot resume")
        self.output = output
        self.inputs = inputs
        self.overwrite = overwrite
        self.resumable = resumable
        self.partial = PartialOutput(output)
        self.partial.lock()
        self.previous_header, self.previous = self.partial.read_journal()
        leftover = self.partial.shard_files()
        if (leftover or self.previous) and not resume:
            left = f"an interrupted run left {len(self.previous)} written tensors"
            if resumable:
                self.partial.unlock()
                raise ResumeRequired(output, left, self.partial.dir)
            if not overwrite:
                self.partial.unlock()
                raise LeftoverRun(output, left, self.partial.dir)
            log.info("%s: %s in %s; starting over", output, left, self.partial.dir)
            self.partial.clear()
            self.previous_header, self.previous = None, []
        self.scratch = self.partial.dir / "header"
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir()
        self.scratch_file = self.scratch / output.name  # where gguf-py writes the headers (one name per shard)
        self.writer = GGUFWriter(self.scratch_file, arch, split_max_size=split_max_size)
        self.names: list[str] = []
        self.paths: list[Path] = []
        self.kept: list[WrittenTensor] = []
        self.resumed = 0
        self._next = 0
        self.state = WriterState.DECLARING

    def _expect(self, state: WriterState, call: str) -> None:
        if self.state is not state:
            raise WriterStateError(f"{self.output}: {call}() while {self.state.name}; it is allowed while {state.name}")

    def _files(self) -> list[BufferedWriter]:
        """gguf-py's open files, one per shard (open from `begin` until `finish` or `abort`)."""
        if self.writer.fout is None:
            raise WriterStateError(f"{self.output}: the files are not open")
        return self.writer.fout

    def declare(self, info: TensorInfo, nbytes: int, ggml_type: GGMLQuantizationType) -> None:
        self._expect(WriterState.DECLARING, "declare")
        # A uint8 byte shape; gguf-py converts it back to the element shape from the type.
        rows = info.n_elements // info.row_length
        byte_shape = [*reversed(info.shape[1:]), nbytes // rows] if rows else [nbytes]
        self.writer.add_tensor_info(info.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=ggml_type)
        self.names.append(info.name)

    def begin(self, current: Callable[[int], str] | None = None) -> None:
        """Write headers, metadata and tensor infos of every shard (into the scratch folder), then put each shard in
        place: the fresh one, or with `resume` the previous one cut back to its last verified tensor. `current(i)` is
        the digest of the source tensor `i` is made from as it is now: a kept tensor whose source changed since it
        was written is written again, and every one after it."""
        self._expect(WriterState.DECLARING, "begin")
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()
        scratch_paths = self.writer.format_shard_names(self.scratch_file)
        self.paths = [self.partial.dir / p.name for p in scratch_paths]
        if not self.overwrite:  # every file of a split set is an output: none is replaced unasked
            for p in scratch_paths:
                target = self.output.parent / p.name
                if target.exists() or target.is_symlink():
                    raise OutputExists(target)
        header_ends = [f.tell() for f in self._files()]
        hashes = []
        for path, end in zip(scratch_paths, header_ends, strict=True):
            with path.open("rb") as f:
                hashes.append(file_sha256(f, 0, end))
        header = RunHeader(self.inputs, len(self.names), tuple(hashes))
        kept: list[WrittenTensor] = []
        if self.previous_header is not None:
            if self.previous_header != header:
                raise DynqError(
                    f"{self.output}: the interrupted run in {self.partial.dir} was made from other inputs or another "
                    "plan; delete that folder to start over"
                )
            kept = verified_prefix(self.previous, self.paths)
            for shard, path in enumerate(self.paths):
                if any(t.shard == shard for t in kept):
                    with path.open("rb") as f:
                        if file_sha256(f, 0, header_ends[shard]) != hashes[shard]:
                            kept = [t for t in kept if t.shard < shard]
                            break
            if current is not None:
                kept = self._unchanged_sources(kept, current)
        for shard, (fresh, path, end) in enumerate(zip(scratch_paths, self.paths, header_ends, strict=True)):
            ends = [t.end for t in kept if t.shard == shard]
            if not ends:
                fresh.replace(path)  # the open file follows the rename
                continue
            self._files()[shard].close()
            previous = path.open("r+b")
            previous.truncate(max(ends))
            previous.seek(end)
            self._files()[shard] = previous  # type: ignore[call-overload]  # r+b: read and write
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.partial.start_journal(header, kept)
        self.kept = kept
        self.resumed = len(kept)
        self.state = WriterState.WRITING
        if kept:
            log.info("%s: resuming after %d verified tensors", self.output, len(kept))

    def _unchanged_sources(self, kept: list[WrittenTensor], current: Callable[[int], str]) -> list[WrittenTensor]:
        """The kept tensors up to the first whose source tensor is no longer what it was made from."""
        for i, t in enumerate(kept):
            if current(t.index) != t.source:
                log.warning("%s: %s changed in the source since the interrupted run; it and the %d tensors after it "
                            "are written again", self.output, t.name, len(kept) - i - 1)  # fmt: skip
                return kept[:i]
        return kept

    def _shard_of_next(self) -> int:
        # gguf-py writes each tensor into the first shard that still has tensors declared
        return next(i for i, declared in enumerate(self.writer.tensors) if declared)

    def keep(self) -> None:
        """Step over the next tensor: a resumed run's verified bytes are already there."""
        self._expect(WriterState.WRITING, "keep")
        if self._next >= len(self.kept):
            raise WriterStateError(f"{self.output}: keep() of tensor {self._next + 1}, but {len(self.kept)} were kept")
        t = self.kept[self._next]
        self.writer.write_tensor_data(_Kept(t.end - t.start, t.start))  # type: ignore[arg-type]  # duck-typed
        self._next += 1

    def write(self, data: U8Array | ChunkedBytes, made_from: Callable[[], str] | None = None) -> None:
        """The next tensor's bytes: an array, or chunks written one at a time; synced, then journaled with
        `made_from()`, the digest of the source bytes they were made from (asked once every chunk is made)."""
        self._expect(WriterState.WRITING, "write")
        if not self.resumed <= self._next < len(self.names):
            raise WriterStateError(
                f"{self.output}: write() of tensor {self._next + 1}; {self.resumed} kept, {len(self.names)} declared"
            )
        shard = self._shard_of_next()
        recorded = _Recorded(data)
        self.writer.write_tensor_data(recorded)  # type: ignore[arg-type]  # duck-typed: nbytes and tofile
        fout = self._files()[shard]
        fout.flush()
        os.fsync(fout.fileno())
        source = made_from() if made_from is not None else ""
        self.partial.record(WrittenTensor(self._next, self.names[self._next], shard, recorded.start,
                                          recorded.start + recorded.nbytes, recorded.sha256, source))  # fmt: skip
        self._next += 1

    def finish(self) -> list[Path]:
        """Flush, sync and rename every shard to its final name; returns the final paths."""
        self._expect(WriterState.WRITING, "finish")
        if self._next != len(self.names):
            raise WriterStateError(f"{self.output}: finish() after {self._next} of {len(self.names)} tensors")
        self.writer.close()
        final = []
        for path in self.paths:
            with path.open("rb+") as f:
                os.fsync(f.fileno())
            target = self.output.parent / path.name
            path.replace(target)
            final.append(target)
        self.partial.remove()
        self.state = WriterState.FINISHED
        return final

    def abort(self, keep: bool) -> int:
        """Close the files; keep the partial folder for a resume if asked and any tensor is in it, or if an earlier
        run left it (a failed resume loses nothing), else remove it. Returns how many tensors are kept. Allowed before
        `finish` has succeeded (also when it failed half-way), once."""
        if self.state in (WriterState.FINISHED, WriterState.ABORTED):
            raise WriterStateError(f"{self.output}: abort() while {self.state.name}")
        self.state = WriterState.ABORTED
        try:
            self.writer.close()
        finally:
            if (keep and self._next > 0) or self.previous:
                self.partial.unlock()
                shutil.rmtree(self.scratch, ignore_errors=True)
            else:
                self.partial.remove()
        return max(self._next, len(self.previous)) if keep or self.previous else 0


@contextmanager
def streaming_writer(output: Path, arch: str, split_max_size: int = 0, *, inputs: str = "", resume: bool = False,
                     overwrite: bool = True, resumable: bool = True) -> Iterator[StreamingWriter]:  # fmt: skip
    """The writer, with the partial folder kept when the run was interrupted (a signal, Ctrl-C) or the disk failed,
    so that a resume continues it, and removed on any other failure (and on every failure of a writer that is not
    `resumable`)."""
    try:
        writer = StreamingWriter(output, arch, split_max_size, inputs=inputs, resume=resume, overwrite=overwrite,
                                 resumable=resumable)  # fmt: skip
    except OSError as e:
        raise DynqError(f"{output}: cannot write there ({e.strerror or e})") from e
    try:
        yield writer
    except OSError as e:
        kept = writer.abort(keep=resumable)
        failed = f"writing failed ({e.strerror or e}); nothing was left under that name"
        if kept:
            raise ResumeRequired(output, f"{failed}; the {kept} tensors written are kept", writer.partial.dir) from e
        raise DynqError(f"{output}: {failed}") from e
    except (KeyboardInterrupt, SystemExit):
        if kept := writer.abort(keep=resumable):
            log.warning("%s: interrupted; %d tensors are kept in %s, resume to continue", output, kept,
                        writer.partial.dir)  # fmt: skip
        raise
    except BaseException:
        writer.abort(keep=False)
        raise


@dataclass(frozen=True)
class OutputTensor:
    """A tensor as it will be stored: its info (name, shape), its byte count and its GGML type."""

    info: TensorInfo
    nbytes: int
    ggml_type: GGMLQuantizationType


class SourceDigests(Protocol):
    """What a resumable output is made from, tensor by tensor (sources/content.py gives the digests)."""

    def made_from(self, info: TensorInfo) -> str:
        """The digest of the source bytes the tensor just written was made from."""
        ...

    def current(self, info: TensorInfo) -> str:
        """The digest of the tensor's source bytes as they are now, every byte read."""
        ...


def write_gguf(
    output: Path,
    arch: str,
    tensors: Sequence[OutputTensor],
    data: Callable[[OutputTensor], U8Array | ChunkedBytes],
    *,
    metadata: Callable[[GGUFWriter], None],
    split_max_size: int = 0,
    written: Callable[[int, OutputTensor], None] | None = None,
    inputs: str = "",
    resume: bool = False,
    overwrite: bool = True,
    sources: SourceDigests | None = None,
) -> list[Path]:
    """Write `output` (or its shards): `metadata` adds the key/values, every tensor is declared, then each one's
    bytes come from `data` in order and `written(index, tensor)` follows each write. With `resume`, the tensors an
    interrupted run of the same `inputs` (a key of everything else the bytes depend on) left verified, and whose
    source tensors `sources` finds unchanged, are kept and not asked of `data`. Without `sources` the writer is a
    copy's, which does not resume. Returns the final paths."""
    with streaming_writer(output, arch, split_max_size, inputs=inputs, resume=resume, overwrite=overwrite,
                          resumable=sources is not None) as writer:  # fmt: skip
        metadata(writer.writer)
        for t in tensors:
            writer.declare(t.info, t.nbytes, t.ggml_type)
        writer.begin(None if sources is None else lambda i: sources.current(tensors[i].info))
        for i, t in enumerate(tensors):
            if i < writer.resumed:
                writer.keep()
                if written is not None:
                    written(i, t)
                continue
            chunk = data(t)
            if chunk.nbytes != t.nbytes:
                raise DynqError(f"{t.info.name}: {chunk.nbytes} bytes to write, {t.nbytes} declared")
            writer.write(chunk, None if sources is None else functools.partial(sources.made_from, t.info))
            if written is not None:
                written(i, t)
        return writer.finish()
