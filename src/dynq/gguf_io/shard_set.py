"""A split model as one set of files: llama.cpp's shard names (`NAME-00001-of-0000N.gguf`, gguf-py's too), the
files a set of N shards of an output takes, and what makes a set complete.

A set is read whole or refused: every shard its names promise is there and a regular file, each says in its
`split.*` keys that it is shard i of N, and the shards together hold the `split.tensors.count` tensors they declare
(a shard swapped in from another split of the same model would otherwise merge into a model missing tensors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dynq.errors import DynqError

SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def shard_names(output: Path, count: int) -> list[Path]:
    """The files a set of `count` shards named after `output` (`x.gguf`) has; one shard is `output` itself."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split model given any one of them (or just `[path]` for a single file); a name that numbers
    no shard of a set (`-00001-of-00000`, `-00003-of-00002`) or a shard that is not there is one line."""
    m = SPLIT_NAME.match(path.name)
    if m is None:
        return [path]
    no, count = int(m.group("no")), int(m.group("count"))
    if not 1 <= no <= count:
        raise DynqError(f"{path}: the name says shard {no} of {count}, which no split has; shards are numbered "
                        "NAME-00001-of-0000N.gguf up to N")  # fmt: skip
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DynqError(f"{path}: split model is missing shard(s) {shown}; put all shards together")
    return paths


@dataclass(frozen=True)
class SplitKeys:
    """One file's `split.*` values as stored (None where a key is absent; any type a crafted file holds)."""

    no: object
    count: object
    tensors: object


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _shown(value: object) -> str:
    """A stored value as a message shows it: a crafted one (a long array, a string) cut short."""
    text = repr(value) if not isinstance(value, int) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_numbering(paths: list[Path], keys: list[SplitKeys]) -> None:
    """Each shard says it is shard i of N as its name does (a single file says nothing, or 0 of 1)."""
    n = len(paths)
    if n == 1:
        k = keys[0]
        if (k.no is None and k.count is None) or (_int(k.no) == 0 and _int(k.count) == 1):
            return
        if SPLIT_NAME.match(paths[0].name) is None:
            said = f"split.no={_shown(k.no)}, split.count={_shown(k.count)}"
            raise DynqError(f"{paths[0]}: its split metadata ({said}) makes it one shard of a split, but it is not "
                            "named as one; give the shards their names NAME-0000i-of-0000N.gguf")  # fmt: skip
    for i, (path, k) in enumerate(zip(paths, keys, strict=True)):
        if _int(k.no) != i or _int(k.count) != n:
            said = f"split.no={_shown(k.no)}, split.count={_shown(k.count)}"
            if k.no is None and k.count is None:
                said = "no split metadata"
            raise DynqError(f"{path}: {said}, but its name makes it shard {i + 1} of {n} (split.no={i}, "
                            f"split.count={n}); the shards do not belong together")  # fmt: skip


def check_tensor_count(paths: list[Path], keys: list[SplitKeys], found: int) -> None:
    """Every shard's `split.tensors.count` is the number of tensors the set holds (a single file may lack it)."""
    for path, k in zip(paths, keys, strict=True):
        if k.tensors is None and len(paths) == 1:
            continue
        if _int(k.tensors) != found:
            declared = "no split.tensors.count" if k.tensors is None else f"split.tensors.count={_shown(k.tensors)}"
            holds = f"its {len(paths)} shards hold" if len(paths) > 1 else "it holds"
            raise DynqError(f"{path}: {declared}, but {holds} {found} tensors; a shard is missing or comes from "
                            "another split; put the shards of one split together")  # fmt: skip
