"""The layout of a Hugging Face checkpoint folder as fuzzing mutations (tests/fuzzing.py, kind `checkpoint`): what
the index names (absolute paths, `..`, a subfolder, a shard that is missing, a link out of the folder, a pipe, a
folder), shards that are missing, duplicated or replaced by links, pipes and folders, tensors missing from a shard
or named twice, and config.json's block count against the blocks present.

Each mutation says what a correct dynq does with it: `refuse` (a one-line error; accepting it is a finding),
`work` (a valid layout, such as a Hugging Face cache snapshot whose files link into `../../blobs`; refusing it is a
finding) or `any`. Seed files are hard-linked into each case, so every change replaces a file (`rewrite`) rather
than writing into it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX = "model.safetensors.index.json"
BLOCKS = 2  # tiny_qwen2's


@dataclass(frozen=True)
class Seeds:
    single: Path  # tiny_qwen2: model.safetensors
    sharded: Path  # the same weights in two shards with an index
    outside: Path  # beside the cases: a valid shard where a crafted index or link reaches for it

    @property
    def secret(self) -> Path:
        return self.outside / "secret.safetensors"


def make_seeds(work: Path) -> Seeds:
    from hf_checkpoints import tiny_qwen2  # torch and transformers: only when this kind runs

    seeds = Seeds(tiny_qwen2(work / "seed-checkpoint"), tiny_qwen2(work / "seed-sharded", shards=2), work / "outside")
    seeds.outside.mkdir()
    os.link(seeds.single / "model.safetensors", seeds.secret)
    return seeds


@dataclass(frozen=True)
class Case:
    folder: Path
    what: str
    expect: str  # refuse | work | any


def _clear(path: Path) -> None:
    if path.is_symlink() or path.is_file() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def fresh_copy(seed: Path, case: Path) -> Path:
    """`case` as a copy of `seed`, every file hard-linked (mutations replace files, never write into them)."""
    _clear(case)
    case.mkdir(parents=True)
    for p in seed.iterdir():
        os.link(p, case / p.name)
    return case


def rewrite(path: Path, data: bytes) -> None:
    """Replace `path` (which may be a hard link to a seed file) by a new file holding `data`."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


# --- safetensors and index editing --------------------------------------------------------------------------------


def read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, tensors: dict[str, tuple[dict[str, Any], bytes]]) -> None:
    """A valid safetensors file of `tensors` (name -> (entry without offsets, bytes)), laid out in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data, offset = bytearray(), 0
    for name, (entry, values) in tensors.items():
        header[name] = {
            "dtype": entry["dtype"],
            "shape": entry["shape"],
            "data_offsets": [offset, offset + len(values)],
        }
        data += values
        offset += len(values)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rewrite(path, struct.pack("<Q", len(text)) + text + bytes(data))


def tensors_of(path: Path) -> dict[str, tuple[dict[str, Any], bytes]]:
    header, data = read_st(path)
    header.pop("__metadata__", None)
    return {name: (e, data[e["data_offsets"][0] : e["data_offsets"][1]]) for name, e in header.items()}


def index_of(case: Path) -> dict[str, Any]:
    index: dict[str, Any] = json.loads((case / INDEX).read_text())
    return index


def save_index(case: Path, index: Any) -> None:
    rewrite(case / INDEX, json.dumps(index).encode())


def _shard_names(case: Path) -> list[str]:
    return sorted(p.name for p in case.glob("model-*.safetensors"))


def _tensor(case: Path, rng: random.Random) -> tuple[str, str]:
    weight_map = index_of(case)["weight_map"]
    name = rng.choice(sorted(weight_map))
    return name, weight_map[name]


# --- the mutations --------------------------------------------------------------------------------------------------

Mutation = Callable[[Path, Seeds, random.Random], tuple[str, str]]


def _index_points(case: Path, seeds: Seeds, rng: random.Random) -> tuple[str, str]:
    """One tensor (or all) put by the index somewhere that is not a shard of this folder."""
    index = index_of(case)
    name, shard = _tensor(case, rng)
    kind = rng.choice(["absolute", "dotdot", "subfolder", "missing", "link-out", "pipe", "folder", "device"])
    if kind == "absolute":
        target = str(seeds.secret)
    elif kind == "dotdot":
        target = os.path.relpath(seeds.secret, case)
    elif kind == "subfolder":
        (case / "sub").mkdir()
        os.link(case / shard, case / "sub" / shard)
        target = f"sub/{shard}"
    elif kind == "missing":
        target = "model-00003-of-00003.safetensors"
    elif kind == "link-out":
        target = "model-linked.safetensors"
        (case / target).symlink_to(seeds.secret)
    elif kind == "pipe":
        target = "model-pipe.safetensors"
        os.mkfifo(case / target)
    elif kind == "folder":
        target = "model-folder.safetensors"
        (case / target).mkdir()
    else:
        target = "model-zero.safetensors"
        (case / target).symlink_to("/dev/zero")
    every = rng.random() < 0.3
    for tensor, value in index["weight_map"].items():
        if every or tensor == name or (kind == "absolute" and value == shard and rng.random() < 0.5):
            index["weight_map"][tensor] = target
    save_index(case, index)
    return f"index puts {'every tensor' if every else name} in {kind} {target}", "refuse"


def _shard_replaced(case: Path, seeds: Seeds, rng: random.Random) -> tuple[str, str]:
    shard = case / rng.choice(_shard_names(case))
    kind = rng.choice(["removed", "link-out", "pipe", "folder", "device", "dangling", "empty"])
    shard.unlink()
    if kind == "link-out":
        shard.symlink_to(seeds.secret)
    elif kind == "pipe":
        os.mkfifo(shard)
    elif kind == "folder":
        shard.mkdir()
    elif kind == "device":
        shard.symlink_to("/dev/zero")
    elif kind == "dangling":
        shard.symlink_to(case / "nothing-here")
    elif kind == "empty":
        shard.write_bytes(b"")
    if rng.random() < 0.3:
        (case / INDEX).unlink()
        kind += ", no index"
    return f"shard {shard.name} {kind}", "refuse"


def _index_entry(case: Path, seeds: Seeds, rng: random.Random) -> tuple[str, str]:
    index = index_of(case)
    weight_map = index["weight_map"]
    name, shard = _tensor(case, rng)
    kind = rng.choice(["removed", "renamed", "moved", "tree", "deep", "not-a-map", "empty"])
    if kind == "removed":
        del weight_map[name]
    elif kind == "renamed":
        weight_map[name + ".x"] = weight_map.pop(name)
    elif kind == "moved":
        weight_map[name] = next(s for s in _shard_names(case) if s != shard)
    elif kind == "tree":
        odd = rng.choice([None, 1, -1, "", "x" * 1000, [], {}, [shard], {"a": shard}, True])
        if rng.random() < 0.5:
            weight_map[name] = odd
        else:
            index = odd
        kind = f"{'value' if index is not odd else 'whole index'} {str(odd)[:20]}"
    elif kind == "deep":
        rewrite(case / INDEX, b"[" * 100_000 + b"]" * 100_000)
        return "index nested 100,000 deep", "refuse"
    elif kind == "not-a-map":
        index["weight_map"] = sorted(weight_map.items())
    else:
        index["weight_map"] = {}
    save_index(case, index)
    return f"index entry {name}: {kind}", "refuse"


def _tensor_twice_or_missing(case: Path, seeds: Seeds, rng: random.Random) -> tuple[str, str]:
    """A tensor copied into a second shard, or dropped from its shard (and from the index, or not)."""
    sharded = (case / INDEX).exists()
    shards = _shard_names(case) if sharded else ["model.safetensors"]
    source = case / rng.choice(shards)
    tensors = tensors_of(source)
    name = rng.choice(sorted(tensors))
    if rng.random() < 0.5:
        if sharded:
            other = case / next(s for s in shards if s != source.name)
            write_st(other, {**tensors_of(other), name: tensors[name]})
        else:
            write_st(case / "model-extra.safetensors", {name: tensors[name]})
        return f"tensor {name} also in a second shard", "refuse"
    del tensors[name]
    write_st(source, tensors)
    if sharded and rng.random() < 0.7:
        index = index_of(case)
        del index["weight_map"][name]
        save_index(case, index)
        return f"tensor {name} dropped from {source.name} and the index", "refuse"
    return f"tensor {name} dropped from {source.name}", "refuse"


def _numbering(case: Path, seeds: Seeds, rng: random.Random) -> tuple[str, str]:
    """The second shard renamed into another numbering (index updated, or removed)."""
    second = _shard_names(case)[-1]
    renamed = rng.choice(["model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
                          "model-00002-of-00001.safetensors", "model-00000-of-00002.safetensors"])  # fmt: skip
    (case / second).rename(case / renamed)
    if rng.random() < 0.5:
        index = index_of(case)
        index["weight_map"] = {t: renamed if s == second else s for t, s in index["weight_map"].items()}
        save_index(case, index)
    else:
        (case / INDEX).unlink()
    return f"{second} renamed {renamed}", "refuse"


def _blocks(case: Path, seeds: Seeds, rng: random.Random) -> tuple[str, str]:
    config = json.loads((case / "config.json").read_text())
    n = rng.choice([0, BLOCKS - 1, BLOCKS + 1, 100, 20_000, 2**31, 2**40])
    config["num_hidden_layers"] = n
    config.pop("layer_types", None)
    rewrite(case / "config.json", json.dumps(config).encode())
    return f"num_hidden_layers {n} for {BLOCKS} blocks", "refuse"


def _stray(case: Path, seeds: Seeds, rng: random.Random) -> tuple[str, str]:
    """A pipe or a link out of the folder where the converter may read (tokenizer files) or not (notes.txt)."""
    name = rng.choice(["tokenizer.json", "tokenizer_config.json", "generation_config.json", "notes.txt", "config.json"])
    kind = rng.choice(["pipe", "link-out", "device"])
    (case / name).unlink(missing_ok=True)
    if kind == "pipe":
        os.mkfifo(case / name)
    elif kind == "link-out":
        (case / name).symlink_to(seeds.single / ("config.json" if name == "config.json" else "tokenizer.json"))
    else:
        (case / name).symlink_to("/dev/null")
    return f"{name} is a {kind}", "refuse"


def _valid_layout(case: Path, seeds: Seeds, rng: random.Random) -> tuple[str, str]:
    """Layouts that are fine: no index for complete shards, shards linked from a subfolder, a stray folder."""
    kind = rng.choice(["no-index", "linked-inside", "stray-folder"])
    if kind == "no-index":
        (case / INDEX).unlink()
    elif kind == "linked-inside":
        (case / "store").mkdir()
        for name in _shard_names(case):
            (case / name).rename(case / "store" / name)
            (case / name).symlink_to(Path("store") / name)
    else:
        (case / "original").mkdir()
        (case / "original" / "notes.txt").write_text("x")
    return f"valid layout: {kind}", "work"


MUTATIONS: list[Mutation] = [_index_points, _shard_replaced, _index_entry, _tensor_twice_or_missing, _numbering,
                             _blocks, _stray, _valid_layout]  # fmt: skip


def hf_cache_case(work: Path, seeds: Seeds, rng: random.Random) -> Case:
    """The sharded seed as a Hugging Face cache snapshot (`snapshots/REV/FILE -> ../../blobs/HASH`): valid."""
    repo = work / "case-hub" / "models--tiny--qwen2"
    _clear(work / "case-hub")
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, p in enumerate(sorted(seeds.sharded.iterdir())):
        os.link(p, repo / "blobs" / f"blob{i:04d}")
        (snapshot / p.name).symlink_to(Path("../../blobs") / f"blob{i:04d}")
    return Case(snapshot, "a Hugging Face cache snapshot", "work")


def layout_case(work: Path, seeds: Seeds, rng: random.Random) -> Case:
    """One folder-layout mutation of a fresh copy of a seed."""
    if rng.random() < 0.08:
        return hf_cache_case(work, seeds, rng)
    mutation = rng.choice(MUTATIONS)
    single = mutation in (_tensor_twice_or_missing, _blocks, _stray) and rng.random() < 0.4
    case = fresh_copy(seeds.single if single else seeds.sharded, work / "case-checkpoint")
    what, expect = mutation(case, seeds, rng)
    return Case(case, ("single: " if single else "sharded: ") + what, expect)
