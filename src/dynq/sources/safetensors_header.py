"""A safetensors file's header, read and checked the way the safetensors library itself checks it, without reading
the weights: a file cut short, a crafted header (nested a hundred thousand levels, a name twice, byte ranges that
overlap or leave gaps) or a pipe in place of a file is one line, never a hang or a traceback.

Files are opened only after `fstat` says they are regular, and without blocking: opening a FIFO for reading would
wait for a writer forever.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dynq.errors import BadInput

# The safetensors library refuses a header longer than this (its MAX_HEADER_SIZE); so does dynq, before reading it.
MAX_HEADER_BYTES = 100_000_000

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype, shape and byte range within the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def not_regular(mode: int) -> str | None:
    """What a file of this mode is when it is not a regular file (said in a message), or None."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: Path, what: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file (symbolic links followed); a pipe, a device or a folder is
    refused as one line without waiting on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise BadInput(f"{path}: cannot read this {what} ({e.strerror}); download it again") from None
    try:
        kind = not_regular(os.fstat(fd).st_mode)
        if kind is not None:
            raise BadInput(f"{path}: this {what} is {kind}, not a file; put the downloaded file there")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(entry: object) -> TensorEntry | str:
    """One tensor's header entry, or what is wrong with it (dtype, shape, data_offsets and their agreement)."""
    if not isinstance(entry, dict):
        return "is not a mapping"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        return f"has the unknown dtype {str(dtype)[:20]!r}"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return "has no valid shape"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        return "has no valid data_offsets"
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        return f"holds {offsets[1] - offsets[0]} bytes for a {dtype} shape {shape}"
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Repeated(key)
        out[key] = value
    return out


class _Repeated(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except _Repeated as e:
        raise BadInput(f"{path}: the safetensors header names {e.key[:200]} twice; download the file again") from None
    except RecursionError:
        raise BadInput(f"{path}: the safetensors header is nested too deeply to be one; download it again") from None
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise BadInput(f"{path}: the safetensors header is not valid JSON; download the file again") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path}: the safetensors header is not a JSON object; download the file again")
    return header


def read_header(path: Path) -> dict[str, TensorEntry]:
    """A shard's tensors as its header describes them, after checking the header as the safetensors library does:
    at most 100 MB, a JSON object naming each tensor once, each entry's bytes matching its dtype and shape, and the
    byte ranges covering the data section exactly, without gaps or overlaps (a download cut short shows here, not
    as a crash halfway through a quantization)."""
    with open_regular(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise BadInput(f"{path}: not a safetensors file (shorter than its header); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise BadInput(f"{path}: the safetensors header claims {n} bytes, more than the format allows "
                           f"({MAX_HEADER_BYTES}); not a safetensors file")  # fmt: skip
        if n > size - 8:
            raise BadInput(f"{path}: the safetensors header is cut short; download the file again")
        raw = f.read(n)
    tensors: dict[str, TensorEntry] = {}
    for name, entry in _parse(path, raw).items():
        if name == "__metadata__":
            continue
        checked = _entry(entry)
        if isinstance(checked, str):
            raise BadInput(f"{path}: tensor {name} {checked} in the safetensors header; download the file again")
        tensors[name] = checked
    end = 0
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if t.start != end:
            what = "overlaps the tensor before it" if t.start < end else "leaves a gap before it"
            raise BadInput(f"{path}: tensor {name}'s byte range {what} in the safetensors header; "
                           "the file is damaged or crafted")  # fmt: skip
        end = t.end
    if 8 + n + end > size:
        raise BadInput(f"{path}: truncated: the header describes {8 + n + end} bytes, the file has {size}; "
                       "download it again")  # fmt: skip
    if 8 + n + end < size:
        raise BadInput(f"{path}: {size - 8 - n - end} bytes follow the last tensor the header describes; "
                       "download the file again")  # fmt: skip
    return tensors
