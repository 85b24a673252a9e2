"""Shard sets as a fuzzing input (the `shards` kind of tests/fuzzing.py): a split model whose set is damaged the ways a
download, a copy or a stranger damages it, then inspected and merged.

Mutations: a `split.*` value (or its type) changed in one shard; a shard missing, duplicated, swapped with another,
replaced by a shard of another split of the same model (cut elsewhere), by a directory or a pipe; the set renamed to
another count or number; one shard's bytes mutated where its structure is. A case passes when the set is refused
with one DynqError, or accepted whole: an accepted set must hold every tensor of the model, once.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType

import dynq
from dynq.gguf_io.reader import GGUFModel
from tiny_models import llama_tensors, write_gguf

_SPLIT_KEYS = (b"split.no", b"split.count", b"split.tensors.count")
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_VALUES = [0, 1, 2, 3, 4, 7, 8, 20, 21, 22, 255, 2**15, 2**16 - 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1]


@dataclass(frozen=True)
class ShardSeeds:
    """The tiny model as gguf-py splits it at 8 tensors a shard (3 shards), and cut at 7 (another split)."""

    shards: list[bytes]
    other: list[bytes]
    n_tensors: int

    @staticmethod
    def make(work: Path) -> ShardSeeds:
        def split(per_shard: int) -> list[bytes]:
            folder = work / f"seed-shards-{per_shard}"
            folder.mkdir()
            write_gguf(folder / "s.gguf", llama_tensors(), split_max_tensors=per_shard)
            return [p.read_bytes() for p in sorted(folder.glob("s-*-of-*.gguf"))]

        return ShardSeeds(split(8), split(7), len(llama_tensors()))


def _value_at(data: bytes, key: bytes) -> tuple[int, int, int] | None:
    """Where the value of `key` is in a GGUF's bytes: (offset of its type, offset of its value, value size)."""
    at = data.find(struct.pack("<Q", len(key)) + key)
    if at < 0:
        return None
    type_at = at + 8 + len(key)
    (vtype,) = struct.unpack_from("<I", data, type_at)
    return type_at, type_at + 4, _SCALAR_SIZES.get(vtype, 0)


def _split_value(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    key = rng.choice(_SPLIT_KEYS)
    found = _value_at(data, key)
    if found is None or not found[2]:
        return data, f"{key.decode()} absent"
    type_at, value_at, size = found
    if rng.random() < 0.2:
        vtype = rng.choice([t.value for t in GGUFValueType])
        return data[:type_at] + struct.pack("<I", vtype) + data[type_at + 4 :], f"{key.decode()} type -> {vtype}"
    new = rng.choice(_VALUES) & ((1 << (8 * size)) - 1)
    changed = data[:value_at] + new.to_bytes(size, "little") + data[value_at + size :]
    return changed, f"{key.decode()} -> {new}"


def _names(count: int, stem: str = "S") -> list[str]:
    return [f"{stem}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


Mutate = Callable[[bytes, random.Random], tuple[bytes, str]]


def shard_set_case(work: Path, seeds: ShardSeeds, rng: random.Random, mutate_binary: Mutate) -> tuple[Path, str]:
    """Write one damaged set into `work/case-shards` and return the file to give dynq, with what was done."""
    folder = work / "case-shards"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    files = list(seeds.shards)
    names = _names(len(files))
    given = 0
    roll = rng.random()
    i = rng.randrange(len(files))
    if roll < 0.35:
        files[i], what = _split_value(files[i], rng)
        what = f"shard {i + 1}: {what}"
    elif roll < 0.5:
        files[i], what = mutate_binary(files[i], rng)
        what = f"shard {i + 1}: {what}"
    elif roll < 0.6:
        del files[i]
        del names[i]
        given = 0 if i else len(names) - 1
        what = f"shard {i + 1} missing"
    elif roll < 0.68:
        files[i] = seeds.other[i if i < len(seeds.other) else -1]
        what = f"shard {i + 1} from a split cut elsewhere"
    elif roll < 0.76:
        j = (i + 1) % len(files)
        files[i], files[j] = files[j], files[i]
        what = f"shards {i + 1} and {j + 1} swapped"
    elif roll < 0.84:
        count = rng.choice([0, 1, 2, 4, 99999])
        if count > len(files):
            files.append(files[i])  # an extra shard: a copy of one
        names = _names(count)[: len(files)] if count else [f"S-{k:05d}-of-00000.gguf" for k in range(1, 4)]
        files = files[: len(names)]
        what = f"renamed to -of-{count:05d} with {len(files)} files"
    elif roll < 0.92:
        no = rng.choice([0, 4, 99999])
        names[0] = f"S-{no:05d}-of-{len(files):05d}.gguf"
        what = f"first shard renamed to number {no}"
    else:
        kind = rng.choice(["directory", "fifo", "empty"])
        for name, data in zip(names, files, strict=True):
            (folder / name).write_bytes(data)
        target = folder / names[i]
        target.unlink()
        if kind == "directory":
            target.mkdir()
        elif kind == "fifo":
            os.mkfifo(target)
        else:
            target.write_bytes(b"")
        given = (i + 1) % len(names)
        return folder / names[given], f"shard {i + 1} is {'an empty file' if kind == 'empty' else 'a ' + kind}"
    for name, data in zip(names, files, strict=True):
        (folder / name).write_bytes(data)
    return folder / names[min(given, len(names) - 1)], what


def check_shard_set(path: Path, out: Path, n_tensors: int, merge: bool) -> None:
    """What a user does with a set: inspect it, merge it. An accepted set must be the whole model."""
    model = GGUFModel(path)
    found = len(model.tensors)
    if found != n_tensors:
        raise AssertionError(f"accepted a set of {found} tensors; the model has {n_tensors}")
    str(dynq.inspect(str(path)))
    if merge and len(model.shards) > 1:
        out.unlink(missing_ok=True)
        merged = dynq.merge(path, out).files[0]
        if len(GGUFModel(merged).tensors) != n_tensors:
            raise AssertionError("the merged file lost tensors")
