"""Structure-aware fuzzing of what dynq reads from strangers: GGUF models, imatrix files (GGUF and .dat), recipes,
Hugging Face checkpoints (config.json, safetensors headers, and the folder's layout: tests/fuzz_checkpoint.py) and
split models' shard sets (fuzz_shards.py).

Each case mutates a valid file where its structure is (a count, a string length, an array type, a tensor dimension,
type or offset, a cut at a section boundary, a YAML value of the wrong kind...) and runs what a user would run on it.
A case passes when it ends in a correct result or in a one-line `DynqError`; a finding is anything else: another
exception, a run over its limit of CPU time (CPU time, so that a busy machine is no finding), memory over the limit
(the worker process's address space is capped at its size at start plus `--memory-mib`, so a declared size of 2^60
bytes that gets allocated is caught), a case known to be broken that is accepted (an index naming a file outside the
checkpoint, a missing shard) or one known to be valid that is refused.

    .venv/bin/python tests/fuzzing.py --cases 20000 [--kinds gguf,imatrix-gguf,imatrix-dat,recipe,checkpoint,shards]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))

import dynq
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.errors import DynqError
from dynq.gguf_io.imatrix import read_imatrix, write_imatrix_dat, write_imatrix_gguf
from dynq.gguf_io.reader import GGUFModel
from dynq.quantize import check_imatrix
from dynq.recipe.presets import load_recipe
from fuzz_checkpoint import fresh_copy, layout_case, make_seeds, rewrite
from fuzz_shards import ShardSeeds, check_shard_set, shard_set_case
from tiny_models import llama_tensors, write_gguf

KINDS = ("gguf", "imatrix-gguf", "imatrix-dat", "recipe", "checkpoint", "shards")
CASE_SECONDS = 5
CTX = dynq.RunContext(threads=1)


# --- where a file's structure is --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One integer field of a binary file: where it is, its width and what it counts or names."""

    offset: int
    size: int
    kind: str


@dataclass
class Layout:
    slots: list[Slot] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)  # section starts: where a cut is most telling


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_layout(data: bytes) -> Layout:
    """The header, every key/value (key length, value type, string lengths, array type and length), every tensor
    info (name length, dimension count, dimensions, type, offset) and where the tensor data starts."""
    out = Layout()
    pos = 0

    def slot(size: int, kind: str) -> int:
        nonlocal pos
        out.slots.append(Slot(pos, size, kind))
        value = int.from_bytes(data[pos : pos + size], "little")
        pos += size
        return value

    def string(kind: str) -> None:
        nonlocal pos
        length = slot(8, kind)  # not `pos += slot(...)`: that adds to pos as it was before the call
        pos += length

    slot(4, "magic")
    slot(4, "version")
    n_tensors = slot(8, "tensor count")
    n_kv = slot(8, "kv count")
    for _ in range(n_kv):
        out.boundaries.append(pos)
        string("key length")
        vtype = slot(4, "value type")
        if vtype == 8:
            string("string length")
        elif vtype == 9:
            atype = slot(4, "array type")
            count = slot(8, "array length")
            for _ in range(count):
                if atype == 8:
                    string("array string length")
                else:
                    pos += _SCALAR_SIZES[atype]
        else:
            pos += _SCALAR_SIZES[vtype]
    for _ in range(n_tensors):
        out.boundaries.append(pos)
        string("tensor name length")
        dims = slot(4, "dimension count")
        for _ in range(dims):
            slot(8, "dimension")
        slot(4, "tensor type")
        slot(8, "tensor offset")
    out.boundaries += [pos, pos + 32, len(data) // 2, len(data) - 1]
    return out


def dat_layout(data: bytes) -> Layout:
    """llama.cpp's legacy imatrix: entry count, then per entry name length, name, calls, value count, values; then
    the chunk count and the dataset name."""
    out = Layout()
    pos = 0

    def slot(kind: str) -> int:
        nonlocal pos
        out.slots.append(Slot(pos, 4, kind))
        (value,) = struct.unpack_from("<i", data, pos)
        pos += 4
        return int(value)

    for _ in range(slot("entry count")):
        out.boundaries.append(pos)
        name_length = slot("name length")
        pos += name_length
        slot("calls")
        values = slot("value count")
        pos += 4 * values
    out.boundaries.append(pos)
    slot("chunk count")
    slot("dataset length")
    return out


# --- mutations -----------------------------------------------------------------------------------------------------


def _interesting(size: int, old: int, rng: random.Random) -> int:
    top = (1 << (8 * size)) - 1
    edges = [0, 1, 2, 3, 7, 8, 9, 13, 30, 64, 255, 256, 4096, 1 << 31, (1 << 31) - 1, 1 << 32, 1 << 60]
    near = [top, top - 1, top >> 1, (top >> 1) + 1, old + 1, old - 1, old * 2, old << 16, rng.getrandbits(8 * size)]
    choices = edges + near
    return rng.choice(choices) & top


def mutate_binary(data: bytes, layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """One structural change: a field set to a telling value, a cut at a section boundary, or a few flipped bytes."""
    roll = rng.random()
    if roll < 0.6 and layout.slots:
        s = rng.choice(layout.slots)
        old = int.from_bytes(data[s.offset : s.offset + s.size], "little")
        new = _interesting(s.size, old, rng)
        changed = data[: s.offset] + new.to_bytes(s.size, "little") + data[s.offset + s.size :]
        return changed, f"{s.kind} at {s.offset}: {old} -> {new}"
    if roll < 0.85:
        cut = max(0, min(len(data) - 1, rng.choice(layout.boundaries or [len(data) // 2]) + rng.randint(-9, 9)))
        return data[:cut], f"cut at {cut} of {len(data)}"
    raw = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        raw[rng.randrange(len(raw))] = rng.getrandbits(8)
    return bytes(raw), "random bytes changed"


_ODD_VALUES: list[Any] = [None, True, False, 0, -1, 2**64, 1e308, float("nan"), "", "x" * 10_000, "0-1000000000",
                          "first:0", "last:99999999", "(", "[", "\x1b[31m\n", "moe", ["moe"], {"a": 1}, [[[[]]]],
                          "IQ1_S", "Q4_K", "F32", "TQ1_0", "blk\\.0\\.", ".*", "\ud800"]  # fmt: skip


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


def mutate_tree(tree: Any, rng: random.Random) -> tuple[Any, str]:
    """A parsed document (recipe, config.json, safetensors header) with one node replaced, removed or added to."""
    tree = json.loads(json.dumps(tree))
    path = rng.choice(list(_paths(tree)))
    if not path:
        return rng.choice(_ODD_VALUES), "whole document replaced"
    parent = tree
    for p in path[:-1]:
        parent = parent[p]
    roll = rng.random()
    if roll < 0.7:
        parent[path[-1]] = rng.choice(_ODD_VALUES)
        return tree, f"{'/'.join(map(str, path))} replaced"
    if roll < 0.85:
        del parent[path[-1]]
        return tree, f"{'/'.join(map(str, path))} removed"
    if isinstance(parent, dict):
        parent[rng.choice(["surprise", "type", "blocks", "when", "rules"])] = rng.choice(_ODD_VALUES)
    else:
        parent.append(rng.choice(_ODD_VALUES))
    return tree, f"{'/'.join(map(str, path[:-1]))} added to"


_YAML_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 8)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=False))
    + "rules: *i\n"
)


def mutate_text(text: str, rng: random.Random) -> tuple[bytes, str]:
    roll = rng.random()
    raw = text.encode()
    if roll < 0.3:
        cut = rng.randrange(len(raw))
        return raw[:cut], f"cut at {cut}"
    if roll < 0.5:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.choice([0, 0x80, 0xFF, ord(":"), ord("-"), ord("&"), ord("*"), ord("\t"),
                                                   ord("["), ord("{"), ord("!")])  # fmt: skip
        return bytes(b), "bytes changed"
    if roll < 0.6:
        return _YAML_BOMB.encode(), "alias expansion"
    return b"\xff\xfe" + raw, "not UTF-8"


# --- the cases -----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    kind: str
    outcome: str  # ok | error | finding
    detail: str


PROGRESS_EVERY = 100


class _Timeout(BaseException):
    pass


def _out_of_time(signum: int, frame: FrameType | None) -> None:
    raise _Timeout


def judged(kind: str, what: str, run: Callable[[], object], expect: str = "any", seconds: int = CASE_SECONDS) -> Result:
    """Run one case under the time limit; sort its end into ok, a proper error, or a finding. `expect` is `refuse`
    for a case that must end in an error, `work` for one that must not, `any` otherwise."""
    try:
        return _judged(kind, what, run, expect, seconds)
    except _Timeout:  # the timer went off as the case ended, before it was cancelled: the case took the whole limit
        return Result(kind, "finding", f"{what}: over {seconds} s of CPU")


def _judged(kind: str, what: str, run: Callable[[], object], expect: str, seconds: int) -> Result:
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        run()
        if expect == "refuse":
            return Result(kind, "finding", f"{what}: accepted, though it must be refused")
        return Result(kind, "ok", what)
    except DynqError as e:
        # its data parts (names, values from the file) may hold anything: the CLI shows them escaped, on one line
        if not str(e).strip():
            return Result(kind, "finding", f"{what}: a DynqError without a message")
        if expect == "work":
            return Result(kind, "finding", f"{what}: refused, though it is valid: {str(e)[:300]}")
        return Result(kind, "error", what)
    except _Timeout:
        return Result(kind, "finding", f"{what}: over {seconds} s of CPU")
    except MemoryError:
        return Result(kind, "finding", f"{what}: memory over the limit")
    except Exception as e:  # anything else is what the fuzzer looks for
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Result(kind, "finding", f"{what}: {type(e).__name__}: {str(e)[:200]} at {where.filename}:{where.lineno}")
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


class Fuzzer:
    """The seeds (valid files) and, per kind, a case: mutate a seed, write it, run dynq on it."""

    def __init__(self, work: Path, rng: random.Random, quantize_every: int, kinds: list[str]) -> None:
        self.work, self.rng, self.quantize_every = work, rng, quantize_every
        self.model = work / "seed.gguf"
        write_gguf(self.model, llama_tensors())
        self.model_bytes = self.model.read_bytes()
        self.model_layout = gguf_layout(self.model_bytes)
        inventory = GGUFModel(self.model).inventory()
        gen = np.random.default_rng(0)
        entries = {
            t.name: ImatrixEntry(10 * gen.random((1, t.row_length), dtype=np.float32), np.full(1, 64, np.float32))
            for t in inventory.tensors
            if len(t.shape) >= 2
        }
        imatrix = Imatrix(entries, ["fuzz"], 4, 512)
        write_imatrix_gguf(imatrix, work / "seed.imatrix.gguf")
        write_imatrix_dat(imatrix, work / "seed.imatrix.dat")
        self.imatrix_gguf = (work / "seed.imatrix.gguf").read_bytes()
        self.imatrix_dat = (work / "seed.imatrix.dat").read_bytes()
        self.recipes = [load_recipe_text(name) for name in ("dyn-iq1_s", "dyn-q2_k_xl", "f16")]
        self.plan = dynq.plan(self.model, "uniform-q8_0")
        self.seeds = make_seeds(work) if "checkpoint" in kinds else None
        self.checkpoint_seconds = CASE_SECONDS
        if self.seeds is not None:
            # Opening a valid checkpoint reads its 151,665-token vocabulary through the converter: seconds of CPU.
            # A case may take four times the CPU time the seed takes (warm), and never less than the rest.
            dynq.open_source(str(self.seeds.single), ctx=CTX)
            started = time.process_time()
            dynq.open_source(str(self.seeds.single), ctx=CTX)
            self.checkpoint_seconds = max(CASE_SECONDS, math.ceil(4 * (time.process_time() - started)))
        self.shard_seeds = ShardSeeds.make(work) if "shards" in kinds else None
        self.count = 0

    def _file(self, name: str, data: bytes) -> Path:
        path = self.work / name
        path.write_bytes(data)
        return path

    def _out(self) -> Path:
        out = self.work / "out.gguf"
        out.unlink(missing_ok=True)
        return out

    def gguf(self) -> Result:
        data, what = mutate_binary(self.model_bytes, self.model_layout, self.rng)
        path = self._file("case.gguf", data)
        self.count += 1
        deep = self.count % self.quantize_every == 0

        def run() -> None:
            summary = dynq.inspect(str(path))
            str(summary)
            if deep:
                dynq.quantize(dynq.plan(path, "uniform-q4_0"), self._out(), ctx=CTX)

        return judged("gguf", what, run)

    def imatrix(self, dat: bool) -> Result:
        seed = self.imatrix_dat if dat else self.imatrix_gguf
        layout = dat_layout(seed) if dat else gguf_layout(seed)
        data, what = mutate_binary(seed, layout, self.rng)
        path = self._file("case.imatrix" + (".dat" if dat else ".gguf"), data)
        self.count += 1
        deep = self.count % self.quantize_every == 0

        def run() -> None:
            imx = read_imatrix(path)
            check_imatrix(self.plan, imx, str(path))
            if deep:
                dynq.quantize(dynq.plan(self.model, "uniform-iq4_nl"), self._out(), imatrix=imx, ctx=CTX)

        return judged("imatrix-dat" if dat else "imatrix-gguf", what, run)

    def recipe(self) -> Result:
        text = self.rng.choice(self.recipes)
        if self.rng.random() < 0.6:
            tree, what = mutate_tree(yaml.safe_load(text), self.rng)
            data = yaml.safe_dump(tree, allow_unicode=True).encode("utf-8", errors="surrogateescape")
        else:
            data, what = mutate_text(text, self.rng)
        path = self._file("case.yaml", data)
        return judged("recipe", what, lambda: dynq.plan(self.model, load_recipe(str(path))))

    def checkpoint_case(self) -> Result:
        """Half the cases change the folder's layout (fuzz_checkpoint.py); the others config.json or a
        safetensors header, as a tree or as bytes."""
        assert self.seeds is not None
        if self.rng.random() < 0.5:
            layout = layout_case(self.work, self.seeds, self.rng)
            case, what, expect = layout.folder, layout.what, layout.expect
        else:
            case, expect = fresh_copy(self.seeds.single, self.work / "case-checkpoint"), "any"
            what = self._mutate_file(case)

        def run() -> None:
            source = dynq.open_source(str(case), ctx=CTX)
            for t in source.inventory().tensors[:3]:
                source.load(t.name)

        return judged("checkpoint", what, run, expect, self.checkpoint_seconds)

    def _mutate_file(self, case: Path) -> str:
        weights = case / "model.safetensors"
        if self.rng.random() < 0.4:
            config = json.loads((case / "config.json").read_text())
            tree, what = mutate_tree(config, self.rng)
            rewrite(case / "config.json", json.dumps(tree).encode())
            return "config.json: " + what
        raw = weights.read_bytes()
        (n,) = struct.unpack_from("<Q", raw)
        if self.rng.random() < 0.6:
            tree, what = mutate_tree(json.loads(raw[8 : 8 + n]), self.rng)
            header = json.dumps(tree).encode()
            header += b" " * (-len(header) % 8)
            rewrite(weights, struct.pack("<Q", len(header)) + header + raw[8 + n :])
        else:
            layout = Layout([Slot(0, 8, "header length")], [8, 8 + n, 8 + n + 1, len(raw) // 2])
            changed, what = mutate_binary(raw, layout, self.rng)
            rewrite(weights, changed)
        return "model.safetensors: " + what

    def shards(self) -> Result:
        assert self.shard_seeds is not None
        seeds = self.shard_seeds

        def binary(data: bytes, rng: random.Random) -> tuple[bytes, str]:
            return mutate_binary(data, gguf_layout(data), rng)

        path, what = shard_set_case(self.work, seeds, self.rng, binary)
        self.count += 1
        merge = self.count % 5 == 0
        return judged("shards", what, lambda: check_shard_set(path, self._out(), seeds.n_tensors, merge))

    def case(self, kind: str) -> Result:
        if kind == "gguf":
            return self.gguf()
        if kind == "shards":
            return self.shards()
        if kind.startswith("imatrix"):
            return self.imatrix(dat=kind == "imatrix-dat")
        if kind == "recipe":
            return self.recipe()
        return self.checkpoint_case()


def load_recipe_text(name: str) -> str:
    from dynq.recipe.presets import _preset_files

    return _preset_files()[name].read_text()


def cap_memory(extra_mib: int) -> None:
    """Cap the address space at what the process maps now plus `extra_mib`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            limit = int(line.split()[1]) * 1024 + (extra_mib << 20)
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


def fuzz(cases: int, kinds: list[str], seed: int, memory_mib: int, quantize_every: int) -> dict[str, Any]:
    rng = random.Random(seed)
    logging.disable(logging.WARNING)  # a damaged file's warnings are expected, thousands of times
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGPROF, _out_of_time)
    counts: dict[str, Counter[str]] = {k: Counter() for k in kinds}
    findings: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dynq-fuzz-") as tmp:
        fuzzer = Fuzzer(Path(tmp), rng, quantize_every, kinds)
        cap_memory(memory_mib)
        seeded = time.perf_counter()
        for i in range(cases):
            r = fuzzer.case(kinds[i % len(kinds)])
            counts[r.kind][r.outcome] += 1
            if r.outcome == "finding":
                findings.append(f"{r.kind}: {r.detail}")
            if (i + 1) % PROGRESS_EVERY == 0:  # a long run's counts so far, for whoever watches it
                print(json.dumps({"cases": i + 1, "seconds": round(time.perf_counter() - started),
                                  "findings": len(findings), "counts": {k: dict(v) for k, v in counts.items()}}),
                      file=sys.stderr, flush=True)  # fmt: skip
    done = time.perf_counter()
    return {"seed": seed, "cases": cases, "seconds": round(done - started, 1),
            "seconds_per_case": round((done - seeded) / max(cases, 1), 3),
            "checkpoint_limit_s": fuzzer.checkpoint_seconds if "checkpoint" in kinds else None,
            "counts": {k: dict(v) for k, v in counts.items()}, "findings": findings}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20_000)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-mib", type=int, default=1024)
    ap.add_argument("--quantize-every", type=int, default=25, help="every Nth model or imatrix case also quantizes")
    args = ap.parse_args()
    report = fuzz(args.cases, args.kinds.split(","), args.seed, args.memory_mib, args.quantize_every)
    print(json.dumps(report, indent=1))
    sys.exit(1 if report["findings"] else 0)


if __name__ == "__main__":
    main()
