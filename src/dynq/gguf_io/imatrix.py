"""Importance matrices (core/importance.py) in llama.cpp's two file formats: GGUF (`*.in_sum2` / `*.counts`) and
the legacy `.dat`."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from dynq.core.arrays import F32Array
from dynq.core.atomic import atomic_path, atomic_write_bytes, check_output_folder
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.errors import DynqError
from dynq.gguf_io.reader import field_value

# What the calls that use importance data take: one already read, or a file (GGUF or .dat).
ImatrixLike = Imatrix | str | os.PathLike[str]


def as_imatrix(imatrix: ImatrixLike | None) -> Imatrix | None:
    """Importance data read once, for every step that uses it (a read one remembers its file)."""
    return imatrix if imatrix is None or isinstance(imatrix, Imatrix) else read_imatrix(imatrix)


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an imatrix in GGUF or legacy .dat format (told apart by the GGUF magic)."""
    path = Path(path)
    if not path.is_file():
        raise DynqError(f"{path}: no such imatrix file")
    with path.open("rb") as f:
        magic = f.read(4)
    imatrix = _read_gguf(path) if magic == b"GGUF" else _read_dat(path)
    imatrix.check(str(path))
    imatrix.path = str(path)
    return imatrix


def _read_gguf(path: Path) -> Imatrix:
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OverflowError, MemoryError) as e:
        raise DynqError(f"{path}: truncated or corrupt imatrix ({e}); make it again") from None
    if field_value(reader, "general.type") != "imatrix":
        raise DynqError(f"{path}: a GGUF file but not an imatrix (general.type is not 'imatrix')")
    tensors = {t.name: t for t in reader.tensors}
    entries = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts_t = tensors.get(base + ".counts")
        if counts_t is None:
            raise DynqError(f"{path}: entry {base} has sums but no counts; the imatrix is corrupt")
        for part in (t, counts_t):
            if part.tensor_type != GGMLQuantizationType.F32 or part.n_elements == 0 or int(part.shape[0]) == 0:
                raise DynqError(f"{path}: entry {part.name} is not a non-empty F32 tensor; the imatrix is corrupt")
        sums = np.array(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        counts = np.array(counts_t.data, dtype=np.float32).reshape(-1)
        if counts.size != sums.shape[0]:
            raise DynqError(f"{path}: entry {base} has {sums.shape[0]} matrices but {counts.size} counts")
        entries[base] = ImatrixEntry(sums, counts)
    datasets = field_value(reader, "imatrix.datasets") or []
    return Imatrix(
        entries,
        [str(d) for d in (datasets if isinstance(datasets, list) else [datasets])],
        _count(path, reader, "imatrix.chunk_count"),
        _count(path, reader, "imatrix.chunk_size"),
    )


def _count(path: Path, reader: GGUFReader, key: str) -> int:
    value = field_value(reader, key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DynqError(f"{path}: {key} is {str(value)[:40]!r}, not a count; the imatrix is corrupt")
    return value


class _DatReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def take(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise DynqError(f"{self.path}: truncated or not an imatrix (.dat ends at byte {len(self.data)})")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def floats(self, n: int) -> F32Array:
        end = self.pos + 4 * n
        if n <= 0 or end > len(self.data):
            raise DynqError(f"{self.path}: truncated or not an imatrix (.dat ends at byte {len(self.data)})")
        out = np.frombuffer(self.data, dtype="<f4", count=n, offset=self.pos).astype(np.float32)
        self.pos = end
        return out


def _read_dat(path: Path) -> Imatrix:
    r = _DatReader(path)
    (n_entries,) = r.take("<i")
    if not 0 < n_entries < 1_000_000:
        raise DynqError(f"{path}: neither a GGUF imatrix nor a legacy .dat one (entry count {n_entries})")
    entries = {}
    for _ in range(n_entries):
        (name_len,) = r.take("<i")
        if not 0 < name_len < 4096:
            raise DynqError(f"{path}: not a valid .dat imatrix (name length {name_len})")
        name = r.data[r.pos : r.pos + name_len].decode("utf-8", errors="replace")
        r.pos += name_len
        ncall, nval = r.take("<ii")
        values = r.floats(nval)
        # Stored as mean·ncall: keep ncall as the token count so that sums / counts gives the mean back.
        calls = np.float32(max(ncall, 1))
        entries[name] = ImatrixEntry(values.reshape(1, -1), np.array([calls], dtype=np.float32))
    chunk_count = r.take("<i")[0] if r.pos + 4 <= len(r.data) else 0
    datasets = []
    if r.pos + 4 <= len(r.data):
        (n,) = r.take("<i")
        if not 0 <= n <= len(r.data) - r.pos:
            raise DynqError(f"{path}: not a valid .dat imatrix (dataset name length {n})")
        datasets.append(r.data[r.pos : r.pos + n].decode("utf-8", errors="replace"))
    if chunk_count < 0:
        raise DynqError(f"{path}: not a valid .dat imatrix (chunk count {chunk_count})")
    return Imatrix(entries, datasets, chunk_count)


def write_imatrix_gguf(imatrix: Imatrix, path: str | Path) -> None:
    """Write llama.cpp's GGUF imatrix format (to a temporary name, then renamed into place)."""
    path = Path(path)
    check_output_folder(path)
    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, arch="imatrix")
        writer.kv_data[0].pop("general.architecture", None)  # llama.cpp's imatrix files carry general.type only
        writer.add_string("general.type", "imatrix")
        writer.add_array("imatrix.datasets", imatrix.datasets)
        writer.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
        writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
        for name in sorted(imatrix.entries):
            e = imatrix.entries[name]
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype=np.float32))
            writer.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts.reshape(-1, 1), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def write_imatrix_dat(imatrix: Imatrix, path: str | Path) -> None:
    """Write the legacy .dat format: per entry mean·ncall, as llama-imatrix --output-format dat does."""
    path = Path(path)
    check_output_folder(path)
    chunk = max(imatrix.chunk_size, 1)
    out = [struct.pack("<i", len(imatrix.entries))]
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        ncall = int(max(1, -(-int(e.counts.max(initial=0)) // chunk)))
        mean = e.importance()
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, mean.size)]
        out.append((mean.reshape(-1) * np.float32(ncall)).astype("<f4").tobytes())
    dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode()
    out += [struct.pack("<i", imatrix.chunk_count), struct.pack("<i", len(dataset)), dataset]
    atomic_write_bytes(path, b"".join(out))
