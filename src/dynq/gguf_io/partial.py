"""An output being written, kept so that an interrupted run can go on: the folder `.NAME.dynq-partial` beside the
output holds the shards as far as they were written, a journal of the tensors whose bytes are on disk, and a lock.

The journal is written after the data it describes has been synced, one JSON line per tensor (shard, byte range,
SHA-256 of the bytes written, and the digest of the source tensor they were made from: sources/content.py), so it
never claims bytes the disk does not hold; a line cut short by a crash is ignored. The first line
records what the run was made from (the inputs' key and each shard's header hash): a resume is only allowed for the
same run. The lock (`flock`, released by the kernel when the process dies) makes a second writer of the same output
refuse instead of racing the first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dynq.core.records import RecordFormat, from_data, to_data
from dynq.errors import BadInput, DynqError

JOURNAL_VERSION = 2  # 2: each tensor line holds its source digest
_READ_CHUNK = 16 << 20


@dataclass(frozen=True)
class WrittenTensor:
    """One tensor whose bytes are on disk: in shard `shard`, bytes [start, end), with this SHA-256, made from the
    source tensor whose digest is `source` ("" for a copy, whose bytes are the source's)."""

    index: int
    name: str
    shard: int
    start: int
    end: int
    sha256: str
    source: str


@dataclass(frozen=True)
class RunHeader:
    """What identifies a run: the caller's key for its inputs, the tensor count and each shard's header hash."""

    inputs: str
    tensors: int
    shard_headers: tuple[str, ...]


# The journal's first line is this record; the lines after it are WrittenTensor's fields, unversioned.
_HEADER = RecordFormat(RunHeader, "dynq resume journal", JOURNAL_VERSION, "the run starts over")


def partial_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.dynq-partial"


def file_sha256(f: IO[bytes], start: int, end: int) -> str:
    h = hashlib.sha256()
    f.seek(start)
    left = end - start
    while left > 0:
        block = f.read(min(left, _READ_CHUNK))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest() if left == 0 else ""


class PartialOutput:
    """The partial folder of one output, locked for as long as this object holds it."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.dir = partial_dir(output)
        self.journal_path = self.dir / "journal.jsonl"
        self._lock: IO[bytes] | None = None
        self._journal: IO[str] | None = None

    def lock(self) -> None:
        self.dir.mkdir(exist_ok=True)
        handle = (self.dir / "lock").open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DynqError(
                f"{self.output}: another dynq run is writing this output (it holds {self.dir}); "
                "wait for it to finish or stop it"
            ) from None
        self._lock = handle

    def unlock(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def shard_files(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.gguf") if p.is_file())

    def read_journal(self) -> tuple[RunHeader | None, list[WrittenTensor]]:
        """The run header and the tensors the journal records, in order; a torn or foreign line ends the list."""
        if not self.journal_path.is_file():
            return None, []
        header: RunHeader | None = None
        written: list[WrittenTensor] = []
        with self.journal_path.open("rb") as f:
            for raw in f:
                try:
                    entry = json.loads(raw)
                    if header is None:
                        header = _HEADER.from_record(entry, str(self.journal_path))
                        continue
                    t = from_data(WrittenTensor, entry, str(self.journal_path))
                except (ValueError, RecursionError, BadInput):  # RecursionError: JSON nested past the parser
                    if header is None:  # another version's journal, or not one: nothing of it is kept
                        return None, []
                    break
                if t.index != len(written):
                    break
                written.append(t)
        return header, written

    def start_journal(self, header: RunHeader, kept: list[WrittenTensor]) -> None:
        """A new journal for this run that keeps `kept` (the verified prefix of a previous one)."""
        tmp = self.journal_path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(_HEADER.to_record(header)) + "\n")
            for t in kept:
                f.write(json.dumps(to_data(t)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.journal_path)
        self._journal = self.journal_path.open("a")

    def record(self, tensor: WrittenTensor) -> None:
        """Called after the tensor's bytes were synced."""
        assert self._journal is not None
        self._journal.write(json.dumps(to_data(tensor)) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def clear(self) -> None:
        """Everything an earlier run left (shards, journal), but the lock this run holds."""
        for entry in self.dir.iterdir():
            if entry.name == "lock":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def remove(self) -> None:
        self.unlock()
        shutil.rmtree(self.dir, ignore_errors=True)


def verified_prefix(written: list[WrittenTensor], shard_paths: list[Path]) -> list[WrittenTensor]:
    """The journaled tensors whose bytes still hash as recorded, up to the first that does not."""
    handles: dict[int, IO[bytes]] = {}
    kept: list[WrittenTensor] = []
    try:
        for t in written:
            # a journal edited by hand may say anything: a shard or a range no run writes ends the kept part
            if not 0 <= t.shard < len(shard_paths) or not 0 <= t.start <= t.end or not shard_paths[t.shard].is_file():
                break
            if t.shard not in handles:
                handles[t.shard] = shard_paths[t.shard].open("rb")
            if file_sha256(handles[t.shard], t.start, t.end) != t.sha256:
                break
            kept.append(t)
    finally:
        for h in handles.values():
            h.close()
    return kept
